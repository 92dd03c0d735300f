"""Benchmark: where a web process's resident memory goes (`make bench-all`; not a test).

Two parts:

- Python objects at start: in a fresh interpreter, what loading `wsgi` (create_app) allocates,
  by tracemalloc, per top-level package (each module's own allocation while it loads; what the
  modules it imports allocate goes to them).
- Resident memory under gunicorn (2 x 16 gthread, this tree's gunicorn.conf.py, the bench's
  settings as bench_uploads.py): each web process's /proc/PID/smaps summed per mapping (the
  anonymous memory holding Python's objects and the C libraries' allocations, the main heap,
  each shared library), warm and after each of `--runs` runs of `--clients` clients creating
  uploads for `--seconds`.

A web process is forked from the master that loaded the app: it starts with the master's
anonymous pages (resident, shared until written) and only the pages of the shared libraries it
touches itself. Options: --clients 8 --seconds 10 --runs 2 --batch off|auto;
`BENCH_DATABASE_URL` runs the broker on another database (e.g. PostgreSQL).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
ANON = "anonymous (Python's objects, malloc arenas)"
HEAP = "[heap] (malloc's main arena)"
MB = 1024 * 1024


class _Measured(importlib.abc.Loader):
    """A module loader that books what a module allocates while it runs, less its imports."""

    def __init__(self, loader: Any, book: dict[str, int], nested: list[int]) -> None:
        self.loader, self.book, self.nested = loader, book, nested

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.nested.append(0)
        start = tracemalloc.get_traced_memory()[0]
        try:
            self.loader.exec_module(module)
        finally:
            total = tracemalloc.get_traced_memory()[0] - start
            imported = self.nested.pop()
            self.book[module.__name__.split(".")[0]] += total - imported
            if self.nested:
                self.nested[-1] += total

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)  # the rest (resources, source) from the real loader


class _Finder(importlib.abc.MetaPathFinder):
    """Hands every module found by the other finders to a `_Measured` loader."""

    def __init__(self) -> None:
        self.book: dict[str, int] = defaultdict(int)
        self.nested: list[int] = []

    def find_spec(
        self, name: str, path: Any, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = _Measured(spec.loader, self.book, self.nested)
                return spec
        return None


def import_profile() -> None:
    """Load `wsgi` in this (fresh) process and print what it allocated per package."""
    sys.path.insert(0, str(ROOT))
    os.environ.update(BROKER_ENV="testing", BROKER_INSTANCE_PATH=tempfile.mkdtemp())
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    tracemalloc.start()
    import wsgi  # noqa: F401

    total = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"Python objects after loading wsgi: {total / MB:.1f} MB, {len(sys.modules)} modules")
    ranked = sorted(finder.book.items(), key=lambda item: -item[1])
    rest = sum(size for _, size in ranked[15:])
    for name, size in ranked[:15]:
        name = "create_app() itself" if name == "wsgi" else name  # its imports are theirs
        print(f"  {name:<22} {size / MB:5.2f} MB")
    print(f"  {'(the other packages)':<22} {rest / MB:5.2f} MB")


def mapping_name(path: str) -> str:
    """Return the row a mapping of `path` is summed into."""
    if not path:
        return ANON
    if path == "[heap]":
        return HEAP
    if path.startswith("["):
        return path
    if "site-packages/" in path:
        parts = path.split("site-packages/", 1)[1].split("/")
        return parts[0] if len(parts) == 1 else f"{parts[0]}/{parts[-1]}"
    return os.path.basename(path)


def smaps(pid: int) -> dict[str, dict[str, int]]:
    """Return a process's resident and private kB per mapping row (see `mapping_name`)."""
    rows: dict[str, dict[str, int]] = defaultdict(lambda: {"rss": 0, "private": 0})
    row = rows[ANON]
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if MAPPING.match(line):
            parts = line.split(None, 5)
            row = rows[mapping_name(parts[5].strip() if len(parts) > 5 else "")]
        elif line.startswith("Rss:"):
            row["rss"] += int(line.split()[1])
        elif line.startswith(("Private_Clean:", "Private_Dirty:")):
            row["private"] += int(line.split()[1])
    return dict(rows)


def children(pid: int) -> list[int]:
    """Return the pids of a process's children (a gunicorn master's web processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def mean(maps: list[dict[str, dict[str, int]]], row: str, field: str) -> float:
    """Return the mean MB of `row` over processes."""
    return sum(m.get(row, {}).get(field, 0) for m in maps) / len(maps) / 1024


def print_table(snapshots: list[list[dict[str, dict[str, int]]]]) -> None:
    """Print the per-mapping rows (mean of the web processes) warm and after each run, largest
    first, then the total; the growth over the whole and over the last run."""
    last = snapshots[-1]
    rows = sorted(
        {r for maps in snapshots for m in maps for r in m}, key=lambda r: -mean(last, r, "rss")
    )
    runs = " ".join(f"{f'run {n}':>6}" for n in range(1, len(snapshots)))
    print(f"  {'mapping':<40} {'warm':>6} {runs} {'grew':>6} {'last':>6} {'private':>8}")

    def line(name: str, figures: list[float], private: float) -> None:
        print(
            f"  {name[:40]:<40} "
            + " ".join(f"{f:6.1f}" for f in figures)
            + f" {figures[-1] - figures[0]:+6.1f} {figures[-1] - figures[-2]:+6.1f} {private:8.1f}"
        )

    small = [0.0] * (len(snapshots) + 1)
    for row in rows:
        figures = [mean(maps, row, "rss") for maps in snapshots] + [mean(last, row, "private")]
        if figures[-2] < 0.5 and abs(figures[-2] - figures[0]) < 0.2:
            small = [a + b for a, b in zip(small, figures, strict=True)]
        else:
            line(row, figures[:-1], figures[-1])
    line("(the other mappings)", small[:-1], small[-1])
    totals = [sum(mean(maps, r, "rss") for r in rows) for maps in snapshots]
    line("total", totals, sum(mean(last, r, "private") for r in rows))


def main() -> None:
    """Run both parts and print their tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="clients creating uploads")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the run")
    parser.add_argument("--runs", type=int, default=2, help="runs, memory read after each")
    parser.add_argument("--batch", default="off", help="BROKER_CLOUDFLARE_BATCH: off or auto")
    parser.add_argument("--imports", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.imports:
        import_profile()
        return
    subprocess.run([sys.executable, __file__, "--imports"], check=True, cwd=ROOT)

    sys.path.insert(0, str(ROOT))
    from tests.bench import bench_uploads as up

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-memory-")))
        emu_port, broker_port = up.free_port(), up.free_port()
        emulator_url = f"http://127.0.0.1:{emu_port}"
        broker_url = f"http://127.0.0.1:{broker_port}"
        up.start(
            stack,
            [str(up.BIN / "gunicorn"), "-w", "1", "-k", "gthread", "--threads", "32",
             "-b", f"127.0.0.1:{emu_port}", "broker.emulator:create_app()"],
            {
                "EMULATOR_DATA_DIR": str(tmp / "emulator"),
                "EMULATOR_PUBLIC_URL": emulator_url,
                "EMULATOR_ACCOUNT_ID": up.ACCOUNT,
                "EMULATOR_API_TOKEN": up.TOKEN,
                "EMULATOR_RATE_LIMIT": "1000000000",
            },
            tmp / "emulator.log",
        )  # fmt: skip
        database_url = os.environ.get("BENCH_DATABASE_URL") or f"sqlite:///{tmp}/broker.sqlite3"
        settings = {
            **up.broker_settings(tmp, emulator_url, database_url),
            "CLOUDFLARE_BATCH": opts.batch,
        }
        secret = up.prepare_broker(settings)
        env = {
            f"BROKER_{k}": v if isinstance(v, str) else json.dumps(v) for k, v in settings.items()
        }
        master = up.start(
            stack,
            [str(up.BIN / "gunicorn"), "-w", "2", "-k", "gthread", "--threads", "16",
             "-b", f"127.0.0.1:{broker_port}", "wsgi:app"],
            env,
            tmp / "broker.log",
        )  # fmt: skip
        up.wait_until_up(emulator_url + "/")
        up.wait_until_up(broker_url + "/livez")
        headers = {"Authorization": f"Bearer {secret}"}

        def create(session: Any) -> None:  # a failed create is counted by run_load
            body = {"metadata": {"k": "v"}}
            session.post(
                f"{broker_url}/api/v1/uploads", json=body, headers=headers, timeout=30
            ).raise_for_status()

        up.run_load(create, 4, 1.0)  # warm every thread and pool
        time.sleep(1.5)  # freed heap pages go back (gunicorn.conf.py trims once a second)
        web = children(master.pid)
        warm = [smaps(pid) for pid in web]
        master_maps = smaps(master.pid)
        master_rss = sum(r["rss"] for r in master_maps.values()) / 1024
        snapshots, rates = [warm], []
        for _ in range(opts.runs):
            latencies, failed = up.run_load(create, opts.clients, opts.seconds)
            rates.append(
                f"{len(latencies) / opts.seconds:.0f}" + (f" ({failed} failed)" if failed else "")
            )
            time.sleep(1.5)
            snapshots.append([smaps(pid) for pid in web])
        print(
            f"\nResident memory per web process (mean of {len(web)}), MB: "
            f"{database_url.split(':', 1)[0]}, batch {opts.batch}; {opts.runs} runs of "
            f"{opts.clients} clients for {opts.seconds:g} s ({', '.join(rates)} creates/s); "
            f"the master {master_rss:.1f} MB. grew: after the last run less warm; last: during "
            "the last run; private: the last run's pages no other process maps"
        )
        print_table(snapshots)
        # A library loaded after the fork is resident in full in each web process (the dynamic
        # loader and the first touches fault in far more of it than a process forked with it).
        for n, pid in enumerate(web):
            sizes = [sum(r["rss"] for r in maps[n].values()) / 1024 for maps in snapshots]
            print(f"  web process {pid}: " + " → ".join(f"{size:.1f}" for size in sizes) + " MB")
        late = sorted({row for m in snapshots[-1] for row in m} - set(master_maps))
        print(f"  mapped by a web process, not by the master: {', '.join(late) or 'none'}")


if __name__ == "__main__":
    main()

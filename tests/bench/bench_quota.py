"""The quota check against the size of a user's history.

Times one user's reservation step (`broker.uploads.quotas.reserve_slot`: the statements a
create runs before it asks Cloudflare, without the budget's) in process, one at a time,
with 100 / 1,000 / 10,000 / 30,000 of the
user's uploads made in the last 24 hours (half of them drafts waiting, half images), on SQLite
and, with BENCH_DATABASE_URL, PostgreSQL (vacuumed and analyzed, as autovacuum keeps a
production database). Each step's reservation is deleted after it, so the history stays the
size shown. With
`--baseline REV` the same runs for that revision's tree and the table shows both side by side.

    .venv/bin/python tests/bench/bench_quota.py [--baseline main] [--repeats 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# A child measures the tree it runs in (its PYTHONPATH), never this file's.
if "--child" not in sys.argv and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = (100, 1_000, 10_000, 30_000)


def measure_here(url: str, instance: str, repeats: int) -> dict[int, float]:
    """In the tree this process imports `broker` from: median ms of one reservation step at
    each history size."""
    import sqlalchemy as sa
    from flask_migrate import upgrade

    from broker import create_app
    from broker.api.round_trips import commit_in_one_round_trip
    from broker.auth import users
    from broker.platform.db import db, utcnow
    from broker.uploads import quotas
    from broker.uploads.models import Upload

    config = {
        "ENV": "testing",
        "SECRET_KEY": "bench-secret-key-not-for-production",
        "DATABASE_URL": url,
        "INSTANCE_PATH": instance,
        "LOG_LEVEL": "WARNING",
        "WORKER_INLINE": False,
    }
    app = create_app(config)
    medians: dict[int, float] = {}
    with app.app_context():
        upgrade()
        user_id = users.create_user(db.session, "quotabench", "bench password long enough").id
        db.session.commit()
        engine = db.engine
        limits = quotas.Quotas(pending=100_000_000, daily=100_000_000)
        made = 0
        for size in SIZES:
            now = utcnow()
            rows = [
                {
                    "id": f"h{n:031d}",
                    "user_id": user_id,
                    "image_id": f"image-{n}",
                    "profile": "default",
                    "status": ("pending", "ready")[n % 2],
                    "require_signed_urls": True,
                    "created_at": now - timedelta(seconds=n % 80_000),
                    "expires_at": now + timedelta(minutes=30),
                    "status_changed_at": now,
                    "check_attempts": 0,
                }
                for n in range(made, size)
            ]
            with engine.begin() as conn:
                conn.execute(sa.insert(Upload.__table__), rows)
                # Where counts are kept, a real history was folded in create by create.
                fold = getattr(quotas, "fold_usage_changes", None)
                if fold is not None:
                    fold(conn, utcnow())
            made = size
            if engine.dialect.name == "postgresql":
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(sa.text("VACUUM ANALYZE"))
            times = []
            reservations = sa.table("upload_reservations", sa.column("id"))
            for n in range(repeats + 10):
                with engine.connect() as conn:

                    def finish(statements: Any, conn: sa.Connection = conn) -> Any:
                        return commit_in_one_round_trip(conn, statements)

                    started = time.perf_counter()
                    # As a create sends it: on PostgreSQL one message with its COMMIT.
                    quotas.reserve_slot(
                        conn, user_id, limits, f"r{n:031d}", utcnow(), finish=finish
                    )
                    times.append(time.perf_counter() - started)
                    # Not counted: the reservation goes, so the next step counts the same.
                    conn.execute(sa.delete(reservations))
                    conn.commit()
            medians[size] = statistics.median(times[10:]) * 1000
        engine.dispose()
    return medians


def measure(root: Path, url: str, repeats: int) -> dict[int, float]:
    """`measure_here` in `root`'s own code (a process of its own, run from there)."""
    with tempfile.TemporaryDirectory() as instance:
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                url,
                "--instance",
                instance,
                "--repeats",
                str(repeats),
            ],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
            check=True,
            capture_output=True,
        )
    answer: dict[str, float] = json.loads(done.stdout.decode().splitlines()[-1])
    return {int(size): ms for size, ms in answer.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="a git revision to measure beside this tree")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--instance", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps(measure_here(opts.child, opts.instance, opts.repeats)))
        return
    from tests.bench.bench_peer import export
    from tests.bench.bench_scale import fresh_database

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-quota-")))
        roots = {"this tree": ROOT}
        if opts.baseline:
            roots[opts.baseline] = export(opts.baseline, tmp)
        databases = [("SQLite", None)]
        if os.environ.get("BENCH_DATABASE_URL"):
            databases.append(("PostgreSQL", os.environ["BENCH_DATABASE_URL"]))
        for label, server in databases:
            results: dict[str, dict[int, float]] = {}
            for name, root in roots.items():
                url = fresh_database(stack, server, tmp, f"quota_{len(results)}")
                results[name] = measure(root, url, opts.repeats)
            print(f"\n{label}: one user's reservation step, median ms of {opts.repeats}")
            names = list(results)
            print(f"{'uploads in 24 h':>16} " + " ".join(f"{n:>12}" for n in names), end="")
            print("   ratio" if len(names) == 2 else "")
            for size in SIZES:
                cells = " ".join(f"{results[n][size]:>9.3f} ms" for n in names)
                ratio = (
                    f"   {results[names[0]][size] / results[names[1]][size]:.2f}"
                    if len(names) == 2
                    else ""
                )
                print(f"{size:>16,} {cells}{ratio}")


if __name__ == "__main__":
    main()

"""Benchmark: what the broker adds to creating a direct upload (`make bench`; not a test).

Starts the emulator and the broker under gunicorn (threaded workers) on loopback ports, then,
for N concurrent clients, creates uploads for a few seconds two ways:

- `emulator`: `POST /v2/direct_upload` straight to the emulator (what the broker itself does);
- `broker`:   `POST /api/v1/uploads` with a bearer token (auth, limits, budget, upstream, row).

and prints throughput and p50/p99 latency side by side; the per-request difference is the
broker's added latency. Options: --clients 1,8,32  --seconds 4  --workers 2  --threads 16
(`BENCH_DATABASE_URL` runs the broker on another database, e.g. PostgreSQL).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from broker.upstream.cloudflare import CloudflareImages  # noqa: E402

BIN = Path(sys.executable).parent
TOKEN = "bench-emulator-token"
ACCOUNT = "bench-account"


def free_port() -> int:
    """Return a free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(url: str, timeout: float = 20.0) -> None:
    """Poll `url` until the server answers anything."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:  # not listening yet, or still importing
            time.sleep(0.1)
    raise SystemExit(f"server at {url} did not start within {timeout:.0f}s")


def start(
    stack: ExitStack, args: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    """Start a server process (returned); it is stopped when `stack` closes."""
    out = stack.enter_context(log.open("wb"))
    proc = subprocess.Popen(
        args, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=cwd
    )

    def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()

    stack.callback(stop)
    return proc


def broker_settings(tmp: Path, emulator_url: str, database_url: str) -> dict[str, Any]:
    """The broker's settings for the run: pointed at the emulator, limits out of the way."""
    return {
        "ENV": "testing",
        "SECRET_KEY": "bench-secret-key-not-for-production",
        "DATABASE_URL": database_url,
        "INSTANCE_PATH": str(tmp / "instance"),
        "LOG_LEVEL": "WARNING",
        "WORKER_INLINE": False,
        "CLOUDFLARE_API_BASE": f"{emulator_url}/client/v4",
        "CLOUDFLARE_ACCOUNT_ID": ACCOUNT,
        "CLOUDFLARE_API_TOKEN": TOKEN,
        "CLOUDFLARE_ACCOUNT_HASH": "benchhash0000000000000",
        "CLOUDFLARE_DELIVERY_BASE": emulator_url,
        "CLOUDFLARE_UPLOAD_ORIGIN": emulator_url,
        # Compared with the emulator's own (global API) direct_upload: keep the broker there too.
        "CLOUDFLARE_BATCH": "off",
        # The bench measures latency, not the protections: lift the budget and per-user limits.
        "UPSTREAM_BUDGET": 100_000_000,
        "MAX_PENDING_UPLOADS": 100_000_000,
        "MAX_UPLOADS_PER_DAY": 100_000_000,
    }


def prepare_broker(settings: dict[str, Any]) -> str:
    """Migrate the database and create a user; return its bearer token."""
    from flask_migrate import upgrade

    from broker import create_app
    from broker.auth import tokens, users
    from broker.platform.db import db

    app = create_app(dict(settings))
    with app.app_context():
        upgrade()
        # A fresh user per run: BENCH_DATABASE_URL may point at a database used before.
        user = users.create_user(
            db.session, f"bench{secrets.token_hex(4)}", "bench password long enough"
        )
        db.session.commit()
        secret = tokens.issue(db.session, user, "bench").secret
        db.session.commit()
        db.engine.dispose()
    return secret


def run_load(
    call: Callable[[requests.Session], None], clients: int, seconds: float
) -> tuple[list[float], int]:
    """Run `call` from `clients` threads for `seconds`; return latencies (ms) and failures."""
    latencies: list[float] = []
    failures = [0]
    first_error: list[str] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client() -> None:
        mine: list[float] = []
        failed = 0
        with requests.Session() as session:
            # The load shares the machine with what it measures: no proxy lookup in the
            # environment per request (the straight-to-emulator client never makes one), so
            # every column pays the same for its load.
            session.trust_env = False
            start_gate.wait()
            while time.monotonic() < deadline[0]:
                t0 = time.perf_counter()
                try:
                    call(session)
                except Exception as exc:
                    failed += 1
                    if not first_error:
                        first_error.append(f"{type(exc).__name__}: {exc}"[:300])
                    continue
                mine.append((time.perf_counter() - t0) * 1000)
        with lock:
            latencies.extend(mine)
            failures[0] += failed

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + seconds
    start_gate.wait()
    for t in threads:
        t.join()
    if first_error:
        print(f"  first error ({failures[0]} in all): {first_error[0]}", file=sys.stderr)
    return latencies, failures[0]


def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile (0..100) of `values`."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--workers", type=int, default=2, help="broker gunicorn workers")
    parser.add_argument("--threads", type=int, default=16, help="threads per gunicorn worker")
    opts = parser.parse_args()
    counts = [int(c) for c in opts.clients.split(",") if c.strip()]

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-uploads-")))
        emu_port, broker_port = free_port(), free_port()
        emulator_url = f"http://127.0.0.1:{emu_port}"
        broker_url = f"http://127.0.0.1:{broker_port}"
        start(
            stack,
            [str(BIN / "gunicorn"), "-w", "1", "-k", "gthread", "--threads", "32",
             "-b", f"127.0.0.1:{emu_port}", "broker.emulator:create_app()"],
            {
                "EMULATOR_DATA_DIR": str(tmp / "emulator"),
                "EMULATOR_PUBLIC_URL": emulator_url,
                "EMULATOR_ACCOUNT_ID": ACCOUNT,
                "EMULATOR_API_TOKEN": TOKEN,
                "EMULATOR_RATE_LIMIT": "1000000000",
            },
            tmp / "emulator.log",
        )  # fmt: skip
        database_url = os.environ.get("BENCH_DATABASE_URL") or f"sqlite:///{tmp}/broker.sqlite3"
        settings = broker_settings(tmp, emulator_url, database_url)
        secret = prepare_broker(settings)
        env = {
            f"BROKER_{k}": v if isinstance(v, str) else json.dumps(v) for k, v in settings.items()
        }
        start(
            stack,
            [str(BIN / "gunicorn"), "-w", str(opts.workers), "-k", "gthread",
             "--threads", str(opts.threads), "-b", f"127.0.0.1:{broker_port}", "wsgi:app"],
            env,
            tmp / "broker.log",
        )  # fmt: skip
        wait_until_up(emulator_url + "/")
        wait_until_up(broker_url + "/livez")

        cf = CloudflareImages(f"{emulator_url}/client/v4", ACCOUNT, TOKEN, timeout=30)
        stack.callback(cf.close)

        # One client for every load thread: its connection pool is shared and thread-safe.
        cf_call = CloudflareImages(
            cf.api_base, ACCOUNT, TOKEN, timeout=30, max_retries=0, pool_size=64
        )
        stack.callback(cf_call.close)

        def direct(session: requests.Session) -> None:
            expiry = datetime.now(UTC) + timedelta(minutes=30)
            cf_call.direct_upload(creator="u_bench", expiry=expiry, metadata={"k": "v"})

        headers = {"Authorization": f"Bearer {secret}"}

        def brokered(session: requests.Session) -> None:
            response = session.post(
                f"{broker_url}/api/v1/uploads",
                json={"metadata": {"k": "v"}},
                headers=headers,
                timeout=30,
            )
            if response.status_code != 201:
                raise RuntimeError(f"{response.status_code}: {response.text[:200]}")

        run_load(direct, 2, 0.5)  # warm up both servers and their connection pools
        run_load(brokered, 2, 0.5)
        print(
            f"broker: gunicorn {opts.workers} workers x {opts.threads} threads, "
            f"{database_url.split(':', 1)[0]}; {opts.seconds:g}s per row"
        )
        header = (
            f"{'clients':>7} {'target':<9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'errors':>6}   {'added p50':>9} {'added p99':>9}"
        )
        print(header)
        print("-" * len(header))
        for clients in counts:
            results = {}
            for name, call in (("emulator", direct), ("broker", brokered)):
                latencies, failed = run_load(call, clients, opts.seconds)
                results[name] = (latencies, failed)
            base50 = percentile(results["emulator"][0], 50)
            base99 = percentile(results["emulator"][0], 99)
            for name, (latencies, failed) in results.items():
                p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
                added = f"{p50 - base50:>9.1f} {p99 - base99:>9.1f}" if name == "broker" else ""
                print(
                    f"{clients:>7} {name:<9} {len(latencies) / opts.seconds:>8.0f} "
                    f"{p50:>8.1f} {p99:>8.1f} {failed:>6}   {added}"
                )


if __name__ == "__main__":
    main()

"""Benchmark: how far the broker scales past Cloudflare's global limit (`make bench`; not a test).

Prints, side by side in one run:

1. batch API off (the global budget binds): the sustained create rate the budget allows, and
   completion p95 (file sent → upload `ready`) for a burst of creates whose clients call
   `/complete` — the budget's background share keeps verification going during the burst;
2. batch API on: a steady create rate through two gunicorn instances (plus a worker) on the
   database(s) given, with 503s, upstream 429s, global API calls and create p50/p99;
3. the broker's own cost per request, in-process: a bare route on the broker app vs the same
   route on a plain Flask app (access log off, and on), and `/i/<id>/<variant>` vs the bare
   route on the broker with the same bearer token. `--skip 1,2` runs this part alone.

Defaults are the issue's full configuration (600-create burst; 40 creates/s for 60 s, on
PostgreSQL when BENCH_DATABASE_URL points at one, and SQLite; `--databases` picks). Every part
runs on a database of its own, created for it and dropped after (BENCH_DATABASE_URL only says
which PostgreSQL server, and which database to connect to while creating them). Shorter runs:
`--burst 200 --rate 40 --seconds 15`. Window and budget of part 1 are scaled by --scale (the
same calls per second as 1000 / 300 s, in a shorter window) so the ceiling shows in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.bench_uploads import (  # noqa: E402
    ACCOUNT,
    BIN,
    TOKEN,
    broker_settings,
    free_port,
    percentile,
    prepare_broker,
    start,
    wait_until_up,
)


def _png() -> bytes:
    from broker.emulator.testing import make_image

    return make_image(32, 24)


def start_emulator(stack: ExitStack, tmp: Path, **env: str) -> str:
    """Start the emulator under gunicorn; return its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start(
        stack,
        [str(BIN / "gunicorn"), "-w", "1", "-k", "gthread", "--threads", "64",
         "-b", f"127.0.0.1:{port}", "broker.emulator:create_app()"],
        {
            "EMULATOR_DATA_DIR": str(tmp / "emulator"),
            "EMULATOR_PUBLIC_URL": url,
            "EMULATOR_ACCOUNT_ID": ACCOUNT,
            "EMULATOR_API_TOKEN": TOKEN,
            "EMULATOR_CONTROL_ENABLED": "true",
            **env,
        },
        tmp / "emulator.log",
    )  # fmt: skip
    wait_until_up(url + "/")
    return url


def start_broker(
    stack: ExitStack, tmp: Path, settings: dict[str, Any], instances: int, worker: bool
) -> list[str]:
    """Start `instances` gunicorn servers of the broker (and a worker); return their URLs."""
    env = {f"BROKER_{k}": v if isinstance(v, str) else json.dumps(v) for k, v in settings.items()}
    urls = []
    for n in range(instances):
        port = free_port()
        start(
            stack,
            # The web tier's own settings (gunicorn.conf.py, as deployed): 2 processes of 8
            # threads each, each process warmed up before it takes requests.
            [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{port}",
             "wsgi:app"],
            {**env, "WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "8"},
            tmp / f"broker{n}.log",
        )  # fmt: skip
        urls.append(f"http://127.0.0.1:{port}")
    if worker:
        start(stack, [str(BIN / "flask"), "--app", "broker", "worker"], env, tmp / "worker.log")
    for n, url in enumerate(urls):
        try:
            # Two gunicorn masters and a worker import the app at once: slow on a loaded machine.
            wait_until_up(url + "/livez", timeout=90)
        except SystemExit:
            print((tmp / f"broker{n}.log").read_text()[-3000:], file=sys.stderr)
            raise
    return urls


def bearers(settings: dict[str, Any], users: int) -> list[str]:
    """Create `users` more users on the (migrated) database; return their bearer tokens."""
    import secrets

    from broker import create_app
    from broker.auth import tokens
    from broker.auth import users as accounts
    from broker.platform.db import db

    app = create_app(dict(settings))
    found = []
    with app.app_context():
        for _ in range(users):
            user = accounts.create_user(
                db.session, f"bench{secrets.token_hex(4)}", "bench password long enough"
            )
            db.session.commit()
            found.append(tokens.issue(db.session, user, "bench").secret)
            db.session.commit()
        db.engine.dispose()
        app.extensions["budget"].engine.dispose()
    return found


def fresh_database(stack: ExitStack, url: str | None, folder: Path, label: str) -> str:
    """A new, empty database for one part's run, gone when `stack` closes.

    PostgreSQL (`url`, whose database serves only to connect): `CREATE DATABASE` beside it,
    dropped afterwards; otherwise a new SQLite file in `folder`. A database holding an earlier
    run's pending uploads would spend the budget's background share on their expiry checks.
    """
    if not url:
        return f"sqlite:///{folder}/{label}.sqlite3"
    import secrets

    import sqlalchemy as sa

    base = sa.make_url(url)
    name = f"{base.database}_{label}_{secrets.token_hex(4)}".lower()
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    stack.callback(drop)
    return base.set(database=name).render_as_string(hide_password=False)


def counters(emulator_url: str) -> dict[str, Any]:
    """The emulator's request counters (global API vs batch host, 429s)."""
    result: dict[str, Any] = requests.get(f"{emulator_url}/_emulator/counters", timeout=10).json()
    return result


def paced(rate: float, seconds: float, action: Any, threads: int = 32) -> None:
    """Call `action(i)` `rate` times per second for `seconds`, from a pool of threads."""
    total = int(rate * seconds)
    started = time.monotonic()
    lock = threading.Lock()
    next_index = [0]

    def run() -> None:
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= total:
                return
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            action(i)

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


# -- part 1: batch off, the global budget binds -------------------------------------------------


def part1(tmp: Path, postgres: str | None, burst: int, scale: float) -> dict[str, float]:
    """Ceiling (creates/s) and completion p95 during a burst, with the batch API off."""
    (tmp / "p1").mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        database_url = fresh_database(stack, postgres, tmp / "p1", "p1")
        emulator_url = start_emulator(stack, tmp / "p1")
        window = max(10, int(300 / scale))
        settings = {
            **broker_settings(tmp / "p1", emulator_url, database_url),
            "CLOUDFLARE_BATCH": "off",
            "UPSTREAM_BUDGET": int(1000 / scale),
            "UPSTREAM_BUDGET_WINDOW": window,
            "UPSTREAM_BACKGROUND_RESERVE": int(200 / scale),
            "UPSTREAM_BACKGROUND_SHARE": int(200 / scale),
            "WORKER_POLL_INTERVAL": 0.2,
        }
        secret = prepare_broker(settings)
        urls = start_broker(stack, tmp / "p1", settings, 2, worker=True)
        headers = {"Authorization": f"Bearer {secret}"}
        png = _png()
        created: dict[int, tuple[str, float]] = {}
        refused = [0]
        lock = threading.Lock()
        started = time.monotonic()

        def create_and_send(i: int) -> None:
            with requests.Session() as http:
                r = http.post(f"{urls[i % 2]}/api/v1/uploads", json={}, headers=headers, timeout=30)
                if r.status_code != 201:
                    with lock:
                        refused[0] += 1
                    return
                body = r.json()
                http.post(body["upload_url"], files={"file": ("a.png", png)}, timeout=30)
                sent = time.monotonic()
                with lock:
                    created[i] = (body["id"], sent)
                http.post(
                    f"{urls[i % 2]}/api/v1/uploads/{body['id']}/complete",
                    headers=headers,
                    timeout=30,
                )

        ready_at: dict[str, float] = {}
        burst_over = threading.Event()

        def watch() -> None:
            # Polls while the burst runs, so a completion is seen when it happens, not after.
            with requests.Session() as http:
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline:
                    with lock:
                        waiting = [uid for uid, _ in created.values() if uid not in ready_at]
                    if burst_over.is_set() and not waiting:
                        return
                    for upload_id in waiting:
                        r = http.get(
                            f"{urls[0]}/api/v1/uploads/{upload_id}", headers=headers, timeout=30
                        )
                        if r.ok and r.json()["status"] == "ready":
                            with lock:
                                ready_at[upload_id] = time.monotonic()
                    time.sleep(0.2)

        watcher = threading.Thread(target=watch)
        watcher.start()
        paced(burst / 2.0, 2.0, create_and_send)  # the burst: everything within 2 s
        burst_seconds = time.monotonic() - started
        burst_over.set()
        watcher.join()
        waits = [ready_at[uid] - sent for uid, sent in created.values() if uid in ready_at]
        # The ceiling: create as fast as the budget lets for two windows past the burst, and
        # count the second one only (the first still holds the burst's calls).
        ok: list[float] = []

        def create(i: int) -> None:
            r = requests.post(f"{urls[i % 2]}/api/v1/uploads", json={}, headers=headers, timeout=30)
            if r.status_code == 201:
                with lock:
                    ok.append(time.monotonic())

        t0 = time.monotonic()
        paced(20, 2 * window, create)
        steady_from = t0 + window
        ceiling = sum(1 for t in ok if t >= steady_from) / (time.monotonic() - steady_from)
        return {
            "burst": len(created),
            "burst_refused": refused[0],
            "burst_seconds": burst_seconds,
            "completion_p95": percentile(waits, 95) if waits else float("nan"),
            "completed": len(waits),
            "ceiling": ceiling,
            "window": window,
        }


# -- part 2: batch on, steady creates ---------------------------------------------------------


def part2(
    tmp: Path, postgres: str | None, rate: float, seconds: float, users: int
) -> dict[str, Any]:
    """Creates at `rate`/s for `seconds` through two gunicorn instances with the batch API, from
    `users` users in turn (one user's creates are serialised by its limits' lock), on a fresh
    PostgreSQL database beside `postgres`, or a fresh SQLite file without it."""
    with ExitStack() as stack:
        database_url = fresh_database(stack, postgres, tmp, "p2")
        emulator_url = start_emulator(stack, tmp)
        settings = {
            **broker_settings(tmp, emulator_url, database_url),
            "CLOUDFLARE_BATCH": "auto",
            "CLOUDFLARE_BATCH_BASE": f"{emulator_url}/batch",
            # The real budget: the batch API must keep creates off it.
            "UPSTREAM_BUDGET": 1000,
        }
        secrets = [prepare_broker(settings), *bearers(settings, users - 1)]
        urls = start_broker(stack, tmp, settings, 2, worker=True)
        requests.post(f"{emulator_url}/_emulator/counters/reset", timeout=10)
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        samples: dict[int, str] = {}
        lock = threading.Lock()

        def create(i: int) -> None:
            t0 = time.perf_counter()
            auth = {"Authorization": f"Bearer {secrets[i % len(secrets)]}"}
            try:
                r = requests.post(
                    f"{urls[i % 2]}/api/v1/uploads", json={}, headers=auth, timeout=30
                )
                status, text = r.status_code, r.text
            except requests.RequestException as exc:
                status, text = 0, repr(exc)
            if status != 201:
                with lock:
                    samples.setdefault(status, text[:300])
            ms = (time.perf_counter() - t0) * 1000
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 201:
                    latencies.append(ms)

        paced(rate, seconds, create, threads=64)
        seen = counters(emulator_url)
        return {
            "sent": sum(statuses.values()),
            "created": statuses.get(201, 0),
            "503": statuses.get(503, 0),
            "other_errors": sum(v for k, v in statuses.items() if k not in (201, 503)),
            "errors": {k: (v, samples.get(k, "")) for k, v in statuses.items() if k != 201},
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "upstream_429": seen.get("throttled", 0),
            "global_calls": seen.get("global_api", 0),
            "token_fetches": seen["counters"].get("batch_token", 0),
            # Calls off the batch host other than token fetches, by endpoint: the worker's key sync
            # (global API) and the start-up probe of the emulator ("unknown", not an API call).
            "other_global": {
                name: n
                for name, n in seen["counters"].items()
                if n and name != "batch_token" and not name.startswith("batch")
            },
            "batch_calls": seen.get("batch", 0),
        }


# -- part 3: per-request overhead, in process ---------------------------------------------------

ROUNDS = 40


def part3(tmp: Path) -> dict[str, float]:
    """Best-of-rounds CPU time per request: broker bare vs plain Flask bare (with the access
    log line off, as before, and on), `/i/` vs the broker's bare route with the same bearer.

    The thread's CPU time, not the wall clock: on a shared machine another process taking the
    core would otherwise count as the broker's cost."""
    import logging

    from flask import Flask
    from werkzeug.test import EnvironBuilder

    from broker import create_app
    from tests.bench.bench_signing import _settings, seed

    db_url = f"sqlite:///{tmp}/p3.sqlite3"
    app = create_app(_settings(db_url, str(tmp / "p3")))
    app.add_url_rule("/bench/bare", "bench_bare", lambda: "ok")
    data = seed(app)
    plain = Flask("plain")
    plain.add_url_rule("/bench/bare", "bare", lambda: "ok")
    bare_env = EnvironBuilder(path="/bench/bare").get_environ()
    auth = {"HTTP_AUTHORIZATION": f"Bearer {data['bearer']}"}
    redirect_env = EnvironBuilder(path=f"/i/{data['ids'][0]}/thumb").get_environ()
    redirect_env.update(auth)
    bare_auth_env = {**bare_env, **auth}
    # The access log at its default level (INFO), written where it costs no terminal.
    logger = logging.getLogger("broker")
    handler = next(h for h in logger.handlers if isinstance(h, logging.StreamHandler))

    def sink(*_: Any) -> None:
        return None

    def per_request(target: Any, env: dict[str, Any], n: int) -> float:
        t0 = time.thread_time()
        for _ in range(n):
            b"".join(target(dict(env), sink))
        return (time.thread_time() - t0) / n

    def logged(env: dict[str, Any], n: int, devnull: Any) -> float:
        level, stream = logger.level, handler.setStream(devnull)
        logger.setLevel(logging.INFO)
        try:
            return per_request(app, env, n)
        finally:
            logger.setLevel(level)
            handler.setStream(stream)

    best = {"broker": 1e9, "plain": 1e9, "redirect": 1e9, "bare_auth": 1e9, "logged": 1e9}
    with open(os.devnull, "w") as devnull:
        for _ in range(ROUNDS):  # interleaved rounds: the same machine load for every side
            best["broker"] = min(best["broker"], per_request(app, bare_env, 200))
            best["plain"] = min(best["plain"], per_request(plain, bare_env, 200))
            best["logged"] = min(best["logged"], logged(bare_env, 200, devnull))
            best["redirect"] = min(best["redirect"], per_request(app, redirect_env, 100))
            best["bare_auth"] = min(best["bare_auth"], per_request(app, bare_auth_env, 100))
    return best


def main() -> int:
    """Run the three parts and print them side by side."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=600, help="part 1: creates in the burst")
    parser.add_argument("--scale", type=float, default=10, help="part 1: budget window / N")
    parser.add_argument("--rate", type=float, default=40, help="part 2: creates per second")
    parser.add_argument("--seconds", type=float, default=60, help="part 2: seconds of load")
    parser.add_argument("--users", type=int, default=40, help="part 2: users creating in turn")
    parser.add_argument("--skip", default="", help="parts to skip, e.g. 1,2")
    parser.add_argument(
        "--databases",
        default="postgresql,sqlite",
        help="part 2: which of postgresql (BENCH_DATABASE_URL), sqlite to run",
    )
    opts = parser.parse_args()
    skip = {p.strip() for p in opts.skip.split(",") if p.strip()}
    postgres = os.environ.get("BENCH_DATABASE_URL")
    # BENCH_KEEP=1 keeps the servers' logs (the folder is printed) to find out what went wrong.
    keep = os.environ.get("BENCH_KEEP")
    with ExitStack() as cleanup:
        tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
        if keep:
            print(f"logs in {tmp}")
        else:
            cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
        if "1" not in skip:
            one = part1(tmp / "one", postgres, opts.burst, opts.scale)
            print(
                f"1. batch off, budget {int(1000 / opts.scale)} / {one['window']} s "
                f"(1000 / 300 s scaled by {opts.scale:g}):"
            )
            print(
                f"   ceiling {one['ceiling']:.2f} creates/s sustained (the budget's interactive "
                f"side allows {800 / 300:.2f}/s)"
            )
            print(
                f"   burst of {one['burst']} creates ({one['burst_refused']} refused) in "
                f"{one['burst_seconds']:.1f} s: completion p95 {one['completion_p95']:.1f} s "
                f"(target ≤ 10 s; before the two-sided budget 111 s), "
                f"{one['completed']} completed"
            )
        if "2" not in skip:
            wanted = {d.strip().lower() for d in opts.databases.split(",")}
            databases = [("SQLite", None)] if "sqlite" in wanted else []
            if postgres and "postgresql" in wanted:
                databases.insert(0, ("PostgreSQL", postgres))
            print(
                f"2. batch on: {opts.rate:g} creates/s for {opts.seconds:g} s from {opts.users} "
                "users, 2 gunicorn + worker"
            )
            print(
                f"   {'database':<10} {'sent':>6} {'201':>6} {'503':>5} {'other':>5} "
                f"{'p50 ms':>7} {'p99 ms':>7} {'429 up':>6} {'global':>6} {'tokens':>6} "
                f"{'batch':>6}"
            )
            for label, url in databases:
                run = tmp / f"two-{label}"
                run.mkdir()
                two = part2(run, url, opts.rate, opts.seconds, opts.users)
                print(
                    f"   {label:<10} {two['sent']:>6} {two['created']:>6} {two['503']:>5} "
                    f"{two['other_errors']:>5} {two['p50']:>7.0f} {two['p99']:>7.0f} "
                    f"{two['upstream_429']:>6} {two['global_calls']:>6} "
                    f"{two['token_fetches']:>6} {two['batch_calls']:>6}"
                )
                for status, (count, sample) in two["errors"].items():
                    print(f"   {'':<10} {count} x {status}: {sample}")
                if two["other_global"]:
                    print(
                        f"   {'':<10} calls off the batch host besides tokens: "
                        f"{two['other_global']}"
                    )
            print("   targets: 0 x 503, 0 upstream 429, global calls = token fetches, p99 ≤ 250 ms")
        if "3" not in skip:
            three = part3(tmp)
            cost = three["broker"] / three["plain"]
            share = three["bare_auth"] / three["redirect"]
            print(f"3. CPU time per request, in process (best of {ROUNDS} interleaved rounds):")
            print(
                f"   bare route: broker {three['broker'] * 1e6:.0f} µs vs plain Flask "
                f"{three['plain'] * 1e6:.0f} µs = {cost:.2f}x (target ≤ 1.5x)"
            )
            print(
                f"   the same with the access log line on (LOG_LEVEL=INFO, to /dev/null): "
                f"{three['logged'] * 1e6:.0f} µs = {three['logged'] / three['plain']:.2f}x"
            )
            print(
                f"   /i/<id>/<variant> {1 / three['redirect']:,.0f} req/s vs the bare route with "
                f"the same bearer {1 / three['bare_auth']:,.0f} req/s = {share:.0%} (target ≥ 60 %)"
                f"; vs the bare route without one {three['broker'] / three['redirect']:.0%}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

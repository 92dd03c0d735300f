"""Password checks are bounded per process: a flood of token requests (any usernames, any
addresses, 1 KiB passwords) keeps the process's memory bounded and its other routes answering.

Argon2id with the production parameters needs 64 MiB per check in progress. The memory test runs
the broker as production does (gunicorn, BROKER_ENV=production, PostgreSQL or SQLite) and reads
the worker's peak resident memory from /proc.
"""

from __future__ import annotations

import re
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from flask import Flask

from broker.auth import passwords
from tests.factories import production_env
from tests.system.topology import BIN, listening_socket, topology, wait_http

KIB_PASSWORD = "p" * 1024


def test_checks_past_the_bound_wait_then_get_503_with_retry_after(make_app) -> None:
    app: Flask = make_app(PASSWORD_HASH_CONCURRENCY=1)
    body = {"username": "nobody", "password": KIB_PASSWORD, "device_name": "x"}
    with app.app_context():
        held = threading.Event()
        release = threading.Event()

        def hold_the_only_slot() -> None:
            with app.app_context(), passwords._hashing_slot():
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold_the_only_slot)
        holder.start()
        try:
            assert held.wait(10)
            busy = app.test_client().post("/api/v1/auth/tokens", json=body)
        finally:
            release.set()
            holder.join(10)
    assert busy.status_code == 503
    assert busy.get_json()["error"]["code"] == "server_busy"
    # At least a second; Flask-Limiter raises it to its window's reset on a limited route.
    assert int(busy.headers["Retry-After"]) >= 1
    # The slot is free again: the next check runs (and the password is wrong).
    assert app.test_client().post("/api/v1/auth/tokens", json=body).status_code == 401


def _peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match, status
    return int(match.group(1)) / 1024


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_32_concurrent_token_requests_keep_the_process_bounded(
    migrated: str, tmp_path: Path
) -> None:
    # Rotating addresses behind a proxy pass any per-address limit: model that directly.
    env = production_env(migrated, str(tmp_path), BROKER_AUTH_RATE_LIMIT="10000 per minute")
    sock = listening_socket()
    with sock, topology(tmp_path, env) as topo:
        bind = f"--bind=fd://{sock.fileno()}"
        web = topo.start(
            "web",
            [str(BIN / "gunicorn"), "--workers=1", "--threads=40", bind, "wsgi:app"],
            pass_fds=(sock.fileno(),),
        )
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        wait_http(f"{base}/livez", process=web)
        (worker,) = _children(web.pid)
        before = _peak_rss_mib(worker)

        def token_request(n: int) -> requests.Response:
            body = {"username": f"u{n}-{secrets.token_hex(4)}", "password": KIB_PASSWORD}
            return requests.post(
                f"{base}/api/v1/auth/tokens", json={**body, "device_name": "x"}, timeout=60
            )

        with ThreadPoolExecutor(32) as pool:
            answers = pool.map(token_request, range(32))
            # While the flood is checked, the other routes answer.
            livez = requests.get(f"{base}/livez", timeout=10)
            spec = requests.get(f"{base}/api/v1/openapi.json", timeout=10)
            statuses = [(a.status_code, a.headers.get("Retry-After")) for a in answers]
        peak = _peak_rss_mib(worker)
    assert livez.status_code == 200 and spec.status_code == 200
    assert {s for s, _ in statuses} <= {401, 503}, statuses
    assert 401 in {s for s, _ in statuses}  # checks did run
    assert all(r and int(r) >= 1 for s, r in statuses if s == 503)
    # Two checks at a time (the default): 2 x 64 MiB on top of the process, not 32 x 64 MiB.
    assert peak < 300, f"worker peak {peak:.0f} MiB (was {before:.0f} MiB before the flood)"

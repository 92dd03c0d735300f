"""Benchmark signed delivery URLs: in-process minting, a 1000-URL batch, the `/i/` redirect.

    .venv/bin/python tests/bench/bench_signing.py      (or `make bench`)

Prints, each next to its floor or baseline:
1. URLs minted per second in-process (Minter.mint over real upload rows) vs a bare
   `hmac.new(key, msg, sha256).hexdigest()` loop over the same strings-to-sign;
2. the server time of `POST /api/v1/images/urls` with 1000 pairs (median of runs);
3. requests per second of `GET /i/<id>/<variant>` under gunicorn vs a bare endpoint on the same
   app served the same way (and, for context, a plain one-route Flask app).
Exits non-zero when a target is missed. Everything runs on a throwaway SQLite database.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from flask import Flask  # noqa: E402

N_IMAGES = 1000
TARGET_INPROCESS = 0.50
TARGET_BATCH_MS = 50.0
TARGET_REDIRECT = 0.60
LOAD_SECONDS = float(os.environ.get("BENCH_LOAD_SECONDS", "4"))
LOAD_CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "8"))


def _settings(db_url: str, instance: str) -> dict[str, Any]:
    return {
        "ENV": "testing",
        "SECRET_KEY": "bench-secret-key-bench-secret-key",
        "DATABASE_URL": db_url,
        "INSTANCE_PATH": instance,
        "LOG_LEVEL": "WARNING",
        "WORKER_INLINE": False,
        "CLOUDFLARE_ACCOUNT_ID": "bench",
        "CLOUDFLARE_API_TOKEN": "bench",
        "CLOUDFLARE_ACCOUNT_HASH": "benchhash0000000000000",
        "CLOUDFLARE_API_BASE": "http://127.0.0.1:9/client/v4",  # never called
        "CLOUDFLARE_BATCH": "off",
    }


def gunicorn_app() -> Flask:
    """Build the broker from BROKER_* (for gunicorn) with a bare endpoint beside `/i/`."""
    from broker import create_app

    app = create_app()

    def bare() -> str:
        return "ok"

    app.add_url_rule("/bench/bare", "bench_bare", bare)
    return app


def plain_app() -> Flask:
    """Build a one-route Flask app (the framework's own floor)."""
    app = Flask("plain")
    app.add_url_rule("/bench/bare", "bare", lambda: "ok")
    return app


def seed(app: Flask) -> dict[str, Any]:
    """Migrate the database and add a user, a signing key and N ready private uploads."""
    from flask_migrate import upgrade

    from broker.auth import tokens
    from broker.auth.models import User
    from broker.images.models import SigningKey
    from broker.platform.db import db, utcnow
    from broker.uploads.models import Upload

    with app.app_context():
        upgrade()
        user = User(username="bench", username_key="bench", password_hash="x")
        db.session.add(user)
        db.session.add(SigningKey(name="default", value="k" * 43))
        db.session.flush()
        base = f"https://imagedelivery.net/{app.config['CLOUDFLARE_ACCOUNT_HASH']}"
        ids = []
        for i in range(N_IMAGES):
            image_id = f"{i:08x}-9509-446b-8c69-c81bfeac0a01"
            upload = Upload(
                user_id=user.id,
                image_id=image_id,
                status="ready",
                require_signed_urls=True,
                expires_at=utcnow() + timedelta(hours=1),
                variants=[f"{base}/{image_id}/{v}" for v in ("public", "thumb", "medium")],
            )
            db.session.add(upload)
            db.session.flush()
            ids.append(upload.id)
        secret = tokens.issue(db.session, user, "bench").secret
        session_token = user.session_token
        db.session.commit()
    return {"ids": ids, "bearer": secret, "session_token": session_token}


def bench_inprocess(app: Flask, ids: list[str]) -> tuple[float, float]:
    """Return (URLs/s through Minter.mint, bare hmac.new/s over the same strings)."""
    from broker.images import urls
    from broker.platform.db import db

    with app.app_context():
        rows = list(urls.load_many(db.session, ids, urls.Caller(0, True)).values())
        variant = urls.lookup_variant("thumb")
        minter = urls.Minter(3600, time.time())
        key = b"k" * 43
        strings = [
            f"{minter.delivery(r).path(r.image_id, 'thumb')}?exp={minter.exp}".encode()
            for r in rows
        ]
        # Many short interleaved runs, best of each: the floor under a noisy, shared machine.
        rounds = 10
        best_mint = best_bare = float("inf")
        for _ in range(30):
            started = time.perf_counter()
            for _ in range(rounds):
                for row in rows:
                    minter.mint(row, variant)
            best_mint = min(best_mint, time.perf_counter() - started)
            started = time.perf_counter()
            for _ in range(rounds):
                for s in strings:
                    hmac.new(key, s, hashlib.sha256).hexdigest()
            best_bare = min(best_bare, time.perf_counter() - started)
    n = rounds * len(rows)
    return n / best_mint, n / best_bare


def bench_batch(app: Flask, ids: list[str], bearer: str) -> float:
    """Return the median server time (ms) of a 1000-pair batch request.

    Timed around the app's WSGI callable, so the test client's own work (encoding the request,
    decoding the answer) is not counted; everything the server does (routing, auth, parsing,
    the query, minting, serialising) is.
    """
    inner = app.wsgi_app
    times: list[float] = []

    def timed(environ: dict[str, Any], start_response: Any) -> Any:
        started = time.perf_counter()
        body = list(inner(environ, start_response))
        times.append((time.perf_counter() - started) * 1000)
        return body

    app.wsgi_app = timed  # type: ignore[method-assign]
    client = app.test_client()
    payload = {"items": [{"id": i, "variant": "thumb"} for i in ids]}
    headers = {"Authorization": f"Bearer {bearer}"}
    try:
        for _ in range(25):
            response = client.post("/api/v1/images/urls", json=payload, headers=headers)
            assert response.status_code == 200, response.get_data(as_text=True)
            assert len(response.get_json()["items"]) == N_IMAGES
    finally:
        app.wsgi_app = inner  # type: ignore[method-assign]
    return statistics.median(times[5:])  # the first runs warm caches up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_response(sock: socket.socket, buf: bytearray) -> int:
    """Read one HTTP/1.1 response off a keep-alive socket; return its status."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        rest += chunk
    buf[:] = rest[length:]
    return int(head.split(b" ", 2)[1])


def load(port: int, paths: list[str], headers: str, expect: int) -> float:
    """Drive keep-alive GETs over LOAD_CONNECTIONS connections; return requests per second."""
    requests = [f"GET {p} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode() for p in paths]
    stop = time.perf_counter() + LOAD_SECONDS + 1.0
    warm = time.perf_counter() + 1.0
    counts = [0] * LOAD_CONNECTIONS
    errors: list[str] = []

    def worker(n: int) -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        buf = bytearray()
        i = n
        try:
            while (now := time.perf_counter()) < stop:
                sock.sendall(requests[i % len(requests)])
                status = _read_response(sock, buf)
                if status != expect:
                    errors.append(f"status {status}")
                    return
                if now >= warm:
                    counts[n] += 1
                i += 1
        except OSError as exc:
            errors.append(repr(exc))
        finally:
            sock.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(LOAD_CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"load failed: {errors[0]}")
    return sum(counts) / LOAD_SECONDS


def serve(target: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """Start gunicorn (one gthread worker) on a free port; wait until it answers."""
    port = _free_port()
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "gunicorn"),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--worker-class",
            "gthread",
            "--threads",
            "4",
            "--keep-alive",
            "30",
            target,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"gunicorn {target} did not start")


def bench_redirect(settings: dict[str, Any], data: dict[str, Any]) -> dict[str, float]:
    """Return requests/s of /i/, the bare endpoint beside it, and a plain Flask app."""
    from broker import create_app

    app = create_app(settings)
    serializer = app.session_interface.get_signing_serializer(app)  # type: ignore[attr-defined]
    cookie = serializer.dumps(
        {"_user_id": data["session_token"], "_fresh": True, "login_at": int(time.time())}
    )
    headers = f"Cookie: session={cookie}\r\n"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
        **{f"BROKER_{k}": str(v) for k, v in settings.items()},
    }
    results = {}
    runs = [
        ("redirect", "tests.bench.bench_signing:gunicorn_app()", "/i/{id}/thumb", 302),
        ("bare", "tests.bench.bench_signing:gunicorn_app()", "/bench/bare", 200),
        ("plain", "tests.bench.bench_signing:plain_app()", "/bench/bare", 200),
    ]
    for name, target, path, expect in runs:
        process, port = serve(target, env)
        try:
            paths = [path.format(id=i) for i in data["ids"][:500]]
            results[name] = load(port, paths, headers, expect)
        finally:
            process.terminate()
            process.wait(timeout=10)
    return results


def main() -> int:
    """Run the three benchmarks and print them next to their targets."""
    from broker import create_app

    failed = False
    with tempfile.TemporaryDirectory(prefix="bench-signing-") as tmp:
        settings = _settings(f"sqlite:///{tmp}/bench.sqlite3", tmp)
        app = create_app(settings)
        data = seed(app)

        minted, bare = bench_inprocess(app, data["ids"])
        ratio = minted / bare
        ok = ratio >= TARGET_INPROCESS
        failed |= not ok
        print(
            f"in-process: {minted:,.0f} URLs/s minted vs {bare:,.0f}/s bare hmac.new "
            f"= {ratio:.0%} (target >= {TARGET_INPROCESS:.0%}) {'ok' if ok else 'MISSED'}"
        )

        batch_ms = bench_batch(app, data["ids"], data["bearer"])
        ok = batch_ms <= TARGET_BATCH_MS
        failed |= not ok
        print(
            f"batch: 1000 URLs in {batch_ms:.1f} ms server time (median; target <= "
            f"{TARGET_BATCH_MS:.0f} ms) {'ok' if ok else 'MISSED'}"
        )

        rates = bench_redirect(settings, data)
        ratio = rates["redirect"] / rates["bare"]
        ok = ratio >= TARGET_REDIRECT
        failed |= not ok
        print(
            f"redirect: /i/<id>/<variant> {rates['redirect']:,.0f} req/s vs bare endpoint "
            f"{rates['bare']:,.0f} req/s on the same app = {ratio:.0%} "
            f"(target >= {TARGET_REDIRECT:.0%}) {'ok' if ok else 'MISSED'}; "
            f"plain one-route Flask app: {rates['plain']:,.0f} req/s "
            f"(gunicorn 1 gthread worker x4, {LOAD_CONNECTIONS} keep-alive connections, "
            f"{os.cpu_count()} CPUs shared with the load generator)"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The worker: a real `flask worker` process killed mid-delivery, SIGTERM shutdown, the inline
worker thread, `flask worker --once`. (Leases: tests/platform; each job: its feature's tests.)"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import requests
import sqlalchemy as sa

from broker import worker
from broker.platform import wakeup
from broker.platform.db import db, utcnow
from broker.webhooks import sending
from broker.webhooks.models import WebhookDelivery
from tests.factories import add_webhook_endpoint, queue_events

ROOT = Path(__file__).resolve().parent.parent


def _fill(app, receiver_url, n):
    """One endpoint (the receiver) and `n` events for it."""
    add_webhook_endpoint(app, receiver_url)
    queue_events(app, n)


def _env(app, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(
        BROKER_ENV="testing",
        BROKER_SECRET_KEY="test-secret-key-not-for-production",
        BROKER_DATABASE_URL=app.config["DATABASE_URL"],
        BROKER_INSTANCE_PATH=str(tmp_path),
        BROKER_WEBHOOK_ALLOW_PRIVATE="true",
        BROKER_WORKER_POLL_INTERVAL="0.2",
        BROKER_LOG_LEVEL="INFO",
        # The same key as the test's app: the worker decrypts the endpoint's secret to sign.
        BROKER_ENCRYPTION_KEYS=json.dumps(app.config["ENCRYPTION_KEYS"]),
    )
    for key in (
        "CLOUDFLARE_API_BASE",
        "CLOUDFLARE_ACCOUNT_ID",
        "CLOUDFLARE_API_TOKEN",
        "CLOUDFLARE_ACCOUNT_HASH",
    ):
        env[f"BROKER_{key}"] = str(app.config[key])
    return env


def _start_worker(app, tmp_path):
    with open(tmp_path / "worker.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "broker", "worker"],
            cwd=ROOT,
            env=_env(app, tmp_path),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _log(tmp_path):
    return (tmp_path / "worker.log").read_text(errors="replace")


def test_worker_killed_mid_delivery_still_delivers_with_same_id(make_app, receiver, tmp_path):
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    _fill(app, receiver.url, 1)
    receiver.block = threading.Event()
    receiver.block.set()  # the receiver holds the first request open
    proc = _start_worker(app, tmp_path)
    try:
        assert receiver.arrived.wait(60), _log(tmp_path)
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    receiver.block.clear()
    receiver.release.set()
    with app.app_context():
        d = db.session.scalars(sa.select(WebhookDelivery)).one()
        assert d.status == "pending" and d.lease_holder is not None  # held by the dead worker
    # Nobody else takes it while the lease lasts; afterwards the next worker does.
    assert worker.run_once(app, worker_id="w2")["deliver_webhooks"] == 0
    later = utcnow() + timedelta(seconds=sending.LEASE_SECONDS + 1)
    assert worker.run_once(app, now=later, worker_id="w2")["deliver_webhooks"] == 1
    ids = [r.msg_id for r in receiver.requests]
    assert len(ids) == 2 and ids[0] == ids[1]
    with app.app_context():
        d = db.session.scalars(sa.select(WebhookDelivery)).one()
        assert d.status == "succeeded"


def test_sigterm_stops_the_worker_promptly(make_app, receiver, tmp_path):
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    _fill(app, receiver.url, 1)
    proc = _start_worker(app, tmp_path)
    try:
        assert receiver.arrived.wait(60)  # it is working
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        output = _log(tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert code == 0, output
    assert "stopped" in output


def test_inline_worker_thread_delivers_without_polling_delay(make_app, receiver):
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True, WORKER_POLL_INTERVAL=30)
    thread, stop = worker.start_inline(app)
    try:
        _fill(app, receiver.url, 1)  # emit wakes the thread
        assert receiver.arrived.wait(20)
    finally:
        stop.set()
        wakeup.notify_worker()
        thread.join(30)
    assert not thread.is_alive()


def _inline_threads() -> int:
    return sum(t.name == "broker-worker" and t.is_alive() for t in threading.enumerate())


def test_inline_worker_starts_with_the_first_request_once(make_app, receiver):
    """README: BROKER_WORKER_INLINE runs the worker in a thread of the web process (so `flask
    run` and gunicorn have one in development): started by the first request, once, and not
    by building the app or running a command."""
    app = make_app(WORKER_INLINE=True, WEBHOOK_ALLOW_PRIVATE=True, WORKER_POLL_INTERVAL=30)
    before = _inline_threads()
    assert app.test_cli_runner().invoke(args=["webhooks", "list"]).exit_code == 0
    assert worker.INLINE_KEY not in app.extensions and _inline_threads() == before
    client = app.test_client()
    try:
        assert client.get("/livez").status_code == 200
        running = app.extensions[worker.INLINE_KEY]
        assert running.thread.is_alive()
        assert client.get("/livez").status_code == 200
        assert worker.ensure_inline(app) is running  # what `make run` calls: no second thread
        assert _inline_threads() == before + 1
        _fill(app, receiver.url, 1)
        assert receiver.arrived.wait(20)  # and it works
    finally:
        app.extensions[worker.INLINE_KEY].close()
    assert not running.thread.is_alive()


def test_inline_worker_is_off_unless_asked(make_app):
    app = make_app()  # the tests' setting, as production's default: WORKER_INLINE off
    assert app.test_client().get("/livez").status_code == 200
    assert worker.INLINE_KEY not in app.extensions


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def _wait_for(lines: queue.Queue, needle: str, seen: list[str]) -> str:
    """Return the first line containing `needle` (lines before it go to `seen`)."""
    while True:
        line = lines.get(timeout=60)
        if needle in line:
            return line
        seen.append(line)


def test_flask_run_in_development_runs_the_worker_and_flask_commands_do_not(
    make_app, receiver, tmp_path
):
    """The way a developer starts it without `make run`: `flask db upgrade` starts no worker;
    `flask run` has one from its first request, which delivers a waiting webhook."""
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    _fill(app, receiver.url, 1)
    env = {**_env(app, tmp_path), "BROKER_ENV": "development"}
    flask = [sys.executable, "-m", "flask", "--app", "broker"]
    upgrade = subprocess.run(
        [*flask, "db", "upgrade"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert upgrade.returncode == 0, upgrade.stderr
    assert "broker.worker" not in upgrade.stderr  # its logger: "worker … started"
    assert not receiver.arrived.is_set()
    server = subprocess.Popen(
        [*flask, "run", "--port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(server.stderr, lines), daemon=True)
    reader.start()
    try:
        seen: list[str] = []
        url = re.search(r"http://127\.0\.0\.1:\d+", _wait_for(lines, "Running on", seen))
        assert url, seen
        assert not any("broker.worker" in line for line in seen), seen
        assert requests.get(f"{url.group()}/livez", timeout=30).status_code == 200
        assert "started" in _wait_for(lines, "broker.worker", seen)
        assert receiver.arrived.wait(60)
    finally:
        server.terminate()
        server.wait(30)
        reader.join(30)  # it ends with the stream
        server.stderr.close()


def test_worker_once_cli(make_app):
    app = make_app()
    result = app.test_cli_runner().invoke(args=["worker", "--once"])
    assert result.exit_code == 0 and "deliver_webhooks" in result.output

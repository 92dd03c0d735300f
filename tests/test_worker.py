"""The worker: leases across workers (PostgreSQL SKIP LOCKED, SQLite compare-and-set), a real
`flask worker` process killed mid-delivery, SIGTERM shutdown, the CLI and the admin API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from broker import worker
from broker.platform import leases, wakeup
from broker.platform.db import db, utcnow
from broker.webhooks import endpoints, outbox, sending
from broker.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent
from tests.webhook_receiver import receiver_fixture

_receiver = receiver_fixture  # the `receiver` fixture, for this module

ROOT = Path(__file__).resolve().parent.parent


def _fill(app, receiver_url, n):
    with app.app_context():
        endpoints.add_endpoint(db.session, receiver_url, ["*"], app.config)
        for i in range(n):
            outbox.emit(db.session, "upload.deleted", {"n": i})
        db.session.commit()


def _double_claim(first, second, receiver):
    """Two workers with their own connections race for 200 rows: each row goes to one."""
    _fill(first, receiver.url, 200)
    now = utcnow()
    claimed: dict[str, list[int]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def run(app, name):
        with app.app_context():
            barrier.wait()
            while True:
                got = leases.claim_and_commit(
                    db.session,
                    WebhookDelivery,
                    where=[WebhookDelivery.status == "pending"],
                    order_by=[WebhookDelivery.id],
                    limit=7,
                    owner=name,
                    now=now,
                    lease_seconds=60,
                )
                if not got:
                    break
                claimed[name] += got
            db.session.remove()

    pairs = ((first, "a"), (second, "b"))
    threads = [threading.Thread(target=run, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    both = claimed["a"] + claimed["b"]
    assert len(both) == len(set(both)) == 200
    with first.app_context():
        rows = db.session.execute(sa.select(WebhookDelivery.id, WebhookDelivery.lease_owner))
        owners = {row_id: owner for row_id, owner in rows}
    assert all(owners[i] == "a" for i in claimed["a"])
    assert all(owners[i] == "b" for i in claimed["b"])


def test_two_workers_never_double_claim(make_app, receiver):
    """On the suite's database (SQLite by default: compare-and-set claims)."""
    first = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    _double_claim(first, make_app(WEBHOOK_ALLOW_PRIVATE=True), receiver)


@pytest.mark.postgres
def test_two_workers_never_double_claim_on_postgresql(
    postgres_url, database_url, make_app, receiver
):
    """FOR UPDATE SKIP LOCKED: concurrent claims on PostgreSQL never overlap."""
    if database_url != postgres_url:
        pytest.skip("runs in the PostgreSQL pass of the suite (BROKER_TEST_DATABASE_URL)")
    first = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    with first.app_context():
        assert db.engine.dialect.name == "postgresql"
    _double_claim(first, make_app(WEBHOOK_ALLOW_PRIVATE=True), receiver)


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
        assert d.status == "pending" and d.lease_owner is not None  # held by the dead worker
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


def test_stop_releases_unstarted_deliveries(make_app, receiver):
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    _fill(app, receiver.url, 3)
    stop = threading.Event()
    stop.set()
    with app.app_context():
        sending.deliver_due(db.session, "w1", app.config, stop=stop)
        rows = db.session.scalars(sa.select(WebhookDelivery)).all()
        assert all(d.lease_owner is None and d.status == "pending" for d in rows)


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


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_add_list_rotate_disable_deliveries_redeliver(make_app, receiver):
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    runner = app.test_cli_runner()
    result = runner.invoke(args=["webhooks", "add", receiver.url, "--events", "upload.completed"])
    assert result.exit_code == 0, result.output
    assert "whsec_" in result.output
    endpoint_id = result.output.split()[1]
    assert endpoint_id in runner.invoke(args=["webhooks", "list"]).output
    result = runner.invoke(args=["webhooks", "rotate-secret", endpoint_id, "--window", "60"])
    assert result.exit_code == 0 and "whsec_" in result.output
    with app.app_context():
        e = db.session.scalars(sa.select(WebhookEndpoint)).one()
        assert e.previous_secret and e.previous_secret_until
        outbox.emit(db.session, "upload.completed", {"x": 1})
        db.session.commit()
    worker.run_once(app)
    out = runner.invoke(args=["webhooks", "deliveries", "--attempts"]).output
    assert "succeeded" in out and "#1" in out
    delivery_id = out.split()[0]
    result = runner.invoke(args=["webhooks", "redeliver", delivery_id])
    assert result.exit_code == 0
    worker.run_once(app)
    assert len(receiver.requests) == 2
    assert runner.invoke(args=["webhooks", "disable", endpoint_id]).exit_code == 0
    assert "disabled" in runner.invoke(args=["webhooks", "list"]).output
    strict = make_app().test_cli_runner()
    refused = strict.invoke(args=["webhooks", "add", "https://10.0.0.1/x", "--events", "*"])
    assert refused.exit_code != 0 and "non-public" in refused.output
    bad = runner.invoke(args=["webhooks", "add", receiver.url, "--events", "nope"])
    assert bad.exit_code != 0


def test_worker_once_cli(make_app):
    app = make_app()
    result = app.test_cli_runner().invoke(args=["worker", "--once"])
    assert result.exit_code == 0 and "deliver_webhooks" in result.output


# -- admin API ---------------------------------------------------------------------------------


def test_admin_api(make_app, make_user, bearer, receiver):
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    client = app.test_client()
    admin = bearer(app, make_user("root", is_admin=True))
    alice = bearer(app, make_user("alice"))
    base = "/api/v1/webhooks/endpoints"
    assert client.get(base, headers=alice).status_code == 403
    assert client.get(base).status_code == 401
    created = client.post(
        base, json={"url": receiver.url, "events": ["upload.completed"]}, headers=admin
    )
    assert created.status_code == 201
    body = created.get_json()
    assert body["secret"].startswith("whsec_")
    receiver.secret = body["secret"]
    listed = client.get(base, headers=admin).get_json()["items"]
    assert [e["id"] for e in listed] == [body["id"]] and "secret" not in listed[0]
    refused = client.post(
        base, json={"url": "https://169.254.169.254/", "events": ["*"]}, headers=admin
    )
    assert refused.status_code == 422
    assert (
        client.post(base, json={"url": receiver.url, "events": ["x"]}, headers=admin).status_code
        == 422
    )
    one = f"{base}/{body['id']}"
    assert client.get(one, headers=admin).get_json()["events"] == ["upload.completed"]
    assert client.get(f"{base}/nope", headers=admin).status_code == 404
    rotated = client.post(f"{one}/rotate-secret", json={"window_seconds": 600}, headers=admin)
    assert rotated.status_code == 200
    new_secret = rotated.get_json()["secret"]
    assert new_secret != body["secret"]

    with app.app_context():
        outbox.emit(db.session, "upload.completed", {"x": 1})
        db.session.commit()
    worker.run_once(app)
    # Both old and new secret verify during the window.
    from standardwebhooks.webhooks import Webhook

    got = receiver.requests[0]
    Webhook(new_secret).verify(got.body, got.headers)
    assert got.verified  # with the old one

    deliveries = client.get("/api/v1/webhooks/deliveries", headers=admin).get_json()["items"]
    assert deliveries[0]["status"] == "succeeded"
    did = deliveries[0]["id"]
    detail = client.get(f"/api/v1/webhooks/deliveries/{did}", headers=admin).get_json()
    assert detail["attempt_log"][0]["status_code"] == 204
    again = client.post(f"/api/v1/webhooks/deliveries/{did}/redeliver", headers=admin)
    assert again.status_code == 202 and again.get_json()["status"] == "pending"
    assert client.get("/api/v1/webhooks/deliveries/999999", headers=admin).status_code == 404
    q = client.get(
        f"/api/v1/webhooks/deliveries?status=pending&endpoint={body['id']}", headers=admin
    )
    assert [d["id"] for d in q.get_json()["items"]] == [did]
    off = client.patch(one, json={"active": False}, headers=admin)
    assert off.status_code == 200 and off.get_json()["active"] is False
    assert client.patch(one, json={"url": "https://10.1.1.1/"}, headers=admin).status_code == 422
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(WebhookAttempt)) == 1
        assert db.session.scalar(sa.select(sa.func.count()).select_from(WebhookEvent)) == 1


def test_worker_forgets_idempotency_keys_after_24_hours(app, make_user, bearer):
    user = make_user("alice")
    client = app.test_client()
    headers = {**bearer(app, user), "Idempotency-Key": "k-1"}
    assert client.post("/api/v1/uploads", json={}, headers=headers).status_code == 201
    from broker.uploads.models import IdempotencyKey

    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(IdempotencyKey)) == 1
    now = utcnow()
    assert worker.run_once(app, now=now + timedelta(hours=23))["purge_idempotency_keys"] == 0
    later = worker.run_once(app, now=now + timedelta(hours=25), worker_id="second")
    assert later["purge_idempotency_keys"] == 1
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(IdempotencyKey)) == 0

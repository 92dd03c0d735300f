"""`Idempotency-Key` on creating an upload: replay, another body, per user, in progress, a dead
claim, a failed request, a malformed key, expiry (by the worker too)."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from broker import worker
from broker.api import idempotency
from broker.api.models import IdempotencyKey
from broker.api.unit_of_work import UnitOfWork
from broker.platform.db import db, utcnow
from tests.factories import upload_rows

URL = "/api/v1/uploads"


def test_idempotent_replay_calls_cloudflare_once(app, client, alice, emulator) -> None:
    _, auth = alice
    headers = {**auth, "Idempotency-Key": "k-1"}
    first = client.post(URL, json={"metadata": {"a": 1}}, headers=headers)
    second = client.post(URL, json={"metadata": {"a": 1}}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert second.get_json() == first.get_json()
    assert second.headers["Location"] == first.headers["Location"]
    assert second.headers["Idempotent-Replayed"] == "true"
    assert emulator.counters()["direct_upload"] == 1
    assert len(upload_rows(app)) == 1


def test_same_key_with_another_body_is_refused(app, client, alice, emulator) -> None:
    _, auth = alice
    headers = {**auth, "Idempotency-Key": "k-2"}
    assert client.post(URL, json={"expires_in": 600}, headers=headers).status_code == 201
    other = client.post(URL, json={"expires_in": 900}, headers=headers)
    assert other.status_code == 422
    assert other.get_json()["error"]["code"] == "idempotency_key_reused"
    assert emulator.counters()["direct_upload"] == 1


def test_keys_are_per_user(app, client, alice, make_user, bearer, emulator) -> None:
    _, auth = alice
    bob = bearer(app, make_user("bob"))
    a = client.post(URL, json={}, headers={**auth, "Idempotency-Key": "shared"})
    b = client.post(URL, json={}, headers={**bob, "Idempotency-Key": "shared"})
    assert a.status_code == b.status_code == 201
    assert a.get_json()["id"] != b.get_json()["id"]
    assert emulator.counters()["direct_upload"] == 2


def test_same_key_while_the_first_runs_is_409(app, client, alice, emulator) -> None:
    user, auth = alice
    body = {"metadata": {"a": 1}}
    with app.test_request_context():
        # The first request has claimed the key and is waiting on Cloudflare.
        fp = idempotency.fingerprint("POST", URL, body)
        assert idempotency.claim_key(UnitOfWork(db.session), user.id, "slow", fp) is None
    response = client.post(URL, json=body, headers={**auth, "Idempotency-Key": "slow"})
    assert response.status_code == 409
    assert response.get_json()["error"]["code"] == "idempotency_in_progress"
    assert emulator.counters().get("direct_upload", 0) == 0


def test_a_claim_left_by_a_dead_request_is_taken_over(app, client, alice, emulator) -> None:
    user, auth = alice
    body = {"metadata": {"a": 1}}
    with app.test_request_context():
        fp = idempotency.fingerprint("POST", URL, body)
        long_ago = idempotency.utcnow() - idempotency.ABANDONED_AFTER * 2
        idempotency.claim_key(UnitOfWork(db.session), user.id, "dead", fp, now=long_ago)
    response = client.post(URL, json=body, headers={**auth, "Idempotency-Key": "dead"})
    assert response.status_code == 201


def test_a_failed_request_frees_its_key(app, client, alice, emulator) -> None:
    _, auth = alice
    headers = {**auth, "Idempotency-Key": "retry-me"}
    emulator.inject_fault("direct_upload", status=500, count=1)
    assert client.post(URL, json={}, headers=headers).status_code == 502
    retried = client.post(URL, json={}, headers=headers)
    assert retried.status_code == 201
    assert "Idempotent-Replayed" not in retried.headers


def test_malformed_key_is_400(app, client, alice) -> None:
    _, auth = alice
    response = client.post(URL, json={}, headers={**auth, "Idempotency-Key": "x" * 256})
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_idempotency_key"


def test_expired_keys_are_purged(app, client, alice, emulator) -> None:
    _, auth = alice
    client.post(URL, json={}, headers={**auth, "Idempotency-Key": "old"})
    with app.app_context():
        later = idempotency.utcnow() + idempotency.KEEP_FOR * 2
        assert idempotency.purge_expired(db.session, later) == 1
        db.session.commit()
        assert db.session.scalar(sa.select(sa.func.count()).select_from(IdempotencyKey)) == 0


def test_worker_forgets_idempotency_keys_after_24_hours(app, make_user, bearer):
    user = make_user("alice")
    client = app.test_client()
    headers = {**bearer(app, user), "Idempotency-Key": "k-1"}
    assert client.post("/api/v1/uploads", json={}, headers=headers).status_code == 201
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(IdempotencyKey)) == 1
    now = utcnow()
    assert worker.run_once(app, now=now + timedelta(hours=23))["purge_idempotency_keys"] == 0
    later = worker.run_once(app, now=now + timedelta(hours=25), worker_id="second")
    assert later["purge_idempotency_keys"] == 1
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(IdempotencyKey)) == 0

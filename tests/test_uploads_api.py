"""/api/v1/uploads against the emulator over real HTTP: what reaches Cloudflare, validation,
idempotency, limits, visibility, upstream failures and the shared budget."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from broker.auth.models import User
from broker.platform.db import db
from broker.uploads import idempotency
from broker.uploads.models import IdempotencyKey, Upload

URL = "/api/v1/uploads"


@pytest.fixture
def alice(app: Flask, make_user: Callable[..., User], bearer: Callable[..., dict[str, str]]):
    """Alice's user and bearer header."""
    user = make_user("alice")
    return user, bearer(app, user)


def _rows(app: Flask) -> list[Upload]:
    with app.app_context():
        return list(db.session.scalars(sa.select(Upload)))


def _create(client: FlaskClient, headers: dict[str, str], **body: Any) -> Any:
    return client.post(URL, json=body, headers=headers)


# --- Creating --------------------------------------------------------------------------------


def test_create_stamps_creator_and_expiry_as_sent(app, client, alice, emulator) -> None:
    user, auth = alice
    response = _create(client, auth, metadata={"album": "x"}, expires_in=600)
    assert response.status_code == 201
    body = response.get_json()
    assert response.headers["Location"] == f"{URL}/{body['id']}"
    assert body["status"] == "pending"
    assert body["require_signed_urls"] is True  # the configured default
    assert body["metadata"] == {"album": "x"}
    assert body["owner"] == user.public_id
    assert body["upload_url"].startswith(emulator.url)

    draft = emulator.emulator.store.get_image(body["image_id"])
    assert draft is not None and draft.draft
    assert draft.creator == user.public_id
    assert draft.require_signed
    assert draft.meta == {"album": "x", "broker_upload_id": body["id"]}
    (row,) = _rows(app)
    assert row.expires_at.timestamp() * 1000 == draft.expires_ms
    assert row.status == "pending" and row.user_id == user.id
    created = row.created_at.timestamp()
    assert 600 <= row.expires_at.timestamp() - created <= 601


def test_expiry_defaults_and_bounds_stay_inside_cloudflares(app, client, alice, emulator) -> None:
    _, auth = alice
    default = _create(client, auth).get_json()
    shortest = _create(client, auth, expires_in=120).get_json()
    longest = _create(client, auth, expires_in=21600).get_json()
    rows = {r.id: r for r in _rows(app)}

    def lifetime(body: dict[str, Any]) -> float:
        row = rows[body["id"]]
        return (row.expires_at - row.created_at).total_seconds()

    assert 1800 <= lifetime(default) <= 1801
    # A few seconds of margin so latency cannot push the expiry outside Cloudflare's bounds.
    assert 125 <= lifetime(shortest) <= 126
    assert 21590 <= lifetime(longest) <= 21596


def test_public_upload_and_custom_id(app, client, alice, emulator) -> None:
    _, auth = alice
    response = _create(client, auth, id="albums/2024/cat", require_signed_urls=False)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["image_id"] == "albums/2024/cat"
    assert body["require_signed_urls"] is False
    assert emulator.emulator.store.get_image("albums/2024/cat").draft

    again = _create(client, auth, id="albums/2024/cat", require_signed_urls=False)
    assert again.status_code == 409
    assert again.get_json()["error"]["code"] == "image_id_taken"
    assert len(_rows(app)) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"metadata": {"blob": "x" * 1000}}, "metadata"),
        ({"metadata": {"broker_upload_id": "mine"}}, "metadata"),
        ({"metadata": ["not", "an", "object"]}, "metadata"),
        ({"expires_in": 119}, "expires_in"),
        ({"expires_in": 21601}, "expires_in"),
        ({"require_signed_urls": "yes"}, "require_signed_urls"),
        ({"id": str(uuid.uuid4()), "require_signed_urls": False}, "id"),
        ({"id": "/leading", "require_signed_urls": False}, "id"),
        ({"id": "a//b", "require_signed_urls": False}, "id"),
        ({"id": "x" * 1025, "require_signed_urls": False}, "id"),
        ({"id": "private-custom"}, "id"),  # signed URLs by default: custom ids are refused
        ({"id": "private-custom", "require_signed_urls": True}, "id"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_validation_names_the_field_and_calls_nobody(
    app, client, alice, emulator, body, field
) -> None:
    _, auth = alice
    response = _create(client, auth, **body)
    assert response.status_code == 422, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    assert field in {d["field"] for d in error["details"]}
    assert emulator.counters().get("direct_upload", 0) == 0
    assert _rows(app) == []


def test_metadata_up_to_the_limit_is_accepted(app, client, alice, emulator) -> None:
    _, auth = alice
    # 1024 bytes minus the broker's own key leaves room for ~960 bytes of the caller's data.
    response = _create(client, auth, metadata={"k": "é" * 470})
    assert response.status_code == 201, response.get_json()


def test_requires_authentication(client) -> None:
    response = client.post(URL, json={})
    assert response.status_code == 401
    assert client.get(URL).status_code == 401


def test_session_callers_need_the_csrf_token(
    app, client, make_user, login, csrf_headers, emulator
) -> None:
    make_user("carol")
    login(client, "carol")
    assert client.post(URL, json={}).status_code in (400, 403)
    response = client.post(URL, json={}, headers=csrf_headers(client))
    assert response.status_code == 201
    assert emulator.counters()["direct_upload"] == 1


# --- Idempotency -----------------------------------------------------------------------------


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
    assert len(_rows(app)) == 1


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
        assert (
            idempotency.claim_and_commit(db.session, db.session.get(User, user.id), "slow", fp)
            is None
        )
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
        idempotency.claim_and_commit(
            db.session, db.session.get(User, user.id), "dead", fp, now=long_ago
        )
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


# --- Limits ----------------------------------------------------------------------------------


def test_pending_limit_answers_429_with_retry_after(make_app, make_user, bearer, emulator) -> None:
    app = make_app(MAX_PENDING_UPLOADS=2)
    client = app.test_client()
    auth = bearer(app, make_user("dave"))
    first = _create(client, auth, expires_in=300).get_json()
    _create(client, auth)
    refused = _create(client, auth)
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "too_many_pending_uploads"
    assert 1 <= int(refused.headers["Retry-After"]) <= 301
    assert emulator.counters()["direct_upload"] == 2
    assert client.delete(f"{URL}/{first['id']}", headers=auth).status_code == 200
    assert _create(client, auth).status_code == 201


def test_daily_limit_and_admin_overrides(make_app, make_user, bearer, emulator) -> None:
    app = make_app(MAX_UPLOADS_PER_DAY=2)
    client = app.test_client()
    erin = make_user("erin")
    auth = bearer(app, erin)
    admin = bearer(app, make_user("root", is_admin=True))
    for _ in range(2):
        created = _create(client, auth).get_json()
        client.delete(f"{URL}/{created['id']}", headers=auth)  # deleted uploads still count
    refused = _create(client, auth)
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "daily_upload_limit"
    assert 86000 < int(refused.headers["Retry-After"]) <= 86400

    limits = f"/api/v1/users/{erin.public_id}/upload-limits"
    assert client.put(limits, json={"max_uploads_per_day": 10}, headers=auth).status_code == 403
    changed = client.put(limits, json={"max_uploads_per_day": 10}, headers=admin)
    assert changed.status_code == 200
    assert changed.get_json()["effective_max_uploads_per_day"] == 10
    assert changed.get_json()["effective_max_pending_uploads"] == 20
    assert _create(client, auth).status_code == 201

    assert client.get(limits, headers=admin).get_json()["max_uploads_per_day"] == 10
    assert client.get("/api/v1/users/u_nobody/upload-limits", headers=admin).status_code == 404
    assert client.put(limits, json={"max_pending_uploads": 0}, headers=admin).status_code == 200
    assert _create(client, auth).status_code == 429


# --- Reading and deleting --------------------------------------------------------------------


def test_other_users_uploads_are_invisible(app, client, alice, make_user, bearer, emulator) -> None:
    _, auth = alice
    bob = bearer(app, make_user("bob"))
    admin = bearer(app, make_user("root", is_admin=True))
    mine = _create(client, auth).get_json()
    theirs = _create(client, bob).get_json()

    assert client.get(f"{URL}/{theirs['id']}", headers=auth).status_code == 404
    assert client.delete(f"{URL}/{theirs['id']}", headers=auth).status_code == 404
    listed = client.get(URL, headers=auth).get_json()["items"]
    assert [u["id"] for u in listed] == [mine["id"]]
    assert client.get(f"{URL}/does-not-exist", headers=auth).status_code == 404
    assert client.get(URL + "?scope=all", headers=auth).status_code == 403
    assert emulator.counters().get("image_delete", 0) == 0

    assert client.get(f"{URL}/{theirs['id']}", headers=admin).status_code == 200
    everyone = client.get(URL + "?scope=all", headers=admin).get_json()["items"]
    assert {u["id"] for u in everyone} == {mine["id"], theirs["id"]}
    bob_only = client.get(URL + f"?user={theirs['owner']}", headers=admin).get_json()["items"]
    assert [u["id"] for u in bob_only] == [theirs["id"]]
    assert client.get(URL, headers=admin).get_json()["items"] == []


def test_list_pages_with_a_cursor_and_filters_by_status(app, client, alice, emulator) -> None:
    _, auth = alice
    ids = [_create(client, auth).get_json()["id"] for _ in range(5)]
    client.delete(f"{URL}/{ids[0]}", headers=auth)
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(URL + query, headers=auth).get_json()
        seen += [u["id"] for u in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    pending = client.get(URL + "?status=pending", headers=auth).get_json()["items"]
    assert {u["id"] for u in pending} == set(ids[1:])
    deleted = client.get(URL + "?status=deleted", headers=auth).get_json()["items"]
    assert [u["id"] for u in deleted] == [ids[0]]
    assert client.get(URL + "?cursor=nonsense", headers=auth).status_code == 422
    assert client.get(URL + "?status=lost", headers=auth).status_code == 422
    assert client.get(URL + "?limit=0", headers=auth).status_code == 422


def test_delete_removes_the_image_at_cloudflare(app, client, alice, emulator) -> None:
    _, auth = alice
    created = _create(client, auth).get_json()
    response = client.delete(f"{URL}/{created['id']}", headers=auth)
    assert response.status_code == 200
    assert response.get_json()["status"] == "deleted"
    assert emulator.emulator.store.get_image(created["image_id"]) is None
    again = client.delete(f"{URL}/{created['id']}", headers=auth)
    assert again.status_code == 200
    assert emulator.counters()["image_delete"] == 1
    shown = client.get(f"{URL}/{created['id']}", headers=auth).get_json()
    assert shown["status"] == "deleted"


def test_delete_of_an_image_already_gone_upstream_still_marks_it(
    app, client, alice, emulator
) -> None:
    _, auth = alice
    created = _create(client, auth).get_json()
    emulator.emulator.store.delete_image(created["image_id"])
    response = client.delete(f"{URL}/{created['id']}", headers=auth)
    assert response.status_code == 200
    assert response.get_json()["status"] == "deleted"


def test_failed_delete_leaves_the_upload_as_it_was(app, client, alice, emulator) -> None:
    _, auth = alice
    created = _create(client, auth).get_json()
    emulator.inject_fault("image_delete", status=500)
    response = client.delete(f"{URL}/{created['id']}", headers=auth)
    assert response.status_code == 502
    assert [r.status for r in _rows(app)] == ["pending"]


# --- Upstream failures -----------------------------------------------------------------------


def test_upstream_500_is_502_and_the_post_is_not_resent(app, client, alice, emulator) -> None:
    _, auth = alice
    emulator.inject_fault("direct_upload", status=500)
    response = _create(client, auth)
    assert response.status_code == 502
    assert response.get_json()["error"]["code"] == "upstream_unavailable"
    assert emulator.counters()["direct_upload"] == 1
    assert _rows(app) == []


def test_upstream_timeout_is_504(make_app, make_user, bearer, emulator) -> None:
    app = make_app(CLOUDFLARE_TIMEOUT=0.2)
    client = app.test_client()
    auth = bearer(app, make_user("fred"))
    emulator.inject_fault("direct_upload", latency_ms=800, count=1)
    response = _create(client, auth)
    assert response.status_code == 504
    assert response.get_json()["error"]["code"] == "upstream_timeout"
    assert _rows(app) == []


def test_dropped_connection_is_502_without_a_row(app, client, alice, emulator) -> None:
    _, auth = alice
    emulator.inject_fault("direct_upload", drop=True, count=1)
    response = _create(client, auth)
    assert response.status_code == 502
    assert emulator.counters()["direct_upload"] == 1  # sent once: it may have been processed
    assert _rows(app) == []


def test_upstream_429_is_503_and_pauses_every_call(app, client, alice, emulator) -> None:
    _, auth = alice
    emulator.inject_fault("direct_upload", status=429, count=1)
    response = _create(client, auth)
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "upstream_rate_limited"
    assert response.headers["Retry-After"] == "1"
    assert _rows(app) == []
    # The pause is shared: the next call is refused here, without reaching Cloudflare.
    paused = _create(client, auth)
    assert paused.status_code == 503
    assert paused.get_json()["error"]["code"] == "upstream_busy"
    assert int(paused.headers["Retry-After"]) >= 1
    assert emulator.counters()["direct_upload"] == 1


def test_refused_credentials_are_502_upstream_auth(make_app, make_user, bearer, emulator) -> None:
    app = make_app(CLOUDFLARE_API_TOKEN="wrong-token")
    client = app.test_client()
    auth = bearer(app, make_user("gina"))
    response = _create(client, auth)
    assert response.status_code == 502
    assert response.get_json()["error"]["code"] == "upstream_auth"
    assert "wrong-token" not in response.get_data(as_text=True)
    assert _rows(app) == []


def test_spent_budget_is_503_without_calling_upstream(
    make_app, make_user, bearer, emulator
) -> None:
    app = make_app(UPSTREAM_BUDGET=2, UPSTREAM_BACKGROUND_RESERVE=0)
    client = app.test_client()
    auth = bearer(app, make_user("hank"))
    assert _create(client, auth).status_code == 201
    assert _create(client, auth).status_code == 201
    refused = _create(client, auth)
    assert refused.status_code == 503
    assert refused.get_json()["error"]["code"] == "upstream_busy"
    assert 1 <= int(refused.headers["Retry-After"]) <= 330
    assert emulator.counters()["direct_upload"] == 2
    assert len(_rows(app)) == 2


def test_the_budget_holds_across_two_app_instances(make_app, make_user, bearer, emulator) -> None:
    settings = {"UPSTREAM_BUDGET": 3, "UPSTREAM_BACKGROUND_RESERVE": 0}
    first, second = make_app(**settings), make_app(**settings)
    user = make_user("ivy")
    a, b = first.test_client(), second.test_client()
    auth_a, auth_b = bearer(first, user), bearer(second, user)
    assert _create(a, auth_a).status_code == 201
    assert _create(b, auth_b).status_code == 201
    assert _create(a, auth_a).status_code == 201
    assert _create(b, auth_b).status_code == 503
    assert _create(a, auth_a).status_code == 503
    assert emulator.counters()["direct_upload"] == 3

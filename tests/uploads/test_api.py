"""/api/v1/uploads against the emulator over real HTTP: what reaches Cloudflare, validation,
visibility, listing, deleting, upstream failures and the shared budget. (Idempotency:
tests/api/test_idempotency.py; quotas: test_quotas.py.)"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from broker.platform.db import db
from broker.uploads.models import Upload, UploadReservation
from broker.upstream.budget import get_budget
from tests.factories import post_upload, upload_rows

URL = "/api/v1/uploads"


# --- Creating --------------------------------------------------------------------------------


def test_create_stamps_creator_and_expiry_as_sent(app, client, alice, emulator) -> None:
    user, auth = alice
    response = post_upload(client, auth, metadata={"album": "x"}, expires_in=600)
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
    (row,) = upload_rows(app)
    assert row.expires_at.timestamp() * 1000 == draft.expires_ms
    assert row.status == "pending" and row.user_id == user.id
    created = row.created_at.timestamp()
    assert 600 <= row.expires_at.timestamp() - created <= 601


def test_expiry_defaults_and_bounds_stay_inside_cloudflares(app, client, alice, emulator) -> None:
    _, auth = alice
    default = post_upload(client, auth).get_json()
    shortest = post_upload(client, auth, expires_in=120).get_json()
    longest = post_upload(client, auth, expires_in=21600).get_json()
    rows = {r.id: r for r in upload_rows(app)}

    def lifetime(body: dict[str, Any]) -> float:
        row = rows[body["id"]]
        return (row.expires_at - row.created_at).total_seconds()

    assert 1800 <= lifetime(default) <= 1801
    # A few seconds of margin so latency cannot push the expiry outside Cloudflare's bounds.
    assert 125 <= lifetime(shortest) <= 126
    assert 21590 <= lifetime(longest) <= 21596


def test_public_upload_and_custom_id(app, client, alice, emulator) -> None:
    _, auth = alice
    response = post_upload(client, auth, id="albums/2024/cat", require_signed_urls=False)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["image_id"] == "albums/2024/cat"
    assert body["require_signed_urls"] is False
    assert emulator.emulator.store.get_image("albums/2024/cat").draft

    again = post_upload(client, auth, id="albums/2024/cat", require_signed_urls=False)
    assert again.status_code == 409
    assert again.get_json()["error"]["code"] == "image_id_taken"
    assert len(upload_rows(app)) == 1


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
        ({"id": "del\x7fete", "require_signed_urls": False}, "id"),  # DEL
        ({"id": "next\x85line", "require_signed_urls": False}, "id"),  # a C1 control
        ({"id": "private-custom"}, "id"),  # signed URLs by default: custom ids are refused
        ({"id": "private-custom", "require_signed_urls": True}, "id"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_validation_names_the_field_and_calls_nobody(
    app, client, alice, emulator, body, field
) -> None:
    _, auth = alice
    response = post_upload(client, auth, **body)
    assert response.status_code == 422, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    assert field in {d["field"] for d in error["details"]}
    assert emulator.counters().get("direct_upload", 0) == 0
    assert upload_rows(app) == []


def test_metadata_up_to_the_limit_is_accepted(app, client, alice, emulator) -> None:
    _, auth = alice
    # 1024 bytes minus the broker's own key leaves room for ~960 bytes of the caller's data.
    response = post_upload(client, auth, metadata={"k": "é" * 470})
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


# --- Reading and deleting --------------------------------------------------------------------


def test_other_users_uploads_are_invisible(app, client, alice, make_user, bearer, emulator) -> None:
    _, auth = alice
    bob = bearer(app, make_user("bob"))
    admin = bearer(app, make_user("root", is_admin=True))
    mine = post_upload(client, auth).get_json()
    theirs = post_upload(client, bob).get_json()

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
    ids = [post_upload(client, auth).get_json()["id"] for _ in range(5)]
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
    created = post_upload(client, auth).get_json()
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
    created = post_upload(client, auth).get_json()
    emulator.emulator.store.delete_image(created["image_id"])
    response = client.delete(f"{URL}/{created['id']}", headers=auth)
    assert response.status_code == 200
    assert response.get_json()["status"] == "deleted"


def test_failed_delete_leaves_the_upload_as_it_was(app, client, alice, emulator) -> None:
    _, auth = alice
    created = post_upload(client, auth).get_json()
    emulator.inject_fault("image_delete", status=500)
    response = client.delete(f"{URL}/{created['id']}", headers=auth)
    assert response.status_code == 502
    assert [r.status for r in upload_rows(app)] == ["pending"]


# --- Upstream failures -----------------------------------------------------------------------


def test_upstream_500_is_502_and_the_post_is_not_resent(app, client, alice, emulator) -> None:
    _, auth = alice
    emulator.inject_fault("direct_upload", status=500)
    response = post_upload(client, auth)
    assert response.status_code == 502
    assert response.get_json()["error"]["code"] == "upstream_unavailable"
    assert emulator.counters()["direct_upload"] == 1
    assert upload_rows(app) == []


def test_upstream_timeout_is_504(make_app, make_user, bearer, emulator) -> None:
    app = make_app(CLOUDFLARE_TIMEOUT=0.2)
    client = app.test_client()
    auth = bearer(app, make_user("fred"))
    emulator.inject_fault("direct_upload", latency_ms=800, count=1)
    response = post_upload(client, auth)
    assert response.status_code == 504
    assert response.get_json()["error"]["code"] == "upstream_timeout"
    assert upload_rows(app) == []


def test_dropped_connection_is_502_without_a_row(app, client, alice, emulator) -> None:
    _, auth = alice
    emulator.inject_fault("direct_upload", drop=True, count=1)
    response = post_upload(client, auth)
    assert response.status_code == 502
    assert emulator.counters()["direct_upload"] == 1  # sent once: it may have been processed
    assert upload_rows(app) == []


def test_upstream_429_is_503_and_pauses_every_call(app, client, alice, emulator) -> None:
    _, auth = alice
    emulator.inject_fault("direct_upload", status=429, count=1)
    response = post_upload(client, auth)
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "upstream_rate_limited"
    assert response.headers["Retry-After"] == "1"
    assert upload_rows(app) == []
    # The pause is shared: the next call is refused here, without reaching Cloudflare.
    paused = post_upload(client, auth)
    assert paused.status_code == 503
    assert paused.get_json()["error"]["code"] == "upstream_busy"
    assert int(paused.headers["Retry-After"]) >= 1
    assert emulator.counters()["direct_upload"] == 1


def test_refused_credentials_are_502_upstream_auth(make_app, make_user, bearer, emulator) -> None:
    app = make_app(CLOUDFLARE_API_TOKEN="wrong-token")
    client = app.test_client()
    auth = bearer(app, make_user("gina"))
    response = post_upload(client, auth)
    assert response.status_code == 502
    assert response.get_json()["error"]["code"] == "upstream_auth"
    assert "wrong-token" not in response.get_data(as_text=True)
    assert upload_rows(app) == []


def test_spent_budget_is_503_without_calling_upstream(
    make_app, make_user, bearer, emulator
) -> None:
    """A spent budget answers 503 before anything is reserved or sent upstream."""
    app = make_app(UPSTREAM_BUDGET=2, UPSTREAM_BACKGROUND_RESERVE=0, UPSTREAM_BACKGROUND_SHARE=0)
    client = app.test_client()
    auth = bearer(app, make_user("hank"))
    assert post_upload(client, auth).status_code == 201
    assert post_upload(client, auth).status_code == 201
    refused = post_upload(client, auth)
    assert refused.status_code == 503
    assert refused.get_json()["error"]["code"] == "upstream_busy"
    assert 1 <= int(refused.headers["Retry-After"]) <= 330
    assert emulator.counters()["direct_upload"] == 2
    assert len(upload_rows(app)) == 2
    with app.app_context():
        assert get_budget().status().used == 2
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Upload)) == 2
        assert db.session.scalar(sa.select(sa.func.count()).select_from(UploadReservation)) == 0


def test_the_budget_holds_across_two_app_instances(make_app, make_user, bearer, emulator) -> None:
    settings = {
        "UPSTREAM_BUDGET": 3,
        "UPSTREAM_BACKGROUND_RESERVE": 0,
        "UPSTREAM_BACKGROUND_SHARE": 0,
    }
    first, second = make_app(**settings), make_app(**settings)
    user = make_user("ivy")
    a, b = first.test_client(), second.test_client()
    auth_a, auth_b = bearer(first, user), bearer(second, user)
    assert post_upload(a, auth_a).status_code == 201
    assert post_upload(b, auth_b).status_code == 201
    assert post_upload(a, auth_a).status_code == 201
    assert post_upload(b, auth_b).status_code == 503
    assert post_upload(a, auth_a).status_code == 503
    assert emulator.counters()["direct_upload"] == 3

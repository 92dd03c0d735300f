"""API bearer tokens: creation, listing, revocation, expiry, storage, rate limits, bad input."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
import time_machine
from flask import Flask

from broker.auth.models import ApiToken
from broker.platform.db import db
from tests.factories import PASSWORD


def _create(client, username="alice", password=PASSWORD, **extra):
    body = {"username": username, "password": password, "device_name": "Pixel 9", **extra}
    return client.post("/api/v1/auth/tokens", json=body)


def test_token_is_opaque_long_prefixed_and_shown_once(app, client, make_user):
    """201 with a brk_ token of ≥ 128 random bits, not cacheable, never listed again."""
    make_user()
    response = _create(client)
    assert response.status_code == 201
    assert response.headers["Cache-Control"] == "no-store"
    body = response.get_json()
    secret = body["token"]
    assert secret.startswith("brk_") and len(secret) - 4 >= 43  # 43 base64url chars = 256 bits
    assert body["device_name"] == "Pixel 9" and body["id"].startswith("tok_")
    expires = datetime.fromisoformat(body["expires_at"])
    assert timedelta(days=89) < expires - datetime.now(UTC) <= timedelta(days=90)
    listed = client.get("/api/v1/auth/tokens", headers={"Authorization": f"Bearer {secret}"})
    assert listed.status_code == 200
    [only] = listed.get_json()["tokens"]
    assert only["current"] is True and "token" not in only
    assert secret not in listed.get_data(as_text=True)


def test_token_is_stored_only_as_its_sha256(app, client, make_user):
    """No table of the database holds the plaintext token."""
    import hashlib

    make_user()
    secret = _create(client).get_json()["token"]
    with app.app_context():
        dump = []
        for table in db.metadata.sorted_tables:
            for row in db.session.execute(sa.select(table)):
                dump.append(repr(tuple(row)))
        text = "\n".join(dump)
    assert secret not in text
    assert secret[4:] not in text
    assert hashlib.sha256(secret.encode()).hexdigest() in text


def test_wrong_revoked_and_expired_tokens_get_json_401(app, client, make_user, bearer):
    """Each dead credential answers JSON 401 with WWW-Authenticate, never a redirect."""
    make_user()
    good = bearer(app, "alice")
    revoked = bearer(app, "alice")
    assert client.delete("/api/v1/auth/tokens/current", headers=revoked).status_code == 204

    def assert_401(headers, code):
        response = client.get("/api/v1/me", headers=headers)
        assert response.status_code == 401, headers
        assert response.is_json and response.get_json()["error"]["code"] == code
        assert response.headers["WWW-Authenticate"].startswith("Bearer")

    assert client.get("/api/v1/me", headers=good).status_code == 200
    assert_401(revoked, "token_revoked")
    assert_401({"Authorization": "Bearer brk_" + "A" * 43}, "token_invalid")
    assert_401({"Authorization": "Bearer not-even-a-brk-token"}, "token_invalid")
    assert_401({"Authorization": "Basic YWxpY2U6cGFzcw=="}, "unauthorized")  # not a bearer
    assert_401({"Authorization": "Bearer " + "x" * 5000}, "token_invalid")
    with time_machine.travel(datetime.now(UTC) + timedelta(days=91), tick=False):
        assert_401(good, "token_expired")


def test_authorization_header_wins_over_the_session_cookie(app, client, make_user, login, bearer):
    """With a header present, the cookie is never used: bad header + good cookie = 401."""
    make_user()
    make_user("bob")
    login(client, "alice", PASSWORD)
    as_bob = client.get("/api/v1/me", headers=bearer(app, "bob"))
    assert as_bob.get_json()["username"] == "bob"
    bad = client.get("/api/v1/me", headers={"Authorization": "Bearer brk_nope"})
    assert bad.status_code == 401
    # A write with a dead token and a live cookie is not a cookie write either.
    assert (
        client.delete(
            "/api/v1/auth/tokens/current", headers={"Authorization": "Bearer brk_nope"}
        ).status_code
        == 401
    )
    assert client.get("/api/v1/me").get_json()["username"] == "alice"


def test_list_and_revoke_only_own_tokens(app, client, make_user, bearer):
    """Another user's token id is 404; revoking one's own takes effect at once."""
    make_user()
    make_user("mallory")
    mine = bearer(app, "alice")
    theirs = bearer(app, "mallory")
    second = bearer(app, "alice")
    listed = client.get("/api/v1/auth/tokens", headers=mine).get_json()["tokens"]
    assert len(listed) == 2 and sum(t["current"] for t in listed) == 1
    their_id = client.get("/api/v1/auth/tokens", headers=theirs).get_json()["tokens"][0]["id"]
    assert client.delete(f"/api/v1/auth/tokens/{their_id}", headers=mine).status_code == 404
    assert client.get("/api/v1/me", headers=theirs).status_code == 200
    other_id = next(t["id"] for t in listed if not t["current"])
    assert client.delete(f"/api/v1/auth/tokens/{other_id}", headers=mine).status_code == 204
    assert client.delete(f"/api/v1/auth/tokens/{other_id}", headers=mine).status_code == 404
    assert client.get("/api/v1/me", headers=second).status_code == 401


def test_revoke_current_with_cookie_session_is_404(client, make_user, login, csrf_headers):
    """A browser session has no current token to revoke."""
    make_user()
    login(client, "alice", PASSWORD)
    response = client.delete("/api/v1/auth/tokens/current", headers=csrf_headers(client))
    assert response.status_code == 404


def test_last_used_is_recorded(app, client, make_user, bearer):
    """Each use stamps last_used_at (at most once a minute)."""
    make_user()
    header = bearer(app, "alice")
    with time_machine.travel(datetime(2030, 1, 1, tzinfo=UTC), tick=False):
        header = bearer(app, "alice")
        assert client.get("/api/v1/me", headers=header).status_code == 200
        [listed] = [
            t
            for t in client.get("/api/v1/auth/tokens", headers=header).get_json()["tokens"]
            if t["current"]
        ]
    assert listed["last_used_at"].startswith("2030-01-01T00:00:00")


def test_expiry_can_be_shortened_per_token(client, make_user):
    """expires_in_days bounds a token's life; out-of-range values are 422."""
    make_user()
    body = _create(client, expires_in_days=1).get_json()
    expires = datetime.fromisoformat(body["expires_at"])
    assert expires - datetime.now(UTC) <= timedelta(days=1)
    assert _create(client, expires_in_days=0).status_code == 422
    assert _create(client, expires_in_days=366).status_code == 422


def test_wrong_credentials_and_inactive_users_get_401(client, make_user):
    """Wrong password, unknown user: the same 401 JSON."""
    make_user()
    for response in (_create(client, password="nope nope nope"), _create(client, "ghost")):
        assert response.status_code == 401
        assert response.get_json()["error"]["code"] == "invalid_credentials"


@pytest.mark.parametrize(
    ("kwargs", "status", "fields"),
    [
        ({"data": "{nope", "content_type": "application/json"}, 400, None),
        ({"data": "username=alice", "content_type": "text/plain"}, 415, None),
        ({"json": {}}, 422, {"username", "password", "device_name"}),
        ({"json": []}, 422, None),
        ({"json": {"username": 5, "password": PASSWORD, "device_name": "x"}}, 422, {"username"}),
        ({"json": {"username": "a", "password": "", "device_name": "x"}}, 422, {"password"}),
        (
            {"json": {"username": "a", "password": "p", "device_name": "x", "admin": True}},
            422,
            {"admin"},
        ),
        ({"json": {"username": "a" * 65, "password": "p", "device_name": "x"}}, 422, {"username"}),
    ],
)
def test_bad_input_is_400_or_422_with_details_never_500(client, kwargs, status, fields):
    """Malformed or incomplete bodies name what is wrong."""
    response = client.post("/api/v1/auth/tokens", **kwargs)
    assert response.status_code == status
    error = response.get_json()["error"]
    if fields is not None:
        assert {d["field"] for d in error["details"]} == fields


def test_token_creation_is_rate_limited_per_ip_with_retry_after(make_app, make_user):
    """The 4th attempt within the window: 429 JSON with Retry-After."""
    app = make_app(AUTH_RATE_LIMIT="3 per minute")
    make_user()
    client = app.test_client()
    for _ in range(3):
        assert _create(client, password="wrong password!").status_code == 401
    limited = _create(client)
    assert limited.status_code == 429
    assert limited.get_json()["error"]["code"] == "too_many_requests"
    assert 0 < int(limited.headers["Retry-After"]) <= 60


def test_failed_attempts_are_limited_per_username_across_ips(make_app, make_user):
    """Guessing one user's password from many addresses still hits the per-username limit."""
    app = make_app(AUTH_RATE_LIMIT="3 per minute")
    make_user()
    make_user("bob")
    client = app.test_client()
    for n in range(3):
        response = client.post(
            "/api/v1/auth/tokens",
            json={"username": "ALICE", "password": "wrong password!", "device_name": "x"},
            environ_base={"REMOTE_ADDR": f"10.0.0.{n}"},
        )
        assert response.status_code == 401
    blocked = client.post(
        "/api/v1/auth/tokens",
        json={"username": "alice", "password": PASSWORD, "device_name": "x"},
        environ_base={"REMOTE_ADDR": "10.0.0.99"},
    )
    assert blocked.status_code == 429 and "Retry-After" in blocked.headers
    other_user = client.post(
        "/api/v1/auth/tokens",
        json={"username": "bob", "password": PASSWORD, "device_name": "x"},
        environ_base={"REMOTE_ADDR": "10.0.0.98"},
    )
    assert other_user.status_code == 201


def test_login_form_is_rate_limited(make_app, make_user):
    """The login page answers 429 with Retry-After after too many posts."""
    app = make_app(AUTH_RATE_LIMIT="2 per minute")
    make_user()
    client = app.test_client()
    for _ in range(2):
        assert client.post("/auth/login", data={"username": "alice"}).status_code == 400
    limited = client.post("/auth/login", data={"username": "alice"})
    assert limited.status_code == 429
    assert "Retry-After" in limited.headers
    assert client.get("/auth/login").status_code == 200  # viewing the form is not limited


def test_each_app_gets_fresh_rate_limit_storage(make_app, make_user):
    """Limits from one app do not leak into the next one built in the same process."""
    first = make_app(AUTH_RATE_LIMIT="1 per minute")
    make_user()
    assert _create(first.test_client(), password="wrong password!").status_code == 401
    assert _create(first.test_client()).status_code == 429
    second = make_app(AUTH_RATE_LIMIT="1 per minute")
    assert _create(second.test_client()).status_code == 201


def test_token_rows_cascade_with_their_user(app, make_user, bearer):
    """Deleting a user deletes their tokens."""
    from broker.auth.models import User

    user = make_user()
    bearer(app, user)
    with app.app_context():
        db.session.delete(db.session.get(User, user.id))
        db.session.commit()
        assert db.session.scalar(sa.select(sa.func.count()).select_from(ApiToken)) == 0


def test_bearer_requests_get_no_session_cookie(app, client, make_user, bearer):
    """An app using a token is never handed a session cookie (nothing to ride on later)."""
    make_user()
    response = client.get("/api/v1/me", headers=bearer(app, "alice"))
    assert response.status_code == 200
    assert "Set-Cookie" not in response.headers


def test_issued_token_repr_hides_the_secret(app: Flask, make_user: Callable[..., Any]) -> None:
    """`repr(IssuedToken)` (e.g. in a log line or a traceback) never shows the bearer secret."""
    from broker.auth import tokens
    from broker.auth.models import User

    user = make_user()
    with app.app_context():
        issued = tokens.issue(db.session, db.session.get(User, user.id), "repr")
        assert issued.secret.startswith("brk_")
        assert issued.secret not in repr(issued) and issued.secret not in str(issued)
        db.session.rollback()

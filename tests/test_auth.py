"""Authentication: sessions, CSRF, bearer tokens, the admin role."""

from __future__ import annotations

import sqlalchemy as sa

from broker.db import db
from broker.models import ApiToken, User


def test_login_and_me_with_session_cookie(app, client, make_user, login):
    """A logged-in browser reaches the API with its cookie."""
    user = make_user()
    login(client, "alice", "correct horse battery")
    response = client.get("/api/v1/me")
    assert response.status_code == 200
    assert response.get_json() == {
        "public_id": user.public_id,
        "username": "alice",
        "is_admin": False,
    }


def test_anonymous_api_call_gets_json_401(client):
    """No credentials: JSON 401, never a redirect."""
    response = client.get("/api/v1/me")
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert "Bearer" in response.headers["WWW-Authenticate"]


def test_cookie_authed_api_write_needs_csrf(app, client, make_user, login, csrf_headers, bearer):
    """A cookie-authenticated DELETE without X-CSRFToken is refused; with it, it goes through."""
    make_user()
    login(client, "alice", "correct horse battery")
    header = bearer(app, "alice")
    with app.app_context():
        token_id = db.session.scalar(sa.select(ApiToken.public_id))
    refused = client.delete(f"/api/v1/auth/tokens/{token_id}")
    assert refused.status_code == 403
    assert refused.get_json()["error"]["code"] == "csrf_failed"
    accepted = client.delete(f"/api/v1/auth/tokens/{token_id}", headers=csrf_headers(client))
    assert accepted.status_code == 204
    assert client.get("/api/v1/me", headers=header).status_code == 401


def test_bearer_write_needs_no_csrf(app, make_user):
    """A bearer-authenticated DELETE carries no CSRF token and is accepted."""
    make_user()
    client = app.test_client()
    created = client.post(
        "/api/v1/auth/tokens",
        json={"username": "ALICE", "password": "correct horse battery", "device_name": "phone"},
    )
    assert created.status_code == 201
    secret = created.get_json()["token"]
    assert secret.startswith("brk_")
    headers = {"Authorization": f"Bearer {secret}"}
    assert client.get("/api/v1/me", headers=headers).status_code == 200
    assert client.delete("/api/v1/auth/tokens/current", headers=headers).status_code == 204
    assert client.get("/api/v1/me", headers=headers).status_code == 401
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(User)) == 1

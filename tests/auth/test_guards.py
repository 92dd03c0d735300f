"""Route guards across every route: anonymous API callers get JSON 401, every cookie-authenticated
write needs a CSRF token, a bearer-authenticated one needs none, the admin role."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from flask import Flask

from broker.auth.models import ApiToken, User
from broker.platform.db import db
from tests.factories import PASSWORD, log_in

# Writes that need no session: credentials in the body, or a shared secret (no cookie rides).
NO_SESSION_WRITES = {
    "api.create_token",
    "auth.login",
    "auth.register",
    "hooks.cloudflare_notification",
}
# API reads documented as public.
PUBLIC_API = {"api.openapi_json", "api.docs_page", "api.create_token"}
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


_VARIABLE = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?\w+>")


def _routes(app: Flask) -> list[tuple[str, str, str]]:
    """Return (endpoint, method, concrete path) for every rule, path variables filled in."""
    out = []
    for rule in app.url_map.iter_rules():
        path = _VARIABLE.sub(lambda m: "1" if m.group(1) in ("int", "id") else "x1", rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            out.append((rule.endpoint, method, path))
    return out


def test_anonymous_api_call_gets_json_401(client):
    """No credentials: JSON 401, never a redirect."""
    response = client.get("/api/v1/me")
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert "Bearer" in response.headers["WWW-Authenticate"]


def test_every_api_route_answers_anonymous_callers_with_json_401(
    make_app: Callable[..., Flask],
) -> None:
    """No credentials (or a bad bearer token): JSON 401 on every API route but the public ones."""
    app = make_app()
    client = app.test_client()
    api = [r for r in _routes(app) if r[2].startswith("/api/") and r[0] not in PUBLIC_API]
    assert len(api) >= 20, api
    for headers, code in (
        ({}, "unauthorized"),
        ({"Authorization": "Bearer brk_not-a-token"}, "token_invalid"),
        ({"Authorization": "Basic eDp5"}, "unauthorized"),
    ):
        for endpoint, method, path in api:
            response = client.open(path, method=method, json={}, headers=headers)
            assert response.status_code == 401, (endpoint, method, headers, response.status_code)
            assert response.get_json()["error"]["code"] == code, endpoint
    for endpoint, method, path in [
        r for r in _routes(app) if r[0] in PUBLIC_API - {"api.create_token"}
    ]:
        assert client.open(path, method=method).status_code == 200, endpoint


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


def test_every_cookie_authenticated_write_needs_a_csrf_token(
    make_app: Callable[..., Flask], make_user: Callable[..., Any], login: Callable[..., Any]
) -> None:
    """A logged-in admin browser (session or remember cookie only) gets 403 csrf_failed on every
    state-changing route when the request carries no CSRF token."""
    app = make_app()
    make_user("root", PASSWORD, is_admin=True)
    writes = [r for r in _routes(app) if r[1] in WRITE_METHODS and r[0] not in NO_SESSION_WRITES]
    assert len(writes) >= 13, writes
    client = app.test_client()
    login(client, "root", PASSWORD)
    remembered = app.test_client()
    log_in(remembered, "root", PASSWORD, remember=True)
    remembered.delete_cookie("session")
    assert remembered.get("/api/v1/me").status_code == 200
    for who in (client, remembered):
        for endpoint, method, path in writes:
            response = who.open(path, method=method, json={})
            assert response.status_code == 403, (endpoint, method, response.status_code)
            if path.startswith("/api/"):
                assert response.get_json()["error"]["code"] == "csrf_failed", endpoint
        remembered.delete_cookie("session")
    assert client.get("/api/v1/me").status_code == 200  # the logout above was refused


def test_admin_required_for_api_and_pages(make_app, make_user, login, bearer):
    """Anonymous: 401 JSON / login redirect; non-admin: 403; admin: through."""
    from flask import Blueprint

    from broker.auth import admin_required

    bp = Blueprint("admin_probe", __name__)

    @bp.get("/api/test/admin")
    @admin_required
    def api_probe():  # type: ignore[no-untyped-def]
        return {"ok": True}

    @bp.get("/test/admin")
    @admin_required
    def page_probe():  # type: ignore[no-untyped-def]
        return "admin page"

    app = make_app()
    app.register_blueprint(bp)
    make_user("alice")
    make_user("root", is_admin=True)
    anon = app.test_client()
    assert anon.get("/api/test/admin").status_code == 401
    assert anon.get("/api/test/admin").get_json()["error"]["code"] == "unauthorized"
    assert anon.get("/test/admin").status_code == 302
    user = bearer(app, "alice")
    forbidden = anon.get("/api/test/admin", headers=user)
    assert forbidden.status_code == 403
    assert forbidden.get_json()["error"]["code"] == "forbidden"
    assert anon.get("/api/test/admin", headers=bearer(app, "root")).get_json() == {"ok": True}
    browser = app.test_client()
    login(browser, "alice", PASSWORD)
    assert browser.get("/test/admin").status_code == 403
    admin_browser = app.test_client()
    login(admin_browser, "root", PASSWORD)
    assert admin_browser.get("/test/admin").get_data(as_text=True) == "admin page"
    assert admin_browser.get("/api/v1/me").get_json()["is_admin"] is True

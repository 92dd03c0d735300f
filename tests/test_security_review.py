"""Security review regressions: each test pins a defect that was found and fixed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from flask import Flask

from broker.db import db, utcnow
from broker.models import Upload

PASSWORD = "correct horse battery"


def _ready_upload(app: Flask, user_id: int) -> str:
    """Record a ready, public upload of `user_id` (no upstream call needed to redirect to it)."""
    with app.app_context():
        upload = Upload(
            user_id=user_id,
            image_id="img-security-review",
            status="ready",
            require_signed_urls=False,
            expires_at=utcnow() + timedelta(minutes=30),
        )
        db.session.add(upload)
        db.session.commit()
        return upload.id


# --- 1. the /i/ redirect's session fast path --------------------------------------------------


def test_redirect_fast_path_honours_strong_session_protection_from_config(
    make_app: Callable[..., Flask], make_user: Callable[..., Any], login: Callable[..., Any]
) -> None:
    """SESSION_PROTECTION=strong in the app config: a session replayed from another client is
    refused by the /i/ redirect exactly as flask-login refuses it everywhere else."""
    app = make_app(SESSION_PROTECTION="strong")
    user = make_user()
    client = app.test_client()
    client.environ_base["HTTP_USER_AGENT"] = "victim-browser"
    login(client, "alice", PASSWORD)
    upload_id = _ready_upload(app, user.id)
    assert client.get(f"/i/{upload_id}/thumb").status_code == 302

    stolen = app.test_client()
    stolen.environ_base["HTTP_USER_AGENT"] = "attacker-browser"
    stolen.set_cookie("session", client.get_cookie("session").value)
    assert stolen.get("/api/v1/me").status_code == 401  # flask-login's own verdict
    stolen.set_cookie("session", client.get_cookie("session").value)
    assert stolen.get(f"/i/{upload_id}/thumb").status_code == 401


# --- 2. CSRF on every cookie-authenticated write; 5. anonymous API calls --------------------

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


def _routes(app: Flask) -> list[tuple[str, str, str]]:
    """Return (endpoint, method, concrete path) for every rule, path variables filled in."""
    out = []
    for rule in app.url_map.iter_rules():
        path = rule.rule
        for arg in rule.arguments:
            path = path.replace(f"<{arg}>", "x1").replace(f"<path:{arg}>", "x1")
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            out.append((rule.endpoint, method, path))
    return out


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
    page = remembered.get("/auth/login").get_data(as_text=True)
    csrf = page.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
    remembered.post(
        "/auth/login",
        data={"username": "root", "password": PASSWORD, "remember": "y", "csrf_token": csrf},
    )
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


def test_every_api_route_answers_anonymous_callers_with_json_401(
    make_app: Callable[..., Flask],
) -> None:
    """No credentials (or a bad bearer token): JSON 401 on every API route but the public ones."""
    app = make_app()
    client = app.test_client()
    api = [r for r in _routes(app) if r[2].startswith("/api/") and r[0] not in PUBLIC_API]
    assert len(api) >= 20, api
    for headers in (
        {},
        {"Authorization": "Bearer brk_not-a-token"},
        {"Authorization": "Basic eDp5"},
    ):
        for endpoint, method, path in api:
            response = client.open(path, method=method, json={}, headers=headers)
            assert response.status_code == 401, (endpoint, method, headers, response.status_code)
            assert response.get_json()["error"]["code"] == "unauthorized", endpoint
    for endpoint, method, path in [
        r for r in _routes(app) if r[0] in PUBLIC_API - {"api.create_token"}
    ]:
        assert client.open(path, method=method).status_code == 200, endpoint

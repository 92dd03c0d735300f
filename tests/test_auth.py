"""Authentication: sessions, CSRF, bearer tokens, the admin role."""

from __future__ import annotations

import re

import sqlalchemy as sa

from broker.auth.models import ApiToken, User
from broker.platform.db import db


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


# --- sessions --------------------------------------------------------------------------------

PASSWORD = "correct horse battery"


def _session_cookie(client) -> str:
    cookie = client.get_cookie("session")
    assert cookie is not None
    return cookie.value


def _client_with_session(app, value: str):
    other = app.test_client()
    other.set_cookie("session", value)
    return other


def _is_logged_in(client) -> bool:
    return client.get("/api/v1/me").status_code == 200


def test_login_page_is_accessible_and_login_starts_a_new_session(app, client, make_user):
    """Labels, autocomplete and a fresh session (nothing of the anonymous one survives)."""
    make_user()
    page = client.get("/auth/login")
    html = page.get_data(as_text=True)
    assert '<label for="username">' in html and '<label for="password">' in html
    assert 'autocomplete="username"' in html and 'autocomplete="current-password"' in html
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"
    with client.session_transaction() as sess:
        sess["planted"] = "by an attacker"
    token = html.split('name="csrf-token" content="')[1].split('"')[0]
    response = client.post(
        "/auth/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token}
    )
    assert response.status_code == 302
    with client.session_transaction() as sess:
        assert "planted" not in sess
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_wrong_password_is_refused_with_a_generic_message(client, make_user):
    """Wrong password and unknown user get the same answer; the error is announced."""
    make_user()
    page = client.get("/auth/login").get_data(as_text=True)
    token = page.split('name="csrf-token" content="')[1].split('"')[0]
    for username in ("alice", "nobody"):
        response = client.post(
            "/auth/login", data={"username": username, "password": "wrong!", "csrf_token": token}
        )
        assert response.status_code == 401
        assert "Invalid username or password." in response.get_data(as_text=True)
        assert 'role="alert"' in response.get_data(as_text=True)
    assert not _is_logged_in(client)


def test_login_form_without_csrf_token_is_refused(client, make_user):
    """The login form checks its own CSRF token (no login CSRF)."""
    make_user()
    response = client.post("/auth/login", data={"username": "alice", "password": PASSWORD})
    assert response.status_code == 400
    assert not _is_logged_in(client)


def test_cookie_authed_page_post_without_csrf_is_refused(client, make_user, login):
    """Logout without a CSRF token: 403 and the user stays logged in."""
    make_user()
    login(client, "alice", PASSWORD)
    response = client.post("/auth/logout")
    assert response.status_code == 403
    assert _is_logged_in(client)


def test_logout_ends_every_session_and_remember_cookie(app, client, make_user, login, csrf_headers):
    """A copy of the old session cookie and the remember cookie no longer authenticate."""
    make_user()
    page = client.get("/auth/login").get_data(as_text=True)
    token = page.split('name="csrf-token" content="')[1].split('"')[0]
    client.post(
        "/auth/login",
        data={"username": "alice", "password": PASSWORD, "remember": "y", "csrf_token": token},
    )
    old_session = _session_cookie(client)
    remember = client.get_cookie("remember_token")
    assert remember is not None
    # Remember cookie alone logs in before logout (positive control).
    probe = app.test_client()
    probe.set_cookie("remember_token", remember.value)
    assert _is_logged_in(probe)
    other_device = app.test_client()
    login(other_device, "alice", PASSWORD)

    response = client.post("/auth/logout", headers=csrf_headers(client))
    assert response.status_code == 302
    assert not _is_logged_in(client)
    assert not _is_logged_in(_client_with_session(app, old_session))
    stale = app.test_client()
    stale.set_cookie("remember_token", remember.value)
    assert not _is_logged_in(stale)
    assert not _is_logged_in(other_device)


def test_remember_cookie_lasts_at_most_30_days(client, make_user):
    """Remember-me is bounded to 30 days."""
    from datetime import UTC, datetime, timedelta

    make_user()
    page = client.get("/auth/login").get_data(as_text=True)
    token = page.split('name="csrf-token" content="')[1].split('"')[0]
    client.post(
        "/auth/login",
        data={"username": "alice", "password": PASSWORD, "remember": "y", "csrf_token": token},
    )
    remember = client.get_cookie("remember_token")
    assert remember is not None and remember.expires is not None
    assert remember.expires <= datetime.now(UTC) + timedelta(days=30, minutes=1)
    assert remember.http_only


def test_password_change_ends_other_sessions_and_revokes_tokens(
    app, client, make_user, login, csrf_headers, bearer
):
    """Changing the password: old cookies and all tokens stop working; this browser stays in."""
    make_user()
    login(client, "alice", PASSWORD)
    old_session = _session_cookie(client)
    header = bearer(app, "alice")
    wrong = client.post(
        "/auth/account/password",
        data={
            "current": "not it at all",
            "password": "a brand new passphrase",
            "confirm": "a brand new passphrase",
            **_form_csrf(client, csrf_headers),
        },
    )
    assert wrong.status_code == 422
    assert "not your current password" in wrong.get_data(as_text=True)
    response = client.post(
        "/auth/account/password",
        data={
            "current": PASSWORD,
            "password": "a brand new passphrase",
            "confirm": "a brand new passphrase",
            **_form_csrf(client, csrf_headers),
        },
    )
    assert response.status_code == 302
    assert _is_logged_in(client)
    assert not _is_logged_in(_client_with_session(app, old_session))
    assert client.get("/api/v1/me", headers=header).status_code == 401
    fresh = app.test_client()
    login(fresh, "alice", "a brand new passphrase")


def _form_csrf(client, csrf_headers) -> dict[str, str]:
    return {"csrf_token": csrf_headers(client)["X-CSRFToken"]}


def test_deactivation_ends_sessions_and_tokens(app, client, make_user, login, bearer):
    """A deactivated user's cookie and tokens are rejected, and they cannot log in again."""
    from broker.auth import users

    make_user()
    login(client, "alice", PASSWORD)
    header = bearer(app, "alice")
    old_session = _session_cookie(client)
    with app.app_context():
        users.deactivate(db.session, users.find_user(db.session, "alice"))
        db.session.commit()
    assert not _is_logged_in(client)
    assert not _is_logged_in(_client_with_session(app, old_session))
    assert client.get("/api/v1/me", headers=header).status_code == 401
    created = app.test_client().post(
        "/api/v1/auth/tokens",
        json={"username": "alice", "password": PASSWORD, "device_name": "phone"},
    )
    assert created.status_code == 401


def test_next_is_honoured_only_for_same_site_paths(client, make_user):
    """Open redirects through `next` are refused; local paths are kept."""
    make_user()
    cases = {
        "/auth/account": "/auth/account",
        "/auth/account?tab=tokens": "/auth/account?tab=tokens",
        "//evil.example/": "/",
        "https://evil.example/": "/",
        "/\\evil.example": "/",
        "\\\\evil.example": "/",
        "javascript:alert(1)": "/",
        "/\tevil": "/",
        "http:/evil.example": "/",
    }
    for nxt, expected in cases.items():
        c = client.application.test_client()
        page = c.get("/auth/login", query_string={"next": nxt}).get_data(as_text=True)
        token = page.split('name="csrf-token" content="')[1].split('"')[0]
        response = c.post(
            "/auth/login",
            query_string={"next": nxt},
            data={"username": "alice", "password": PASSWORD, "csrf_token": token},
        )
        assert response.status_code == 302, nxt
        assert response.headers["Location"] == expected, nxt


def test_pages_redirect_anonymous_users_to_login_with_next(client):
    """A protected page sends a browser to the login form, remembering where it was going."""
    response = client.get("/auth/account")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/auth/login?next=")
    assert response.headers["Location"] == "/auth/login?next=/auth/account"


# --- registration ----------------------------------------------------------------------------


def _register(client, username: str, password: str = PASSWORD, confirm: str | None = None):
    page = client.get("/auth/register")
    assert page.status_code == 200
    token = page.get_data(as_text=True).split('name="csrf-token" content="')[1].split('"')[0]
    return client.post(
        "/auth/register",
        data={
            "username": username,
            "password": password,
            "confirm": confirm if confirm is not None else password,
            "csrf_token": token,
        },
    )


def test_register_creates_and_logs_in(client):
    """Registration (on in testing) creates the account and logs it in."""
    response = _register(client, "Bob")
    assert response.status_code == 302
    me = client.get("/api/v1/me").get_json()
    assert me["username"] == "Bob" and me["public_id"].startswith("u_")


def test_username_uniqueness_ignores_case(app, client, make_user):
    """ALICE cannot join alice: refused by the page, the code and the database."""
    from broker.auth import users

    make_user("alice")
    response = _register(client, "ALICE")
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert "That username is taken." in html
    assert 'aria-describedby="username-hint username-error"' in html
    assert 'aria-invalid="true"' in html
    with app.app_context():
        try:
            users.create_user(db.session, "Alice", PASSWORD)
            raise AssertionError("created a duplicate")
        except users.AccountError as exc:
            assert exc.field == "username"
        db.session.rollback()
        db.session.add(
            User(username="ALICE", username_key="alice", password_hash="x", session_token="t")
        )
        try:
            db.session.commit()
            raise AssertionError("the database accepted a duplicate key")
        except sa.exc.IntegrityError:
            db.session.rollback()


def test_register_refuses_short_password_and_mismatch(client):
    """Password rules are enforced with messages tied to their fields."""
    short = _register(client, "carol", password="short")
    assert short.status_code == 422
    assert "at least 12 characters" in short.get_data(as_text=True)
    mismatch = _register(client, "carol", confirm="something else entirely")
    assert mismatch.status_code == 422
    assert "The passwords differ." in mismatch.get_data(as_text=True)


def test_registration_can_be_turned_off(make_app):
    """BROKER_REGISTRATION=false hides the page."""
    app = make_app(REGISTRATION=False)
    assert app.test_client().get("/auth/register").status_code == 404


def test_registration_defaults_off_in_production():
    """Production turns self-registration off unless asked."""
    from broker.platform.config import DEFAULTS, finalize
    from tests.conftest import PRODUCTION_SETTINGS

    config = {**DEFAULTS, **PRODUCTION_SETTINGS}
    finalize(config, "/tmp")
    assert config["REGISTRATION"] is False
    assert config["SESSION_COOKIE_SECURE"] and config["REMEMBER_COOKIE_SECURE"]


# --- account page ----------------------------------------------------------------------------


def test_account_page_lists_and_revokes_own_tokens(
    app, client, make_user, login, bearer, csrf_headers
):
    """The account page shows active tokens by prefix and revokes them; others' are 404."""
    make_user()
    make_user("mallory")
    header = bearer(app, "alice")
    bearer(app, "mallory")
    login(client, "alice", PASSWORD)
    html = client.get("/auth/account").get_data(as_text=True)
    secret = header["Authorization"].split()[1]
    assert secret[:10] in html and secret not in html
    with app.app_context():
        own = db.session.scalar(
            sa.select(ApiToken.public_id).join(User).where(User.username == "alice")
        )
        theirs = db.session.scalar(
            sa.select(ApiToken.public_id).join(User).where(User.username == "mallory")
        )
    assert own in html and theirs not in html
    form = _form_csrf(client, csrf_headers)
    assert client.post(f"/auth/account/tokens/{theirs}/revoke", data=form).status_code == 404
    assert client.post(f"/auth/account/tokens/{own}/revoke", data=form).status_code == 302
    assert client.get("/api/v1/me", headers=header).status_code == 401


# --- admin role ------------------------------------------------------------------------------


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


def test_demo_user_is_created_once_in_development(make_app):
    """`make run` creates the demo account once and prints its password only then."""
    from broker.auth.demo import ensure_demo_user

    dev = make_app(ENV="development")
    with dev.app_context():
        first = ensure_demo_user(dev)
        second = ensure_demo_user(dev)
    assert "password" in first[0] and "shown once" in first[0]
    password = first[0].split("password ")[1].split(" ")[0]
    assert password not in second[0]
    testing = make_app()
    with testing.app_context():
        assert ensure_demo_user(testing) == []
    login_client = dev.test_client()
    created = login_client.post(
        "/api/v1/auth/tokens",
        json={"username": "demo", "password": password, "device_name": "x"},
    )
    assert created.status_code == 201

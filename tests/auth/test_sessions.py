"""Browser sessions: the login, logout, registration and account pages, remember-me, `next`,
what ends a session, the login forms' odd input, the demo account."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import time_machine
from flask import Flask

from broker.auth.models import ApiToken, User
from broker.platform.db import db
from tests.factories import PASSWORD, csrf_from, csrf_token, log_in, production_settings


def test_login_and_me_with_session_cookie(app, client, make_user, login):
    """A logged-in browser reaches the API with its cookie."""
    user = make_user()
    login(client, "alice", "correct horse battery")
    response = client.get("/api/v1/me")
    assert response.status_code == 200
    assert response.get_json() == {
        "public_id": user.public_id,
        "username": "alice",
        "namespace": "local",
        "is_admin": False,
    }


# --- sessions --------------------------------------------------------------------------------


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
    token = csrf_from(html)
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
    token = csrf_from(client.get("/auth/login").get_data(as_text=True))
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
    log_in(client, "alice", PASSWORD, remember=True)
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
    log_in(client, "alice", PASSWORD, remember=True)
    remember = client.get_cookie("remember_token")
    assert remember is not None and remember.expires is not None
    assert remember.expires <= datetime.now(UTC) + timedelta(days=30, minutes=1)
    assert remember.http_only


def test_password_change_ends_other_sessions_and_revokes_tokens(
    app, client, make_user, login, bearer
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
            "csrf_token": csrf_token(client),
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
            "csrf_token": csrf_token(client),
        },
    )
    assert response.status_code == 302
    assert _is_logged_in(client)
    assert not _is_logged_in(_client_with_session(app, old_session))
    assert client.get("/api/v1/me", headers=header).status_code == 401
    fresh = app.test_client()
    login(fresh, "alice", "a brand new passphrase")


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
        token = csrf_from(c.get("/auth/login", query_string={"next": nxt}).get_data(as_text=True))
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
    token = csrf_from(page.get_data(as_text=True))
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
    from broker.platform.config import finalize

    config = production_settings()
    finalize(config, "/tmp")
    assert config["REGISTRATION"] is False
    assert config["SESSION_COOKIE_SECURE"] and config["REMEMBER_COOKIE_SECURE"]


# --- account page ----------------------------------------------------------------------------


def test_account_page_lists_and_revokes_own_tokens(app, client, make_user, login, bearer):
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
    form = {"csrf_token": csrf_token(client)}
    assert client.post(f"/auth/account/tokens/{theirs}/revoke", data=form).status_code == 404
    assert client.post(f"/auth/account/tokens/{own}/revoke", data=form).status_code == 302
    assert client.get("/api/v1/me", headers=header).status_code == 401


def test_account_page_creates_a_token_shown_once(app, client, make_user, login):
    """A token made on the account page works at once, is shown only in that answer (never
    cached, never stored in the session), and needs the CSRF token and a name."""
    make_user()
    make_user("mallory")
    login(client, "alice", PASSWORD)
    token = csrf_token(client)
    refused = client.post("/auth/account/tokens", data={"name": "laptop"})
    assert refused.status_code == 403  # the app-wide CSRF check, before the view
    nameless = client.post("/auth/account/tokens", data={"name": "   ", "csrf_token": token})
    assert nameless.status_code == 422
    assert 'aria-invalid="true"' in nameless.get_data(as_text=True)
    too_long = client.post("/auth/account/tokens", data={"name": "x" * 101, "csrf_token": token})
    assert too_long.status_code == 422
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(ApiToken)) == 0

    created = client.post("/auth/account/tokens", data={"name": " My phone ", "csrf_token": token})
    assert created.status_code == 200
    assert created.headers["Cache-Control"] == "no-store"
    html = created.get_data(as_text=True)
    secret = re.search(r'id="new-token" type="text" value="(brk_[^"]+)"', html)
    assert secret, html
    header = {"Authorization": f"Bearer {secret.group(1)}"}
    me = client.get("/api/v1/me", headers=header)
    assert me.status_code == 200 and me.get_json()["username"] == "alice"
    with app.app_context():
        row = db.session.scalar(sa.select(ApiToken))
        assert row is not None and row.name == "My phone" and row.user.username == "alice"
        assert row.token_hash != secret.group(1)  # stored hashed, as every token
    # Shown once: the next visit lists it by prefix only.
    again = client.get("/auth/account").get_data(as_text=True)
    assert secret.group(1) not in again and secret.group(1)[:10] in again
    assert secret.group(1) not in str(client.get_cookie("session"))


def test_account_page_revoke_asks_for_confirmation(app, client, make_user, login, bearer):
    """Each Revoke button belongs to a form the page script confirms before sending."""
    make_user()
    bearer(app, "alice")
    login(client, "alice", PASSWORD)
    html = client.get("/auth/account").get_data(as_text=True)
    assert 'class="inline-form revoke-form"' in html and 'data-token-name="pytest"' in html
    assert 'id="confirm-revoke"' in html and "js/account.js" in html


# --- admin role ------------------------------------------------------------------------------


def test_demo_user_is_created_once_in_development_and_its_login_shown_at_every_start(make_app):
    """`make run` creates the demo account once and shows its login at every start while that is
    still its password; a changed password is never shown, and outside development nothing."""
    from broker.auth import users
    from broker.auth.demo import PASSWORD_FILE, ensure_demo_user

    dev = make_app(ENV="development")
    with dev.app_context():
        first = ensure_demo_user(dev)
        db.session.commit()  # as `make run` does: the account is its unit of work
        second = ensure_demo_user(dev)
    assert "password" in first[0] and "new account" in first[0]
    password = first[0].split("password ")[1].split(" ")[0]
    assert password in second[0] and "new account" not in second[0]
    saved = Path(dev.instance_path) / PASSWORD_FILE
    assert saved.stat().st_mode & 0o077 == 0  # its owner's alone
    testing = make_app()
    with testing.app_context():
        assert ensure_demo_user(testing) == []
    login_client = dev.test_client()
    created = login_client.post(
        "/api/v1/auth/tokens",
        json={"username": "demo", "password": password, "device_name": "x"},
    )
    assert created.status_code == 201
    with dev.app_context():
        user = users.find_user(db.session, "demo")
        assert user is not None
        users.set_password(db.session, user, "another-long-passphrase")
        db.session.commit()
        third = ensure_demo_user(dev)
    assert password not in third[0] and "set-password demo" in third[0]


# --- odd input to the forms ------------------------------------------------------------------


JSON_BODIES = [1, "s", [1], None, {"username": 5, "password": [1], "csrf_token": 7}]


@pytest.mark.parametrize("body", JSON_BODIES)
def test_browser_forms_treat_a_json_body_as_an_empty_form(
    make_app: Callable[..., Flask],
    make_user: Callable[..., Any],
    login: Callable[..., Any],
    csrf_headers: Callable[..., dict[str, str]],
    body: Any,
) -> None:
    """Flask-WTF fed JSON values of any type to the form fields (500); now it is an empty form:
    the usual 400/422 refusal, and nothing changes."""
    app = make_app(RATELIMIT_ENABLED=False)
    make_user()
    anonymous = app.test_client()
    for path in ("/auth/login", "/auth/register"):
        response = anonymous.post(path, json=body)
        assert response.status_code in (400, 422), (path, response.status_code)
    client = app.test_client()
    login(client, "alice", PASSWORD)
    headers = csrf_headers(client)
    for path in ("/auth/account/password", "/auth/account/tokens/x1/revoke", "/auth/logout"):
        response = client.post(path, json=body, headers=headers)
        assert response.status_code < 500, (path, response.status_code)
    assert client.get("/api/v1/me").status_code == 401  # the logout went through


def test_a_session_stamped_in_the_future_has_ended(client, make_user, login):
    """A login stamped by a clock a day ahead would last a day longer than the lifetime: it is
    refused instead."""
    make_user()
    with time_machine.travel(time.time() + 86400, tick=False):
        login(client, "alice", "correct horse battery")
        assert _is_logged_in(client)
    assert not _is_logged_in(client)

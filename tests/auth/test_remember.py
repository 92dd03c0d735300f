"""Sessions end when promised: a 12-hour login, remember-me cookies per login for 30 days."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import time_machine
from flask import Flask
from flask.testing import FlaskClient

from broker.auth.models import RememberToken
from broker.platform.db import db
from tests.factories import PASSWORD, log_in

START = datetime(2031, 3, 1, 9, 0, tzinfo=UTC)


def _login(client: FlaskClient, remember: bool) -> None:
    log_in(client, "alice", PASSWORD, remember=remember)


def _logged_in(client: FlaskClient) -> bool:
    return client.get("/api/v1/me").status_code == 200


def _cookie_only(app: Flask, value: str) -> FlaskClient:
    """A browser that kept only the remember cookie (its session cookie ended with it)."""
    client = app.test_client()
    client.set_cookie("remember_token", value)
    return client


def test_each_login_gets_its_own_remember_cookie_stored_hashed(
    app: Flask, make_user: Callable[..., Any]
) -> None:
    """Two remembered logins get two different cookies; the database holds neither value."""
    make_user()
    first, second = app.test_client(), app.test_client()
    _login(first, remember=True)
    _login(second, remember=True)
    one, two = first.get_cookie("remember_token"), second.get_cookie("remember_token")
    assert one is not None and two is not None and one.value != two.value
    assert _logged_in(_cookie_only(app, one.value)) and _logged_in(_cookie_only(app, two.value))
    with app.app_context():
        hashes = set(db.session.scalars(sa.select(RememberToken.token_hash)))
    assert len(hashes) == 2 and not {one.value, two.value} & hashes
    assert not _logged_in(_cookie_only(app, "forged-value"))


def test_a_remember_cookie_counts_for_30_days_after_the_login_and_no_longer(
    app: Flask, make_user: Callable[..., Any]
) -> None:
    """The server refuses the cookie 30 days after the login even if a browser (or a thief)
    still sends it, and tells the browser to drop it; using it never extends it."""
    make_user()
    browser = app.test_client()
    with time_machine.travel(START, tick=False):
        _login(browser, remember=True)
    cookie = browser.get_cookie("remember_token")
    assert cookie is not None and cookie.expires is not None
    assert cookie.expires <= START + timedelta(days=30, seconds=1)
    with time_machine.travel(START + timedelta(days=29, hours=23), tick=False):
        assert _logged_in(_cookie_only(app, cookie.value))
    with time_machine.travel(START + timedelta(days=30, minutes=1), tick=False):
        late = _cookie_only(app, cookie.value)
        response = late.get("/api/v1/me")
        assert response.status_code == 401
        assert "remember_token=;" in response.headers.get("Set-Cookie", "")


def test_a_login_session_ends_after_its_lifetime_unless_remembered(
    app: Flask, make_user: Callable[..., Any]
) -> None:
    """Without remember-me the session ends BROKER_SESSION_LIFETIME (12 h) after the login, in
    the pages, the API and the /i/ redirect alike; with it, a new session starts."""
    make_user()
    plain, remembered = app.test_client(), app.test_client()
    with time_machine.travel(START, tick=False):
        _login(plain, remember=False)
        _login(remembered, remember=True)
    assert app.config["PERMANENT_SESSION_LIFETIME"] == timedelta(hours=12)
    with time_machine.travel(START + timedelta(hours=11, minutes=59), tick=False):
        assert _logged_in(plain)
    with time_machine.travel(START + timedelta(hours=12, minutes=1), tick=False):
        assert not _logged_in(plain)
        assert plain.get("/i/anything/thumb").status_code == 401
        assert _logged_in(remembered)  # a fresh session from the remember cookie


def test_logout_deletes_the_remember_tokens_and_the_cookie(
    app: Flask,
    make_user: Callable[..., Any],
    csrf_headers: Callable[[FlaskClient], dict[str, str]],
) -> None:
    """Logout drops every remember token of the user and tells the browser to drop its cookie."""
    make_user()
    browser = app.test_client()
    _login(browser, remember=True)
    cookie = browser.get_cookie("remember_token")
    assert cookie is not None
    response = browser.post("/auth/logout", headers=csrf_headers(browser))
    assert response.status_code == 302
    assert browser.get_cookie("remember_token") is None
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(RememberToken)) == 0
    assert not _logged_in(_cookie_only(app, cookie.value))


def test_password_change_and_deactivation_revoke_every_remember_cookie(
    app: Flask, make_user: Callable[..., Any]
) -> None:
    """A password change ends the other browsers' remember cookies (the changing browser keeps
    its session); deactivation ends the rest; neither leaves a token row behind."""
    from broker.auth import users

    make_user()
    changer, other = app.test_client(), app.test_client()
    _login(changer, remember=True)
    _login(other, remember=True)
    others = other.get_cookie("remember_token")
    assert others is not None and _logged_in(_cookie_only(app, others.value))
    with app.app_context():
        users.set_password(
            db.session, users.find_user(db.session, "alice"), "a brand new passphrase"
        )
        db.session.commit()
        assert db.session.scalar(sa.select(sa.func.count()).select_from(RememberToken)) == 0
    assert not _logged_in(_cookie_only(app, others.value))

    log_in(changer, "alice", "a brand new passphrase", remember=True)
    fresh = changer.get_cookie("remember_token")
    assert fresh is not None and _logged_in(_cookie_only(app, fresh.value))
    with app.app_context():
        users.deactivate(db.session, users.find_user(db.session, "alice"))
        db.session.commit()
        assert db.session.scalar(sa.select(sa.func.count()).select_from(RememberToken)) == 0
    assert not _logged_in(_cookie_only(app, fresh.value))

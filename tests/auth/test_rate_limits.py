"""The per-username login limit cannot lock out the owner on a browser that logged in before."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest
import time_machine
from flask import Flask
from flask.testing import FlaskClient

from tests.factories import PASSWORD, csrf_from


@pytest.fixture(autouse=True)
def _one_window() -> Iterator[None]:
    """Keep each test on a frozen clock: a window runs from its first hit on the clock, so on a
    loaded machine a slow test could see its counts expire half-way."""
    with time_machine.travel(datetime(2031, 3, 1, 9, 0, 10, tzinfo=UTC), tick=False):
        yield


def _post_login(client: FlaskClient, username: str, password: str, ip: str) -> int:
    environ = {"REMOTE_ADDR": ip}
    page = client.get("/auth/login", environ_base=environ).get_data(as_text=True)
    data = {"username": username, "password": password, "csrf_token": csrf_from(page)}
    return client.post("/auth/login", data=data, environ_base=environ).status_code


def _attack(app: Flask, username: str, attempts: int) -> None:
    """Wrong passwords for `username` from as many addresses as attempts."""
    attacker = app.test_client()
    for n in range(attempts):
        assert _post_login(attacker, username, "wrong password!", f"10.66.0.{n}") == 401


def _known_browser(app: Flask, username: str) -> FlaskClient:
    """A browser that logged in as `username` once and logged out again."""
    client = app.test_client()
    assert _post_login(client, username, PASSWORD, "10.1.0.1") == 302
    assert client.get_cookie("broker_device") is not None
    client.delete_cookie("session")
    return client


def test_the_owner_gets_in_from_a_known_browser_while_the_username_is_attacked(
    make_app: Callable[..., Flask], make_user: Callable[..., Any]
) -> None:
    """Guesses from many addresses lock the username for new browsers, but a browser that has
    logged in as that user before still gets in with the right password."""
    app = make_app(AUTH_RATE_LIMIT="3 per minute")
    make_user("alice")
    known = _known_browser(app, "alice")
    _attack(app, "alice", 3)
    assert _post_login(app.test_client(), "alice", PASSWORD, "10.2.0.1") == 429
    assert _post_login(known, "alice", PASSWORD, "10.1.0.2") == 302


def test_a_device_cookie_is_only_good_for_its_own_user_and_its_own_guesses(
    make_app: Callable[..., Flask], make_user: Callable[..., Any]
) -> None:
    """Bob's device cookie does not open Alice's locked username; a forged cookie does not
    either; and wrong passwords from a known device spend that device's own budget."""
    app = make_app(AUTH_RATE_LIMIT="3 per minute")
    make_user("alice")
    make_user("bob")
    bobs = _known_browser(app, "bob")
    _attack(app, "alice", 3)
    assert _post_login(bobs, "alice", PASSWORD, "10.3.0.1") == 429
    forged = app.test_client()
    forged.set_cookie("broker_device", bobs.get_cookie("broker_device").value[:-4] + "AAAA")
    assert _post_login(forged, "bob", "wrong password!", "10.3.0.2") == 401

    # Bob's own browser guessing wrong: its device budget runs out, the username's does not.
    statuses = [_post_login(bobs, "bob", "wrong password!", f"10.4.0.{n}") for n in range(4)]
    assert statuses == [401, 401, 401, 429]
    assert _post_login(app.test_client(), "bob", PASSWORD, "10.5.0.1") == 302


def test_a_client_over_its_ip_limit_is_refused_before_its_body_is_read(
    make_app: Callable[..., Flask], make_user: Callable[..., Any]
) -> None:
    """Once an address has spent its attempts, the token endpoint and the login form answer 429
    without parsing the body (the per-username limit reads it for the name): a flood of large
    bodies costs the parse only while the budget lasts."""
    app = make_app(AUTH_RATE_LIMIT="2 per minute")
    make_user("alice")
    parsed: list[int] = []
    loads = app.json.loads

    def counting_loads(data: Any, **kwargs: Any) -> Any:
        text = data.decode() if isinstance(data, bytes) else data
        if "device_name" in text:  # a request body (the test client parses answers too)
            parsed.append(len(text))
        return loads(data, **kwargs)

    app.json.loads = counting_loads  # type: ignore[method-assign]
    client = app.test_client()
    body = {"username": "alice", "password": "wrong password!", "device_name": "x" * 50}
    statuses = [client.post("/api/v1/auth/tokens", json=body).status_code for _ in range(2)]
    assert statuses == [401, 401] and parsed  # bodies were read while the budget lasted
    parsed.clear()
    for path in ("/api/v1/auth/tokens", "/auth/login"):
        response = client.post(path, json=body)
        assert response.status_code == 429, path
        assert "Retry-After" in response.headers
    assert parsed == []


def _token_request(
    app: Flask, username: str, password: str, ip: str, device: str | None = None
) -> Any:
    headers = {"Broker-Device": device} if device else {}
    body = {"username": username, "password": password, "device_name": "phone"}
    return app.test_client().post(
        "/api/v1/auth/tokens", json=body, headers=headers, environ_base={"REMOTE_ADDR": ip}
    )


def test_an_api_client_proves_its_device_with_the_header_it_was_given(
    make_app: Callable[..., Flask], make_user: Callable[..., Any]
) -> None:
    """A phone has no cookie jar: the token answer hands it the device value as `Broker-Device`,
    and sending it back on a later token request spares it the username's lock-out."""
    app = make_app(AUTH_RATE_LIMIT="3 per minute")
    make_user("alice")
    first = _token_request(app, "alice", PASSWORD, "10.1.0.1")
    assert first.status_code == 201
    device = first.headers["Broker-Device"]
    for n in range(3):  # someone guesses from three addresses: the username is locked
        assert _token_request(app, "alice", "wrong password!", f"10.66.0.{n}").status_code == 401
    assert _token_request(app, "alice", PASSWORD, "10.2.0.1").status_code == 429
    assert _token_request(app, "alice", PASSWORD, "10.1.0.2", device).status_code == 201
    # The value is bound to its user and signed: no use for another username, nor forged.
    make_user("bob")
    for n in range(3):
        _token_request(app, "bob", "wrong password!", f"10.67.0.{n}")
    assert _token_request(app, "bob", PASSWORD, "10.1.0.3", device).status_code == 429
    forged = device[:-4] + ("AAAA" if not device.endswith("AAAA") else "BBBB")
    assert _token_request(app, "alice", PASSWORD, "10.1.0.4", forged).status_code == 429


def test_concurrent_guesses_never_check_more_passwords_than_the_limit(
    make_app: Callable[..., Flask], make_user: Callable[..., Any]
) -> None:
    """32 wrong passwords for one user from 32 addresses, 8 at a time: each attempt is counted
    before its password is checked, so exactly the limit's 10 are checked (401) and the rest
    refused (429); the owner's own successful logins are given back to the username's budget."""
    app = make_app(AUTH_RATE_LIMIT="10 per minute", PASSWORD_HASH_CONCURRENCY=8)
    make_user("alice")
    for n in range(3):  # logins that succeed do not use up the username's guesses
        assert _token_request(app, "alice", PASSWORD, f"10.1.0.{n}").status_code == 201
    with ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(
                lambda n: _token_request(app, "alice", "wrong password!", f"10.66.0.{n}"),
                range(32),
            )
        )
    codes = sorted(r.status_code for r in statuses)
    assert codes.count(401) == 10, codes
    assert codes.count(429) == 22, codes

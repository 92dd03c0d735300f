"""The lean hot path: per-request work only where it applies, every promise kept.

Security headers and the request id are added around the app (WSGI middleware), so they are
checked here on every kind of response, over real HTTP too; the session and the user are only
loaded where a request needs them, which the query counts and cookie headers show.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests
import sqlalchemy as sa
from flask import Flask, Response, session

from broker.platform.db import db
from tests.factories import PASSWORD, live_server, log_in

SECURITY = {
    "Content-Security-Policy",
    "X-Content-Type-Options",
    "Referrer-Policy",
    "X-Frame-Options",
    "Cross-Origin-Opener-Policy",
}


def _assert_promised_headers(response: Any, what: str) -> None:
    """Each security header exactly once, and a request id."""
    for name in SECURITY:
        values = response.headers.getlist(name) if hasattr(response.headers, "getlist") else None
        if values is None:  # requests: repeated headers arrive joined by ", "
            values = [response.headers[name]] if name in response.headers else []
        assert len(values) == 1, (what, name, values)
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"]), what


@contextmanager
def count_queries(app: Flask) -> Iterator[list[str]]:
    """Collect every SQL statement the app's engine runs inside the block."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    with app.app_context():
        engine = db.engine
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def test_headers_and_request_id_on_every_kind_of_response(make_app, make_user, bearer):
    """Pages, API answers, redirects, static files, 404/405/401/403/429 and a 500 all carry
    the security headers once and an X-Request-ID."""
    app = make_app(AUTH_RATE_LIMIT="2 per minute")
    app.config["PROPAGATE_EXCEPTIONS"] = False

    @app.get("/api/v1/boom")
    def boom() -> str:
        raise RuntimeError("secret internals")

    alice = make_user()
    auth = bearer(app, alice)
    client = app.test_client()
    browser = app.test_client()
    log_in(browser)  # the first of the two attempts this address may make within the minute
    static = client.get("/static/css/app.css")
    static.close()
    answers = {
        "page": (client.get("/auth/login"), 200),
        "api": (client.get("/api/v1/uploads", headers=auth), 200),
        "redirect to login": (client.get("/gallery"), 302),
        "static": (static, 200),
        "page 404": (client.get("/nope", headers={"Accept": "text/html"}), 404),
        "api 404": (client.get("/api/v1/nope"), 404),
        "405": (client.put("/api/v1/uploads", headers=auth), 405),
        "401": (client.get("/api/v1/uploads"), 401),
        "500": (client.get("/api/v1/boom"), 500),
    }
    token_body = {"username": "alice", "password": "wrong password!", "device_name": "x"}
    assert client.post("/api/v1/auth/tokens", json=token_body).status_code == 401
    answers["429"] = (client.post("/api/v1/auth/tokens", json=token_body), 429)
    answers["403 csrf"] = (browser.post("/api/v1/uploads", json={}), 403)
    for what, (response, status) in answers.items():
        assert response.status_code == status, (what, response.status_code)
        _assert_promised_headers(response, what)
    # The limiter's own headers still come with a checked limit.
    assert "Retry-After" in answers["429"][0].headers
    # The 500 page quotes the very id the response carries, for the operator's log search.
    failed = answers["500"][0]
    assert failed.headers["X-Request-ID"] in failed.get_json()["error"]["message"]


def test_a_view_keeps_a_security_header_it_sets_itself(app):
    """A response that chose its own policy keeps it; the others are still added."""

    @app.get("/own-policy")
    def own_policy() -> Response:
        return Response("ok", headers={"Content-Security-Policy": "default-src 'none'"})

    response = app.test_client().get("/own-policy")
    assert response.headers.getlist("Content-Security-Policy") == ["default-src 'none'"]
    _assert_promised_headers(response, "own policy")


def test_headers_request_id_and_log_line_over_real_http(app, caplog):
    """Through a real HTTP server: a static file, a 404 and a page carry the headers, and each
    request logs one line with its id."""
    with live_server(app) as base, caplog.at_level(logging.INFO, logger="broker.request"):
        answers = [
            requests.get(base + "/static/js/client.js", timeout=10),
            requests.get(base + "/missing", timeout=10),
            requests.get(base + "/auth/login", headers={"X-Request-ID": "trace-42"}, timeout=10),
        ]
    assert [r.status_code for r in answers] == [200, 404, 200]
    for response in answers[:2]:
        _assert_promised_headers(response, response.url)
    assert answers[2].headers["X-Request-ID"] == "trace-42"
    lines = [r.getMessage() for r in caplog.records if r.name == "broker.request"]
    assert re.fullmatch(
        rf"GET /static/js/client.js 200 \d+\.\dms request_id={answers[0].headers['X-Request-ID']}",
        lines[0],
    )
    assert lines[1].startswith("GET /missing 404 ")
    assert lines[2].endswith("request_id=trace-42")


def test_routes_that_need_no_user_run_no_query(app, make_user, bearer):
    """Probes and static files look up no credential: a bearer token or a session cookie sent
    to them costs no database work, while an API route does look the token up."""
    alice = make_user()
    auth = bearer(app, alice)
    browser = app.test_client()
    log_in(browser)
    with count_queries(app) as probes:
        assert app.test_client().get("/livez", headers=auth).status_code == 200
        assert browser.get("/livez").status_code == 200
        with app.test_client().get("/static/css/app.css", headers=auth) as static:
            assert static.status_code == 200
        with browser.get("/static/js/client.js") as static:
            assert static.status_code == 200
    assert probes == []
    with count_queries(app) as api:
        assert app.test_client().get("/api/v1/uploads", headers=auth).status_code == 200
    assert api, "the counter sees the token lookup"


def test_a_probe_sees_no_user_even_with_a_valid_token(app, make_user, bearer):
    """On a route that needs no user, the bearer's owner is not looked up: nobody is logged in
    there (no cookie's user either: a header means the header alone decides)."""
    from flask_login import current_user

    from broker.platform.routing import needs_no_user

    seen: list[bool] = []

    @app.get("/probe-user")
    @needs_no_user
    def probe_user() -> str:
        seen.append(current_user.is_authenticated)
        return "ok"

    alice = make_user()
    client = app.test_client()
    log_in(client)
    assert client.get("/probe-user", headers=bearer(app, alice)).status_code == 200
    assert client.get("/probe-user").status_code == 200
    assert seen == [False, True]  # the cookie's user when no header is sent


def test_no_session_cookie_and_no_vary_where_the_session_is_not_used(app, make_user):
    """A request that brings no session and whose view does not read it gets no Set-Cookie and
    no `Vary: Cookie`; a page that reads the session still says it varies by cookie."""
    make_user()
    client = app.test_client()
    probe = client.get("/livez")
    assert "Set-Cookie" not in probe.headers
    assert "Cookie" not in probe.headers.get("Vary", "")
    log_in(client, "alice", PASSWORD)
    account = client.get("/auth/account")
    assert account.status_code == 200
    assert "Cookie" in account.headers["Vary"]


def test_session_changes_are_still_saved(app):
    """A view that writes the session (no cookie sent) gets its cookie; one that clears it
    gets the cookie deleted — the fast path skips only sessions nobody touched."""

    @app.get("/session/set")
    def set_value() -> str:
        session["probe"] = "x"
        return "ok"

    @app.get("/session/read")
    def read_value() -> str:
        return str(session.get("probe"))

    @app.get("/session/clear")
    def clear_value() -> str:
        session.clear()
        return "ok"

    client = app.test_client()
    assert client.get("/session/set").headers.get("Set-Cookie", "").startswith("session=")
    assert client.get("/session/read").text == "x"
    cleared = client.get("/session/clear")
    assert "Expires=Thu, 01 Jan 1970" in cleared.headers["Set-Cookie"]
    assert client.get("/session/read").text == "None"


def test_a_dead_remember_cookie_is_dropped_where_it_is_seen_and_nowhere_else(app, make_user):
    """A remember cookie the server no longer honours is deleted on the response that found
    it dead (a page, the API); requests without one, or with a live one, get no such header."""
    make_user()
    remembered = app.test_client()
    log_in(remembered, remember=True)
    live = remembered.get_cookie("remember_token")
    assert live is not None
    for path, status in (("/gallery", 302), ("/api/v1/me", 401)):
        dead = app.test_client()
        dead.set_cookie("remember_token", "forged-" + live.value[:20])
        answer = dead.get(path)
        assert answer.status_code == status, path
        dropped = [c for c in answer.headers.getlist("Set-Cookie") if "remember_token=" in c]
        assert len(dropped) == 1 and "remember_token=;" in dropped[0], (path, dropped)
        assert "Max-Age=0" in dropped[0] or "Expires=Thu, 01 Jan 1970" in dropped[0]
    fresh = app.test_client()
    fresh.set_cookie("remember_token", live.value)
    assert fresh.get("/api/v1/me").status_code == 200  # a live one starts a session instead
    for client in (app.test_client(), fresh):
        answer = client.get("/api/v1/me")
        assert not any("remember_token" in c for c in answer.headers.getlist("Set-Cookie"))


def test_the_inline_worker_hook_runs_once_per_process(make_app):
    """With WORKER_INLINE the first request starts the worker and the hook leaves the app's
    hooks; later requests run none of it, and the worker keeps running."""
    from broker import worker

    app = make_app(WORKER_INLINE=True, WORKER_POLL_INTERVAL=30)
    before = list(app.before_request_funcs[None])
    start = [f for f in before if getattr(f, "__name__", "") == "start_inline_worker"]
    assert len(start) == 1
    try:
        assert app.test_client().get("/livez").status_code == 200
        running = app.extensions[worker.INLINE_KEY]
        assert running.thread.is_alive()
        assert app.before_request_funcs[None] == [f for f in before if f is not start[0]]
        assert app.test_client().get("/livez").status_code == 200
        assert app.extensions[worker.INLINE_KEY] is running and running.thread.is_alive()
    finally:
        app.extensions[worker.INLINE_KEY].close()

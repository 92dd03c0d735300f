"""Dependencies that fail degrade the broker instead of making it answer 500: a real
redis-server stopped and started again under the rate limits, and a real database that refuses
connections (SQLite: a file that cannot be opened; PostgreSQL: a closed port, and connections
terminated under the app with pg_terminate_backend)."""

from __future__ import annotations

import gc
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import time_machine
from flask import Flask
from sqlalchemy.engine import make_url

from broker import create_app
from broker.platform.db import db
from tests import factories
from tests.conftest import base_config
from tests.support.redis_server import redis_server

METRICS = {"Authorization": "Bearer metrics-secret"}


def _token_request(app: Flask, ip: str = "10.9.0.1") -> Any:
    body = {"username": "mallory", "password": "not the password", "device_name": "x"}
    return app.test_client().post(
        "/api/v1/auth/tokens", json=body, environ_base={"REMOTE_ADDR": ip}
    )


def _metric(app: Flask, name: str) -> float:
    text = app.test_client().get("/metrics", headers=METRICS).get_data(as_text=True)
    (line,) = [line for line in text.splitlines() if line.startswith(f"{name} ")]
    return float(line.split()[1])


def test_rate_limits_fall_back_to_the_process_while_redis_is_down(
    make_app: Callable[..., Flask], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with redis_server(tmp_path) as redis:
        app = make_app(
            RATELIMIT_STORAGE_URI=redis.uri,
            AUTH_RATE_LIMIT="3 per minute",
            METRICS_TOKEN="metrics-secret",
        )
        client = app.test_client()
        assert client.get("/readyz").get_json() == {
            "status": "ok",
            "database": "ok",
            "ratelimit_storage": "ok",
        }
        assert _token_request(app).status_code == 401
        assert _metric(app, "broker_ratelimit_storage_up") == 1
        fallbacks = _metric(app, "broker_ratelimit_fallbacks")

        redis.stop()
        caplog.set_level(logging.WARNING, logger="broker.outages")
        # Counted in the process now: the limit still holds, and nothing is a 500.
        statuses = [_token_request(app, "10.9.0.2").status_code for _ in range(5)]
        assert statuses == [401, 401, 401, 429, 429]
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.get_json() == {
            "status": "degraded",
            "database": "ok",
            "ratelimit_storage": "unreachable: counting in-process",
        }
        assert _metric(app, "broker_ratelimit_storage_up") == 0
        assert _metric(app, "broker_ratelimit_fallbacks") == fallbacks + 1
        switched = [r for r in caplog.records if "rate-limit storage unreachable" in r.message]
        assert len(switched) == 1  # logged once, not per request

        # Back: Flask-Limiter checks the storage again (backing off; the clock moves on) and
        # counts in it from then on.
        redis.start()
        with time_machine.travel(time.time() + 600, tick=False):
            assert _token_request(app, "10.9.0.3").status_code == 401
            assert _metric(app, "broker_ratelimit_storage_up") == 1
        assert client.get("/readyz").get_json()["status"] == "ok"
        assert any("answers again" in r.message for r in caplog.records)


def test_an_oversized_body_is_413_not_a_rate_limit_storage_outage(
    make_app: Callable[..., Flask], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The per-username limit reads the username from the body: a body over the cap must be
    the caller's 413, not an error inside the limiter that it takes for its storage failing
    (a false outage in the log and the metrics, and rate limits counted per process)."""
    with redis_server(tmp_path) as redis:
        app = make_app(RATELIMIT_STORAGE_URI=redis.uri, METRICS_TOKEN="metrics-secret")
        fallbacks = _metric(app, "broker_ratelimit_fallbacks")
        caplog.set_level(logging.WARNING, logger="broker.outages")
        big = b'{"username": "' + b"a" * (2 * 1024 * 1024) + b'"}'
        response = app.test_client().post(
            "/api/v1/auth/tokens", data=big, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413
        assert response.get_json()["error"]["code"] == "request_entity_too_large"
        assert _metric(app, "broker_ratelimit_storage_up") == 1
        assert _metric(app, "broker_ratelimit_fallbacks") == fallbacks
        assert [r.message for r in caplog.records if r.name == "broker.outages"] == []


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _unreachable_database(database_url: str, tmp_path: Path) -> str:
    """The test database's URL, pointed where no database answers."""
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        return url.set(host="127.0.0.1", port=_closed_port()).render_as_string(False)
    return f"sqlite:///{tmp_path}/missing/dir/broker.sqlite3"  # a folder that does not exist


def test_a_database_that_refuses_connections_is_503_with_retry_after(
    database_url: str, tmp_path: Path
) -> None:
    config = base_config(_unreachable_database(database_url, tmp_path), str(tmp_path))
    app = create_app(config)
    client = app.test_client()
    answer = client.get("/api/v1/me", headers=factories.bearer_header("brk_" + "x" * 43))
    assert answer.status_code == 503
    assert answer.get_json()["error"]["code"] == "database_unavailable"
    assert answer.headers["Retry-After"] == "5"
    created = client.post(
        "/api/v1/uploads", json={}, headers=factories.bearer_header("brk_" + "y" * 43)
    )
    assert created.status_code == 503
    from broker.auth import remember

    client.set_cookie(remember.COOKIE, "a-remembered-login")  # looked up in the database
    page = client.get("/gallery")
    assert page.status_code == 503 and "text/html" in page.content_type
    client.delete_cookie(remember.COOKIE)
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["database"] == "unreachable"
    assert client.get("/livez").status_code == 200
    with app.app_context():
        db.engine.dispose()


def _terminate_backends(postgres_url: str) -> int:
    """Terminate every other connection to the test database, as a server restart would."""
    killer = sa.create_engine(postgres_url)
    try:
        with killer.connect() as conn:
            killed: int = conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
    finally:
        killer.dispose()
    return killed


@pytest.fixture
def dead_connections_collected() -> Iterator[None]:
    """After the app is gone, collect what these outages left behind, so that a connection
    nobody closed fails this test (psycopg's ResourceWarning) instead of a random later one."""
    yield
    gc.collect()


def test_connections_the_server_terminates_are_replaced_and_the_request_run_again(
    dead_connections_collected: None,
    app: Flask,
    make_user: Callable[..., Any],
    database_url: str,
    caplog: Any,
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("terminates PostgreSQL backends: runs in the PostgreSQL pass")
    user = make_user("ana")
    bearer = factories.issue_token(app, user)
    client = app.test_client()
    assert client.get("/api/v1/me", headers=bearer).status_code == 200
    assert _terminate_backends(database_url) >= 1
    # The pooled connection is dead: the request meets it, and is run again on a new one.
    with caplog.at_level(logging.WARNING, "broker.outages"):
        answers = [client.get("/api/v1/me", headers=bearer).status_code for _ in range(3)]
    assert answers == [200, 200, 200], answers
    assert [r.getMessage() for r in caplog.records if r.name == "broker.outages"] == [
        "database connection dropped: replaced, request run again"
    ]
    # The token cache's own connection died too: a warning, never an error with a traceback.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert client.get("/readyz").status_code == 200
    with app.app_context():
        db.engine.dispose()  # the other dead connections: none reaches the suite's clean-up


def test_a_create_whose_connection_drops_before_it_wrote_is_run_again_once(
    dead_connections_collected: None, app: Flask, make_user: Callable[..., Any], database_url: str
) -> None:
    """The connection dies between the authentication and the create's first write: the
    create runs again on a new connection (201, one upload), while a connection that dies
    after a commit or a call to Cloudflare gives 503 (the request is not run twice)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("terminates PostgreSQL backends: runs in the PostgreSQL pass")
    from flask import request

    from broker.uploads.models import Upload

    user = make_user("ana")
    bearer = factories.issue_token(app, user)
    drops: list[str] = []

    @app.before_request
    def drop_the_connection_once() -> None:  # after the authentication's lookups
        if request.path == "/api/v1/uploads" and not drops:
            drops.append(request.path)
            _terminate_backends(database_url)

    client = app.test_client()
    created = client.post("/api/v1/uploads", json={}, headers=bearer)
    assert created.status_code == 201, created.get_json()
    assert drops == ["/api/v1/uploads"]
    with app.app_context():
        assert len(db.session.scalars(sa.select(Upload)).all()) == 1

    from broker.uploads import create

    real = create.create_upload

    def drop_after_cloudflare(*args: Any, **kwargs: Any) -> Any:
        made = real(*args, **kwargs)  # the draft exists at Cloudflare now
        _terminate_backends(database_url)
        return made

    create.create_upload = drop_after_cloudflare  # type: ignore[assignment]
    try:
        refused = client.post("/api/v1/uploads", json={}, headers=bearer)
    finally:
        create.create_upload = real  # type: ignore[assignment]
    assert refused.status_code == 503, refused.get_json()
    assert refused.headers["Retry-After"] == "5"
    with app.app_context():
        assert len(db.session.scalars(sa.select(Upload)).all()) == 1
    with app.app_context():  # once the session gave its connection back, or it is never closed
        db.engine.dispose()


def test_a_create_whose_connection_drops_after_its_reservation_is_not_run_again(
    dead_connections_collected: None, app: Flask, make_user: Callable[..., Any], database_url: str
) -> None:
    """The reservation is committed on a connection of its own, then the next statement meets
    a dropped connection before anything went to Cloudflare: 503, not a second run (which
    would hold a second reservation of the user's quota)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("terminates PostgreSQL backends: runs in the PostgreSQL pass")
    from broker.upstream.cloudflare import CloudflareImages

    user = make_user("ana")
    bearer = factories.issue_token(app, user)
    client = app.test_client()
    # The first request stamps the token's last use (a commit of the view's, once a minute).
    assert client.post("/api/v1/uploads", json={}, headers=bearer).status_code == 201
    calls: list[str] = []
    real = CloudflareImages.direct_upload

    def drop_before_cloudflare(self: CloudflareImages, *args: Any, **kwargs: Any) -> Any:
        calls.append("direct_upload")
        if len(calls) == 1:
            _terminate_backends(database_url)
            db.session.execute(sa.text("select 1"))  # meets the dropped connection
        return real(self, *args, **kwargs)

    CloudflareImages.direct_upload = drop_before_cloudflare  # type: ignore[method-assign]
    try:
        refused = client.post("/api/v1/uploads", json={}, headers=bearer)
    finally:
        CloudflareImages.direct_upload = real  # type: ignore[method-assign]
    assert refused.status_code == 503, refused.get_json()
    assert calls == ["direct_upload"]  # run once
    with app.app_context():
        db.engine.dispose()


def test_a_create_run_again_with_the_token_cache_warm_is_created(
    dead_connections_collected: None, app: Flask, make_user: Callable[..., Any], database_url: str
) -> None:
    """The token kept in memory joins the request's session; the reservation's connection is
    dropped: the create runs again on a fresh session (201), not into the first run's."""
    if not database_url.startswith("postgresql"):
        pytest.skip("terminates PostgreSQL backends: runs in the PostgreSQL pass")
    from broker.uploads import quotas

    user = make_user("ana")
    bearer = factories.issue_token(app, user)
    client = app.test_client()
    assert client.post("/api/v1/uploads", json={}, headers=bearer).status_code == 201  # warm
    real = quotas.reserve_slot
    drops: list[str] = []

    def drop_once(conn: sa.Connection, *args: Any, **kwargs: Any) -> Any:
        if not drops:
            drops.append("reserve_slot")
            _terminate_backends(database_url)
        return real(conn, *args, **kwargs)

    quotas.reserve_slot = drop_once  # type: ignore[assignment]
    try:
        created = client.post("/api/v1/uploads", json={}, headers=bearer)
    finally:
        quotas.reserve_slot = real  # type: ignore[assignment]
    assert drops == ["reserve_slot"]
    assert created.status_code == 201, created.get_json()
    with app.app_context():
        db.engine.dispose()

"""Shared fixtures: a migrated real database (SQLite or PostgreSQL), the app, its clients.

The database comes from BROKER_TEST_DATABASE_URL when set (CI's PostgreSQL pass), else a
SQLite file in a temporary folder. The schema is built once per session by the Alembic
migrations (so tests run against what production runs), and emptied after every test.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from broker import create_app
from broker.platform.db import db
from tests.openapi_check import SpecCheckingClient

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(available: bool, reason: str) -> None:
    """Skip a test whose dependency is missing, with its reason; in CI, fail it instead."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The URL of the database the suite runs on."""
    url = os.environ.get("BROKER_TEST_DATABASE_URL")
    if url:
        return url
    return f"sqlite:///{tmp_path_factory.mktemp('db')}/broker-test.sqlite3"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A PostgreSQL URL for tests that need PostgreSQL itself (skip or, in CI, fail without)."""
    url = os.environ.get("BROKER_TEST_POSTGRES_URL") or os.environ.get("BROKER_TEST_DATABASE_URL")
    require(bool(url and url.startswith("postgresql")), "needs BROKER_TEST_POSTGRES_URL")
    assert url
    return url


# The least a production configuration needs; tests add or override what they probe.
PRODUCTION_SETTINGS: dict[str, Any] = {
    "ENV": "production",
    "SECRET_KEY": "s" * 40,
    "CLOUDFLARE_ACCOUNT_ID": "a",
    "CLOUDFLARE_API_TOKEN": "t",
    "CLOUDFLARE_ACCOUNT_HASH": "h",
}


def base_config(database_url: str, instance_path: str, **overrides: Any) -> dict[str, Any]:
    """Return the test configuration every app in the suite starts from."""
    config: dict[str, Any] = {
        "ENV": "testing",
        "TESTING": True,
        "SECRET_KEY": "test-secret-key-not-for-production",
        "DATABASE_URL": database_url,
        "LOG_LEVEL": "WARNING",
        "WORKER_INLINE": False,
        "INSTANCE_PATH": instance_path,
    }
    config.update(overrides)
    return config


def _reset_schema(url: str) -> None:
    """Drop every table so the migrations start from an empty database."""
    engine = sa.create_engine(url)
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.begin() as conn:
            meta.drop_all(conn)
            conn.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def migrated(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Build the schema once per session by running every migration."""
    from flask_migrate import upgrade

    _reset_schema(database_url)
    app = create_app(base_config(database_url, str(tmp_path_factory.mktemp("instance"))))
    with app.app_context():
        upgrade()
        db.engine.dispose()
    return database_url


def _empty_tables(app: Flask) -> None:
    with app.app_context():
        tables = [t for t in reversed(db.metadata.sorted_tables)]
        with db.engine.begin() as conn:
            if conn.dialect.name == "postgresql" and tables:
                names = ", ".join(f'"{t.name}"' for t in tables)
                conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
            else:
                for table in tables:
                    conn.execute(table.delete())
        db.session.remove()
        db.engine.dispose()


@pytest.fixture(scope="session")
def emulator() -> Iterator[Any]:
    """One Cloudflare Images emulator over real HTTP for the session (apps point at it)."""
    from broker.emulator.testing import EmulatorServer

    with EmulatorServer() as server:
        yield server


def emulator_config(emulator: Any) -> dict[str, Any]:
    """Return the broker settings that point an app at `emulator`."""
    return {
        "CLOUDFLARE_API_BASE": f"{emulator.url}/client/v4",
        "CLOUDFLARE_ACCOUNT_ID": emulator.account_id,
        "CLOUDFLARE_API_TOKEN": emulator.api_token,
        "CLOUDFLARE_ACCOUNT_HASH": emulator.account_hash,
        "CLOUDFLARE_DELIVERY_BASE": emulator.url,
        "CLOUDFLARE_UPLOAD_ORIGIN": emulator.url,
    }


@pytest.fixture
def make_app(
    migrated: str, tmp_path: pytest.TempPathFactory, emulator: Any
) -> Iterator[Callable[..., Flask]]:
    """Build apps on the migrated test database, pointed at the emulator (its counters, faults
    and clock reset for each test); every table is emptied after the test."""
    apps: list[Flask] = []
    emulator.reset()

    def factory(**overrides: Any) -> Flask:
        config = {**emulator_config(emulator), **overrides}
        app = create_app(base_config(migrated, str(tmp_path), **config))
        app.test_client_class = SpecCheckingClient
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.extensions["budget"].engine.dispose()  # the budget's own pool (broker/budget.py)
    if apps:
        _empty_tables(apps[0])
        for app in apps[1:]:
            with app.app_context():
                db.engine.dispose()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    """The broker app with the test configuration."""
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client for the app."""
    return app.test_client()


# --- Authentication -------------------------------------------------------------------------

_CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


@pytest.fixture
def make_user(app: Flask) -> Callable[..., Any]:
    """Create and commit a user; returns the User DETACHED (expunged, every column loaded).

    Read its attributes freely (id, public_id, username, …); to change it, load it again inside
    an app context: `db.session.get(User, user.id)`. Works with users of any app of the test,
    since every app shares the one database.
    """
    from broker.auth import users
    from broker.auth.models import User

    def factory(
        username: str = "alice", password: str = "correct horse battery", *, is_admin: bool = False
    ) -> User:
        with app.app_context():
            user = users.create_user(db.session, username, password, is_admin=is_admin)
            db.session.commit()
            db.session.refresh(user)
            db.session.expunge(user)
            return user

    return factory


def _csrf_from(html: str) -> str:
    match = _CSRF_META.search(html)
    assert match, "no CSRF token on the page"
    return match.group(1)


@pytest.fixture
def login() -> Callable[..., Any]:
    """Log a test client in through the real login form; returns the login POST's response."""

    def do_login(  # type: ignore[no-untyped-def]
        client: FlaskClient, username: str = "alice", password: str = "correct horse battery"
    ):
        page = client.get("/auth/login")
        assert page.status_code == 200, page.status_code
        token = _csrf_from(page.get_data(as_text=True))
        response = client.post(
            "/auth/login",
            data={"username": username, "password": password, "csrf_token": token},
        )
        assert response.status_code == 302, f"login failed: {response.status_code}"
        return response

    return do_login


@pytest.fixture
def csrf_headers() -> Callable[[FlaskClient], dict[str, str]]:
    """Return `{"X-CSRFToken": …}` for the client's current (logged-in or anonymous) session."""

    def headers(client: FlaskClient) -> dict[str, str]:
        page = client.get("/auth/account")
        if page.status_code != 200:
            page = client.get("/auth/login")
        return {"X-CSRFToken": _csrf_from(page.get_data(as_text=True))}

    return headers


@pytest.fixture
def bearer() -> Callable[..., dict[str, str]]:
    """Issue a fresh API token for a user (User or username); returns the Authorization header."""
    from broker.auth import tokens, users
    from broker.auth.models import User

    def issue(app: Flask, user_or_username: Any) -> dict[str, str]:
        with app.app_context():
            if isinstance(user_or_username, User):
                user = db.session.get(User, user_or_username.id)
            else:
                user = users.find_user(db.session, str(user_or_username))
            assert user is not None, f"no user {user_or_username!r}"
            issued = tokens.issue(db.session, user, "pytest")
            db.session.commit()
            return {"Authorization": f"Bearer {issued.secret}"}

    return issue

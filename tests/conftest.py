"""Fixtures every test package shares: a migrated real database (SQLite or PostgreSQL), the
app, its clients, the emulator, users, tokens, sessions and the webhook `receiver`.

The database comes from BROKER_TEST_DATABASE_URL when set (CI's PostgreSQL pass), else a
SQLite file in a temporary folder. The schema is built once per session by the Alembic
migrations (so tests run against what production runs), and emptied after every test.

The builders behind the fixtures live in `tests/factories.py`; a package's own conftest holds
only what that package's tests share.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from broker import create_app
from broker.platform.db import db
from tests import factories
from tests.factories import TEST_ENCRYPTION_KEY, emulator_config
from tests.support.openapi_check import SpecCheckingClient

# The recording webhook receiver (`receiver`), for webhooks, uploads and worker tests; the one
# Chromium (`browser`) every suite shares.
pytest_plugins = ["tests.support.webhook_receiver", "tests.support.chromium"]

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(available: bool, reason: str) -> None:
    """Skip a test whose dependency is missing, with its reason; in CI, fail it instead."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


# CI runs the suite twice: on SQLite, then with BROKER_TEST_DATABASE_URL on PostgreSQL. Its second
# pass sets BROKER_TEST_DATABASE_ONLY=1 and runs only the tests whose outcome can depend on that
# URL: those that ask, directly or through another fixture, for `database_url` (every app, user and
# browser test does), and, when BROKER_TEST_POSTGRES_URL does not name their server already, those
# that ask for `postgres_url`. No other test reads the variable, so the rest (the emulator's, pure
# logic, the README and packaging runners, SQLite's own) would run again exactly as they just did.
DATABASE_ONLY = os.environ.get("BROKER_TEST_DATABASE_ONLY") == "1"
_LEFT_FOR_SQLITE = pytest.StashKey[int]()


def _reads_the_test_database(item: pytest.Item) -> bool:
    names = set(getattr(item, "fixturenames", ()))
    if "database_url" in names:
        return True
    return "postgres_url" in names and not os.environ.get("BROKER_TEST_POSTGRES_URL")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With BROKER_TEST_DATABASE_ONLY=1, deselect the tests that never reach the test database."""
    if not DATABASE_ONLY:
        return
    kept, left = [], []
    for item in items:
        (kept if _reads_the_test_database(item) else left).append(item)
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = kept
    config.stash[_LEFT_FOR_SQLITE] = len(left)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Say once how many tests the database-only pass left to the SQLite pass, and why."""
    left = config.stash.get(_LEFT_FOR_SQLITE, 0)
    if left:
        terminalreporter.write_line(
            f"{left} database-independent tests deselected (BROKER_TEST_DATABASE_ONLY=1):"
            " they never reach BROKER_TEST_DATABASE_URL and run in the SQLite pass"
        )


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
        "ENCRYPTION_KEYS": [TEST_ENCRYPTION_KEY],
        # The worker's scheduled Cloudflare-wide jobs stay out of tests that do not ask for them.
        "RECONCILE_INTERVAL": 0,
        "USAGE_INTERVAL": 0,
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


# Every sequence of the schema (each one an id column's) starts again at 1.
RESTART_SEQUENCES = sa.text(
    "SELECT setval(c.oid, 1, false) FROM pg_class c"
    " WHERE c.relkind = 'S' AND c.relnamespace = current_schema()::regnamespace"
)


def _empty_tables(app: Flask) -> None:
    with app.app_context():
        tables = [t for t in reversed(db.metadata.sorted_tables)]
        with db.engine.begin() as conn:
            for table in tables:
                conn.execute(table.delete())
            if conn.dialect.name == "postgresql":
                # DELETE and restart the ids, not TRUNCATE ... RESTART IDENTITY: a test leaves a
                # few rows, and TRUNCATE's new files for 24 tables cost ~40 ms more each test.
                conn.execute(RESTART_SEQUENCES)
        db.session.remove()
        db.engine.dispose()


@pytest.fixture(scope="session")
def emulator() -> Iterator[Any]:
    """One Cloudflare Images emulator over real HTTP for the session (apps point at it)."""
    from broker.emulator.testing import EmulatorServer

    with EmulatorServer() as server:
        yield server


@pytest.fixture
def fresh_emulator(tmp_path: Path) -> Iterator[Any]:
    """An emulator of this test's own (data under `tmp_path`), for tests that change what the
    account holds (keys, variants) or need a pristine one; a package selects it as its
    `emulator` in its conftest."""
    from broker.emulator.testing import EmulatorServer

    with EmulatorServer(tmp_path / "emulator") as server:
        yield server


@pytest.fixture
def http() -> Iterator[requests.Session]:
    """A plain HTTP session with no credentials, as a browser fetching images."""
    with requests.Session() as session:
        yield session


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
        app.extensions["tokens"].close()  # the token cache's own connections (and thread)
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


# --- users, tokens, sessions (see tests/factories.py) -----------------------------------------


@pytest.fixture
def make_user(app: Flask) -> Callable[..., Any]:
    """`make_user(username="alice", password=PASSWORD, *, is_admin=False)`: a committed user,
    detached (see `factories.create_user`)."""

    def make(
        username: str = "alice", password: str = factories.PASSWORD, *, is_admin: bool = False
    ) -> Any:
        return factories.create_user(app, username, password, is_admin=is_admin)

    return make


@pytest.fixture
def login() -> Callable[..., Any]:
    """`login(client, username="alice", password=PASSWORD)`: log in through the real form."""
    return factories.log_in


@pytest.fixture
def csrf_headers() -> Callable[[FlaskClient], dict[str, str]]:
    """`csrf_headers(client)`: `{"X-CSRFToken": …}` for the client's current session."""
    return factories.csrf_headers


@pytest.fixture
def bearer() -> Callable[..., dict[str, str]]:
    """`bearer(app, user_or_username)`: a fresh API token's Authorization header."""
    return factories.issue_token


@pytest.fixture
def alice(app: Flask, make_user: Callable[..., Any], bearer: Callable[..., dict[str, str]]):
    """Alice's user and bearer header."""
    user = make_user("alice")
    return user, bearer(app, user)

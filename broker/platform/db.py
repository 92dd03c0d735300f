"""The database: SQLAlchemy 2.x declarative base, Flask-SQLAlchemy binding, Alembic migrations.

The one transaction rule, followed by every feature (tests/platform/test_transaction_rule.py
fails when a domain module breaks it):

- Domain functions take the `session` they work in and never commit (nor roll back).
- Only these commit: a view (for every unsafe API route, the request's unit of work in
  `broker.api.unit_of_work`, which also runs the steps that must commit mid-request and the
  undos of a failed request), a CLI command (and the development server's setup), the worker
  loop (each job's leftovers), and the leased-work unit in `broker.platform.leases`, through
  which goes all work that must ask the outside world between two transactions: verifying
  uploads with Cloudflare, expiring them, deleting drafts, delivering webhooks. It claims rows
  under a lease (committed), ends the transaction, asks, re-reads and checks the lease is still
  ours, records and commits, one transaction per row. A domain function that hands its work to
  it says so in its name (`completion.verify_inline_and_commit`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast

import click
import sqlalchemy as sa
from flask import Flask, current_app, has_app_context
from flask_sqlalchemy import SQLAlchemy
from flask_sqlalchemy.session import Session as FlaskSession
from sqlalchemy.orm import DeclarativeBase, scoped_session
from sqlalchemy.orm import Session as OrmSession

from broker.platform.sqlite_writes import gate_sqlite_writes

# The migrations span every feature's tables, so they sit at the package root.
MIGRATIONS_DIR = str(Path(__file__).resolve().parent.parent / "migrations")

# Stable constraint names so Alembic can alter them on every backend (SQLite batch mode too).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every broker model."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


# The key, in a session's `info`, of the connection its unit of work writes on
# (`broker.api.unit_of_work`): while it is set, the session's own work runs on that connection,
# inside its transaction, so a request never writes on two connections at once (on SQLite the
# second would wait for the first one's write lock, held by the same request).
JOINED_CONNECTION = "broker_joined_connection"


class RequestSession(FlaskSession):
    """Flask-SQLAlchemy's session, on the connection its unit of work joined it to, if any."""

    def get_bind(
        self,
        mapper: Any | None = None,
        clause: Any | None = None,
        bind: sa.Engine | sa.Connection | None = None,
        **kwargs: Any,
    ) -> sa.Engine | sa.Connection:
        """Return the joined connection, else the bind Flask-SQLAlchemy picks."""
        if bind is None:
            joined: sa.Connection | None = self.info.get(JOINED_CONNECTION)
            if joined is not None:
                return joined
        return super().get_bind(mapper=mapper, clause=clause, bind=bind, **kwargs)


# "control_fully": a session joined to a connection already in a transaction (the unit of work's)
# commits and rolls back that transaction itself, so its after_commit hooks (the token cache's
# news, the outage tracker's) run after the real COMMIT, not before it.
db = SQLAlchemy(
    model_class=Base,
    session_options={"class_": RequestSession, "join_transaction_mode": "control_fully"},
)
# Any fixed 64-bit number, the same in every broker: migrations/env.py takes PostgreSQL's
# advisory lock on it for the whole upgrade, so `flask db upgrade` runs one at a time (the
# Dockerfile migrates at every web container start: replicas starting together would otherwise
# race to create the same tables).
MIGRATION_LOCK = 0x62726F6B65722D6D  # "broker-m"


class _Migrations:
    """Flask-Migrate, loaded when something asks for it: Alembic, Mako and Pygments weigh ~12 MB
    that a web process never uses. `app.extensions["migrate"]` and `flask db` stand in for it."""

    def __init__(self, app: Flask) -> None:
        self._app = app
        self._config: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._config is None:
            from flask_migrate import Migrate

            extensions = self._app.extensions
            Migrate(
                self._app, db, directory=MIGRATIONS_DIR, render_as_batch=True, compare_type=True
            )
            self._config, extensions["migrate"] = extensions["migrate"], self
        return getattr(self._config, name)


class _MigrationCommands(click.Group):
    """`flask db …`: Flask-Migrate's command group, imported when a command is run."""

    def __init__(self) -> None:
        super().__init__("db", help="Perform database migrations.")

    @staticmethod
    def _group() -> click.Group:
        from flask_migrate.cli import db as commands  # type: ignore[import-not-found]

        return cast(click.Group, commands)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        return self._group().make_context(*args, **kwargs)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return self._group().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._group().get_command(ctx, cmd_name)


# What every model subclasses. Flask-SQLAlchemy builds `db.Model` from Base when `db` is made;
# to the type checker it is Base, whose typed declarative API is all the models use.
if TYPE_CHECKING:
    Model = Base
else:
    Model = db.Model

# What a domain function's `session` is: views, commands and jobs pass `db.session`, the scoped
# proxy of the current Session (tests may pass a Session itself).
Session: TypeAlias = OrmSession | scoped_session[Any]


def utcnow() -> datetime:
    """Return the current time, timezone-aware UTC (one place to freeze in tests)."""
    return datetime.now(UTC)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware (SQLite forgets the zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


T = TypeVar("T")

# A statement with its parameters.
Statement: TypeAlias = tuple[sa.Executable, Mapping[str, Any]]
# How a unit of work's step ends its transaction in one round trip
# (`broker.api.unit_of_work`): the statements it sends with the COMMIT; returns each one's rows.
Finish: TypeAlias = Callable[[Sequence[Statement]], list[list[tuple[Any, ...]]]]

# Ids per SQL IN (…) list: older SQLite builds allow 999 parameters per statement, and a
# statement may carry a second list beside one (a listing's claim: "these images, not those
# uploads").
IN_LIST_SIZE = 400


def upsert_insert(dialect: str) -> Callable[..., Any]:
    """Return the dialect's `insert` construct, the one with ON CONFLICT (PostgreSQL or SQLite)."""
    # Only the dialect in use is imported: the other is megabytes of a process's memory.
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


# The key of a partial index's condition in its `info` (see partial_index).
PARTIAL_WHERE = "partial_where"


def partial_index(name: str, *columns: str, where: str, unique: bool = False) -> sa.Index:
    """Return an index of the rows where `where` (SQL) holds, on SQLite and PostgreSQL alike."""
    # The condition reaches the database in use when an app binds it (init_app). Given to both
    # dialects here, SQLAlchemy would load both to check the options: its PostgreSQL dialect is
    # 2.3 MB of every SQLite process (and its SQLite one 0.7 MB of every PostgreSQL process).
    # Alembic's autogenerate compares no index condition, and one generated on SQLite would
    # name `sqlite_where` only: a migration that creates such an index names both dialects'
    # conditions itself (as 5a1e9c0b7d21 does), or PostgreSQL gets an index without one.
    return sa.Index(name, *columns, unique=unique, info={PARTIAL_WHERE: where})


def _bind_partial_indexes(metadata: sa.MetaData, dialect: str) -> None:
    """Give each partial index of `metadata` its condition in `dialect`'s terms."""
    for table in metadata.tables.values():
        for index in table.indexes:
            where = index.info.get(PARTIAL_WHERE)
            if where is not None:
                index.dialect_kwargs[f"{dialect}_where"] = sa.text(where)


def in_chunks(items: Sequence[T]) -> Iterator[list[T]]:
    """`items` in lists of at most IN_LIST_SIZE, one per IN (…) list."""
    for start in range(0, len(items), IN_LIST_SIZE):
        yield list(items[start : start + IN_LIST_SIZE])


# Per process and engine: a pool as large as the process's threads (gunicorn.conf.py hands its
# `threads` over as BROKER_DB_POOL_SIZE; `flask` commands and other servers get
# DEFAULT_POOL_SIZE), so a busy process reuses its connections instead of opening and closing one
# per request (a new PostgreSQL connection costs both sides far more than the statements of a
# request), and a small overflow for the moments a thread needs a second one. Two engines (the
# app's and the upstream budget's): a process opens at most 2 x (pool + overflow).
DEFAULT_POOL_SIZE = 8
DEFAULT_MAX_OVERFLOW = 2
ENGINES_PER_PROCESS = 2
# The pool hands out the connection given back last (LIFO), not the one idle longest: after a
# burst opened many, the few a normal load needs stay in use (warm: the server's caches and
# psycopg's prepared statements are theirs) while the rest sit idle, instead of every request
# taking the next of all of them in turn. In bench_scale part 2 a process that had opened its
# 16 connections in turn this way stayed as slow as during the burst for the whole run.
# A pooled connection idle this long is checked (one round trip) before it is handed out; one
# given back moments ago is not, so a busy process does not pay a ping per checkout. A server
# restart then costs at most the one statement of each connection used within these seconds:
# SQLAlchemy sees the disconnect, and the pool drops every connection older than it.
PING_WHEN_IDLE = 5.0


def pool_size(config: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """Return (pool size, overflow) of each engine: BROKER_DB_POOL_SIZE (gunicorn.conf.py sets
    it to the process's threads) and BROKER_DB_MAX_OVERFLOW."""
    config = config if config is not None else (current_app.config if has_app_context() else {})
    size = config.get("DB_POOL_SIZE") or DEFAULT_POOL_SIZE
    overflow = config.get("DB_MAX_OVERFLOW")
    return int(size), int(DEFAULT_MAX_OVERFLOW if overflow is None else overflow)


def connections_per_process(config: Mapping[str, Any]) -> int:
    """Return the most PostgreSQL connections one broker process may open."""
    size, overflow = pool_size(config)
    return ENGINES_PER_PROCESS * (size + overflow)


def server_connect_args() -> dict[str, Any]:
    """`connect_args` of every PostgreSQL connection the broker opens: psycopg's own prepared
    statements off (see `server_pool_options`)."""
    return {"prepare_threshold": None}


def server_pool_options(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`create_engine` options of a PostgreSQL engine: pool size, last-in first-out, the
    idle-only ping (`ping_when_idle`) in place of a ping on every checkout, and psycopg's own
    prepared statements off (`prepare_threshold`): psycopg deallocates every prepared
    statement of a connection (DEALLOCATE ALL) when a transaction on it rolls back, which a
    read-only request's connection does when it goes back to the pool, taking the create
    step's (`broker.api.round_trips`) with it; and behind PgBouncer in transaction mode
    before 1.21 psycopg's would be sought on another server session."""
    size, overflow = pool_size(config)
    return {
        "pool_size": size,
        "max_overflow": overflow,
        "pool_pre_ping": False,
        "pool_use_lifo": True,
        "connect_args": server_connect_args(),
    }


def sqlite_pool_options(url: str, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`create_engine` options of a SQLite file's engine: the same pool size as a server's (a
    process's threads each keep a connection instead of the overflow's being opened, set up
    and closed per request), last-in first-out; none for an in-memory database."""
    if ":memory:" in url or url.rstrip("/") in ("sqlite:", "sqlite+pysqlite:"):
        return {}
    size, overflow = pool_size(config)
    return {"pool_size": size, "max_overflow": overflow, "pool_use_lifo": True}


def ping_when_idle(engine: sa.Engine, *, clock: Callable[[], float] = time.monotonic) -> None:
    """Check a connection that sat in `engine`'s pool over PING_WHEN_IDLE seconds before use."""

    @sa.event.listens_for(engine, "checkin")
    def _returned(_dbapi_connection: Any, record: Any) -> None:
        record.info["returned_at"] = clock()

    @sa.event.listens_for(engine, "checkout")
    def _handed_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.get("returned_at")
        if returned is None or clock() - returned < PING_WHEN_IDLE:
            return  # just connected, or used moments ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            if engine.dialect.is_disconnect(exc, dbapi_connection, None):
                # The pool replaces the connection and tries again.
                raise sa.exc.DisconnectionError(str(exc)) from exc
            raise


# Each SQLite connection keeps its own page cache (2 MiB by default), and a web process keeps a
# connection per thread: a process that had read 2 MiB through each of its 16 held 32 MiB more
# than at start, for good. Under WAL a connection drops its whole cache whenever another one has
# committed since, so between writes from every thread a large cache is rarely hit anyway; the
# operating system's file cache serves the rereads. 64 pages hold a create's or a listing's.
SQLITE_CACHE_KIB = 256


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Turn on WAL and foreign keys for every SQLite connection, and bound its page cache."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # Under WAL, NORMAL stays consistent after a crash and halves the cost of each commit;
    # only the last transactions before a power loss can be lost.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
    cursor.close()


def init_app(app: Flask) -> None:
    """Bind the database and migrations to the app; SQLite gets WAL and foreign keys."""
    url = app.config["SQLALCHEMY_DATABASE_URI"]
    options = dict(app.config.get("SQLALCHEMY_ENGINE_OPTIONS") or {})
    if not url.startswith("sqlite"):
        options = {**server_pool_options(app.config), **options}
    else:
        options = {**sqlite_pool_options(url, app.config), **options}
    # A failed statement's message (logged with its traceback) would otherwise carry the bound
    # values: webhook secrets, signing-key values, password and token hashes.
    options.setdefault("hide_parameters", True)
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = options
    _bind_partial_indexes(db.metadata, sa.make_url(url).get_backend_name())
    db.init_app(app)
    app.extensions["migrate"] = _Migrations(app)
    app.cli.add_command(_MigrationCommands())
    with app.app_context():
        if url.startswith("sqlite"):
            sa.event.listen(db.engine, "connect", _sqlite_pragmas)
            gate_sqlite_writes(db.engine)
        elif not options["pool_pre_ping"]:
            ping_when_idle(db.engine)
        if app.config["ENV"] == "production" and not url.startswith("sqlite"):
            warn_if_connections_exceed_server(app.config, db.engine)


log = logging.getLogger("broker.db")


def warn_if_connections_exceed_server(config: Mapping[str, Any], engine: sa.Engine) -> int | None:
    """Warn when BROKER_DB_PROCESSES processes like this one may open more connections than
    the server accepts (`max_connections` less the superuser reserve); return that figure."""
    try:
        with engine.connect() as conn:
            limit = int(conn.execute(sa.text("SHOW max_connections")).scalar_one())
            reserved = int(
                conn.execute(sa.text("SHOW superuser_reserved_connections")).scalar_one()
            )
    except sa.exc.SQLAlchemyError as exc:  # no database yet: the probes and requests say so
        log.debug("connection check skipped: %s", type(exc).__name__)
        return None
    available = limit - reserved
    processes = int(config.get("DB_PROCESSES") or 1)
    wanted = processes * connections_per_process(config)
    if wanted > available:
        size, overflow = pool_size(config)
        log.warning(
            "%d broker processes (BROKER_DB_PROCESSES) may open %d PostgreSQL connections "
            "(each %d engines x (pool %d + overflow %d)), but the server accepts %d "
            "(max_connections %d less %d reserved): raise max_connections or lower "
            "BROKER_DB_POOL_SIZE / the number of processes",
            processes,
            wanted,
            ENGINES_PER_PROCESS,
            size,
            overflow,
            available,
            limit,
            reserved,
        )
    return available

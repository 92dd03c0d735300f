"""The database: SQLAlchemy 2.x declarative base, Flask-SQLAlchemy binding, Alembic migrations.

The one transaction rule, followed by every feature:

- Domain functions take the `session` they work in and never commit (nor roll back).
- The unit of work belongs to whoever called them: a view, a CLI command, or a worker job (the
  `*_due` functions the worker runs, which finish each item in its own transaction). It commits
  once its work is whole, and rolls back on failure.
- A step that must commit part-way says so in its name, `…_and_commit`, and is called by the
  owner: a limit reservation held while Cloudflare answers (`reserve_slot_and_commit`), an
  `Idempotency-Key` claim (`claim_and_commit`), a worker's lease (`leases.claim_and_commit`).
- Work done outside the database inside a unit of work (a draft created at Cloudflare) registers
  its undo with `undo_on_failure`; the owner's `commit_or_undo` commits, or rolls back and runs
  the undos newest first.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import sqlalchemy as sa
from flask import Flask, g
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
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


db = SQLAlchemy(model_class=Base)
migrate = Migrate(directory=MIGRATIONS_DIR, render_as_batch=True, compare_type=True)

# What every model subclasses. Flask-SQLAlchemy builds `db.Model` from Base when `db` is made;
# to the type checker it is Base, whose typed declarative API is all the models use.
if TYPE_CHECKING:
    Model = Base
else:
    Model = db.Model

# What a domain function's `session` is: views, commands and jobs pass `db.session`, the scoped
# proxy of the current Session (tests may pass a Session itself).
Session: TypeAlias = OrmSession | scoped_session[Any]


def undo_on_failure(undo: Callable[[], None]) -> None:
    """Register how to undo work done outside the database if this request's commit fails."""
    g.setdefault("undo_on_failure", []).append(undo)


def commit_or_undo() -> None:
    """Commit the request's unit of work; on failure roll back, run the undos, and re-raise."""
    try:
        db.session.commit()
    except BaseException:
        rollback_and_undo()
        raise
    g.pop("undo_on_failure", None)


def rollback_and_undo() -> None:
    """Roll the request's unit of work back and undo its outside work, newest first."""
    db.session.rollback()
    for undo in reversed(g.pop("undo_on_failure", [])):
        undo()


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


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Turn on WAL and foreign keys for every SQLite connection."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # Under WAL, NORMAL stays consistent after a crash and halves the cost of each commit;
    # only the last transactions before a power loss can be lost.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def init_app(app: Flask) -> None:
    """Bind the database and migrations to the app; SQLite gets WAL and foreign keys."""
    url = app.config["SQLALCHEMY_DATABASE_URI"]
    options = dict(app.config.get("SQLALCHEMY_ENGINE_OPTIONS") or {})
    options.setdefault("pool_pre_ping", not url.startswith("sqlite"))
    # A failed statement's message (logged with its traceback) would otherwise carry the bound
    # values: webhook secrets, signing-key values, password and token hashes.
    options.setdefault("hide_parameters", True)
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = options
    db.init_app(app)
    migrate.init_app(app, db)
    if url.startswith("sqlite"):
        with app.app_context():
            sa.event.listen(db.engine, "connect", _sqlite_pragmas)
            gate_sqlite_writes(db.engine)

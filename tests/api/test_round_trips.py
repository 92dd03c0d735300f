"""`commit_in_one_round_trip`: statements and their COMMIT in one wait for the server on
PostgreSQL (one message), as `execute` would run them: the bound types' conversions,
the listeners, SQLAlchemy's errors, nothing committed on failure, the connection left as it
was (not in autocommit) for the pool."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from broker.api.round_trips import commit_in_one_round_trip
from broker.platform.db import UTCDateTime

_probe = sa.Table(
    "round_trip_probe",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", UTCDateTime()),
)
_insert = sa.insert(_probe).values(
    id=sa.bindparam("id", type_=sa.Integer), at=sa.bindparam("at", type_=UTCDateTime())
)
_insert_returning = _insert.returning(_probe.c.id, _probe.c.at)
_count = sa.select(sa.func.count()).select_from(_probe)


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(database_url)
    _probe.create(engine, checkfirst=True)
    try:
        yield engine
    finally:
        _probe.drop(engine)
        engine.dispose()


def _trace(conn: sa.Connection, path: Path) -> Any:
    from psycopg import pq

    pgconn = conn.connection.driver_connection.pgconn  # type: ignore[union-attr]
    with path.open("w") as out:
        pgconn.trace(os.dup(out.fileno()))  # libpq closes its copy
    pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
    return pgconn


def test_statements_and_their_commit_wait_for_the_server_once(
    engine: sa.Engine, tmp_path: Path
) -> None:
    """Rows come back per statement, each converted as `execute` converts it (UTCDateTime
    stores a Paris time as UTC), listeners see each statement, and the work is committed."""
    postgres = engine.dialect.name == "postgresql"
    paris = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=1)))
    seen: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2].split()[0]))
    with engine.connect() as conn:
        pgconn = _trace(conn, tmp_path / "wire") if postgres else None
        rows = commit_in_one_round_trip(
            conn,
            [(_insert_returning, {"id": 1, "at": paris}), (_count, {})],
        )
        if pgconn is not None:
            pgconn.untrace()
        assert not conn.in_transaction()
    assert rows == [[(1, paris.astimezone(UTC))], [(1,)]]
    assert seen == ["INSERT", "SELECT"]
    with engine.connect() as other:
        assert other.scalar(sa.select(_probe.c.at)) == paris.astimezone(UTC)
    if postgres:
        wire = (tmp_path / "wire").read_text()
        assert wire.count("\tReadyForQuery") == 1  # each wait for the server ends with one
        assert "BEGIN" in wire and "COMMIT" in wire


def test_a_failing_statement_commits_nothing_and_leaves_the_connection_as_it_was(
    engine: sa.Engine,
) -> None:
    """A duplicate key in the middle: SQLAlchemy's IntegrityError, the statements before it
    not committed, and the connection still opens transactions of its own (not left in
    autocommit): what it writes next is rolled back by a rollback."""
    with engine.connect() as conn:
        with pytest.raises(sa.exc.IntegrityError):
            commit_in_one_round_trip(
                conn,
                [
                    (_insert, {"id": 1, "at": datetime.now(UTC)}),
                    (_insert, {"id": 2, "at": datetime.now(UTC)}),
                    (_insert, {"id": 1, "at": datetime.now(UTC)}),
                ],
            )
        conn.rollback()
        assert conn.scalar(_count) == 0
        conn.execute(_insert, {"id": 3, "at": datetime.now(UTC)})
        conn.rollback()
        assert conn.scalar(_count) == 0


def test_a_dropped_connection_is_sqlalchemys_error_and_invalidated(
    engine: sa.Engine, database_url: str
) -> None:
    """The server ends the connection before the message: OperationalError, the connection
    invalidated (the pool replaces it), as `execute` would have it."""
    if not database_url.startswith("postgresql"):
        pytest.skip("terminates a PostgreSQL backend: runs in the PostgreSQL pass")
    with engine.connect() as conn:
        pid = conn.scalar(sa.text("SELECT pg_backend_pid()"))
        conn.commit()
        with engine.connect() as killer:
            killer.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(sa.exc.OperationalError) as dropped:
            commit_in_one_round_trip(conn, [(_insert, {"id": 1, "at": datetime.now(UTC)})])
        assert dropped.value.connection_invalidated
        assert conn.invalidated
        conn.rollback()
    with engine.connect() as fresh:
        assert fresh.scalar(_count) == 0


def test_a_value_the_driver_cannot_write_is_sqlalchemys_error_and_stays_hidden(
    app, database_url: str
) -> None:
    """A value refused before anything is sent (text with a NUL): SQLAlchemy's error, and the
    app's `hide_parameters` keeps the value out of it, as `execute` does."""
    if not database_url.startswith("postgresql"):
        pytest.skip("psycopg's own refusal: runs in the PostgreSQL pass")
    statement = sa.select(sa.bindparam("secret", type_=sa.String))
    with app.app_context():
        from broker.platform.db import db

        engine = db.engine
    with engine.connect() as conn:
        with pytest.raises(sa.exc.StatementError) as refused:
            commit_in_one_round_trip(conn, [(statement, {"secret": "hunter2\x00"})])
        conn.rollback()
        assert conn.scalar(sa.select(sa.literal(1))) == 1  # usable again
    assert "hunter2" not in str(refused.value)


def test_a_drop_replaces_the_pools_older_connections_too(database_url: str) -> None:
    """After a restart every pooled connection is dead. Meeting the drop, the step does what
    `execute` does: the pool's older connections are replaced too, so the next checkouts (the
    request run again, another request) get live ones."""
    if not database_url.startswith("postgresql"):
        pytest.skip("terminates PostgreSQL backends: runs in the PostgreSQL pass")
    engine = sa.create_engine(database_url, pool_size=2, pool_use_lifo=True)  # as the app's
    killing = sa.create_engine(database_url)
    try:
        first, second = engine.connect(), engine.connect()
        pids = [c.scalar(sa.text("SELECT pg_backend_pid()")) for c in (first, second)]
        first.commit()
        second.close()  # back in the pool, as a busy process's other connections are
        with killing.connect() as killer:
            for pid in pids:
                killer.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with pytest.raises(sa.exc.OperationalError) as dropped:
            commit_in_one_round_trip(first, [(sa.select(sa.literal(1)), {})])
        assert dropped.value.connection_invalidated
        first.rollback()
        first.close()
        with engine.connect() as again, engine.connect() as other:
            assert again.scalar(sa.text("SELECT 1")) == 1
            assert other.scalar(sa.text("SELECT 1")) == 1
    finally:
        engine.dispose()
        killing.dispose()

"""`commit_in_one_round_trip`: statements and their COMMIT in one wait for the server on
PostgreSQL (psycopg's pipeline), as `execute` would run them: the bound types' conversions,
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
    """The server ends the connection before the pipeline: OperationalError, the connection
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

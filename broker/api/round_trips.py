"""Statements and the COMMIT after them sent to the database in one round trip.

Offers `commit_in_one_round_trip`, for the unit of work that owns the transaction
(`broker.api.unit_of_work`, its only caller: nothing else commits, `broker.platform.db`'s
rule). A step's work hands it its `broker.platform.db.Statement`s through a `Finish`.

On PostgreSQL the BEGIN, the statements and the COMMIT go in psycopg's pipeline mode, all sent
before a single wait for the answers. The server runs each as soon as the one before it ended,
each reading the rows committed before it starts (READ COMMITTED), so a statement after a lock
still sees everything the lock's previous holder committed; a lock the first one takes is held
while the server runs the others and commits, not across round trips and turns of this process
(GIL turns behind its other threads). Elsewhere (SQLite), one `execute` after the other, then
the commit.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, cast

import sqlalchemy as sa

from broker.platform.db import Statement


def commit_in_one_round_trip(
    conn: sa.Connection, statements: Sequence[Statement]
) -> list[list[tuple[Any, ...]]]:
    """Run `statements` one after the other in `conn`'s transaction and commit it, all in one
    round trip where the driver can (PostgreSQL); return each statement's rows.

    Errors arrive as `execute` raises them: SQLAlchemy's, the connection invalidated when it
    dropped, nothing committed. `before_cursor_execute` listeners see each statement.
    """
    if conn.dialect.name == "postgresql":
        import psycopg  # PostgreSQL only: a SQLite process never loads it

        raw = conn.connection.driver_connection
        if isinstance(raw, psycopg.Connection) and psycopg.Pipeline.is_supported():
            if not conn.in_transaction():
                conn.begin()  # SQLAlchemy's bookkeeping (psycopg sends its BEGIN in the pipeline)
            rows = _pipelined(conn, raw, statements)
            # Already committed on the server: psycopg sends nothing more; SQLAlchemy ends its
            # transaction and runs its commit events.
            conn.commit()
            return rows
    results = [_rows(conn.execute(statement, params)) for statement, params in statements]
    conn.commit()
    return results


def _rows(result: sa.CursorResult[Any]) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in result] if result.returns_rows else []


def _pipelined(
    conn: sa.Connection, raw: Any, statements: Sequence[Statement]
) -> list[list[tuple[Any, ...]]]:
    """`commit_in_one_round_trip` on `raw`, the psycopg connection of `conn`: the statements
    and a COMMIT queued in one pipeline, whose one Sync is the only wait."""
    import psycopg

    sent = [_driver_statement(conn.dialect, statement, params) for statement, params in statements]
    # psycopg syncs after the BEGIN it adds in a pipeline (a round trip of its own): when none
    # has begun, the BEGIN is the pipeline's first statement instead, sent in autocommit mode
    # (psycopg then adds none). Not with a session characteristic psycopg's BEGIN would carry.
    own_begin = raw.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE and (
        raw.isolation_level is None and raw.read_only is None and raw.deferrable is None
    )
    cursors: list[Any] = []
    try:
        if own_begin:
            raw.autocommit = True
        with raw.pipeline():
            if own_begin:
                raw.execute("BEGIN")
            for sql, values in sent:
                cursor = raw.cursor()
                cursors.append(cursor)
                for listener in conn.dispatch.before_cursor_execute:
                    listener(conn, cursor, sql, values, None, False)
                cursor.execute(sql, values)
            # A statement of the pipeline, not psycopg's commit(), which would sync once more.
            raw.execute("COMMIT")
        return [
            [tuple(row) for row in cursor.fetchall()] if cursor.description else []
            for cursor in cursors
        ]
    except psycopg.Error as exc:
        invalidated = conn.dialect.is_disconnect(cast(Any, exc), raw, None)
        if invalidated:
            conn.invalidate(exc)
        # Any statement's error arrives at the one Sync: the pipeline is named whole.
        raise sa.exc.DBAPIError.instance(
            "; ".join([*(sql for sql, _ in sent), "COMMIT"]),
            None,
            exc,
            psycopg.Error,
            connection_invalidated=invalidated,
            dialect=conn.dialect,
        ) from exc
    finally:
        for cursor in cursors:
            cursor.close()
        if own_begin and not raw.closed:
            _leave_autocommit(raw)


def _leave_autocommit(raw: Any) -> None:
    """Turn `raw`'s autocommit off again, ending first what a failed pipeline left open (psycopg
    refuses the change inside a transaction)."""
    import psycopg

    try:
        if raw.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raw.rollback()
        raw.autocommit = False
    except psycopg.Error:
        raw.close()  # unusable: the pool replaces a closed connection


def _driver_statement(
    dialect: sa.Dialect, statement: sa.Executable, params: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """`statement`'s SQL for the driver and its parameters, converted as `execute` converts
    them (each bound type's own processing, such as UTCDateTime's)."""
    compiled, processors = _compiled(statement, dialect)
    values = compiled.construct_params(dict(params))
    return compiled.string, {
        name: processors[name](value) if name in processors else value
        for name, value in values.items()
    }


@functools.cache
def _compiled(statement: sa.Executable, dialect: sa.Dialect) -> tuple[Any, dict[str, Any]]:
    """`statement` compiled for `dialect` and its bound parameters' processors, once per
    statement (the callers' statements are built once): compiling costs more than running."""
    compiled = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
    processors = {}
    for name, bind in compiled.binds.items():
        processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            processors[name] = processor
    return compiled, processors

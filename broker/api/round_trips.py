"""Statements and the COMMIT after them sent to the database in one round trip.

Offers `commit_in_one_round_trip`, for the unit of work that owns the transaction
(`broker.api.unit_of_work`, its only caller: nothing else commits, `broker.platform.db`'s
rule), and `run_in_transaction`, the same statements inside a caller's transaction. A step's
work hands them its `broker.platform.db.Statement`s through a `Finish`.

On PostgreSQL the BEGIN, the statements and the COMMIT go as one message, one wait for the
answer. The server runs each as soon as the one before it ended, each reading the rows
committed before it starts (READ COMMITTED), so a statement after a lock still sees everything
the lock's previous holder committed; a lock the first one takes is held while the server runs
the others and commits, never across a round trip or a turn of this process (a GIL turn behind
its other threads). Elsewhere (SQLite), one `execute` after the other, then the commit.
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

    Errors arrive as `execute` raises them (SQLAlchemy's, through its own error handling: a
    dropped connection invalidated, the pool's older ones with it), nothing committed.
    `before_cursor_execute` listeners see each statement. Rows come back as the driver gives
    them (the callers read integers and strings).
    """
    if conn.dialect.name == "postgresql":
        import psycopg  # PostgreSQL only: a SQLite process never loads it

        raw = conn.connection.driver_connection
        if isinstance(raw, psycopg.Connection):
            if not conn.in_transaction():
                conn.begin()  # SQLAlchemy's bookkeeping (the message carries the BEGIN)
            rows = _in_one_message(conn, raw, statements)
            # Already committed on the server: psycopg sends nothing more; SQLAlchemy ends its
            # transaction and runs its commit events.
            conn.commit()
            return rows
    results = run_in_transaction(conn, statements)
    conn.commit()
    return results


def run_in_transaction(
    conn: sa.Connection, statements: Sequence[Statement]
) -> list[list[tuple[Any, ...]]]:
    """`statements` one `execute` after the other in `conn`'s transaction, committing nothing
    (a caller's transaction: the warm-up's, rolled back); each one's rows. Each statement is
    also compiled as `commit_in_one_round_trip` sends it, so a warmed-up process compiles
    nothing on its first create."""
    if conn.dialect.name == "postgresql":
        for statement, _ in statements:
            _compiled(statement, conn.dialect)
    return [_rows(conn.execute(statement, params)) for statement, params in statements]


def _rows(result: sa.CursorResult[Any]) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in result] if result.returns_rows else []


def _in_one_message(
    conn: sa.Connection, raw: Any, statements: Sequence[Statement]
) -> list[list[tuple[Any, ...]]]:
    """`commit_in_one_round_trip` on `raw`, the psycopg connection of `conn`: BEGIN, the
    statements and COMMIT in one message of PostgreSQL's simple query protocol.

    One message, not psycopg's pipeline mode: a pipeline flushes each statement as it is
    queued, and between two of them this thread may wait for the GIL behind the process's
    others while the server already holds the first statement's lock. Sent as one message, the
    server has every statement before it takes any lock. The simple protocol takes no
    parameters: psycopg's own client-side binding (`ClientCursor.mogrify`, its literal quoting
    for each value's type) writes them into the text. If a statement fails, the server skips
    the rest and the transaction stays open in error: it is rolled back here.
    """
    import psycopg

    sent = [_driver_statement(conn.dialect, statement, params) for statement, params in statements]
    # psycopg would send its own BEGIN first, a round trip of its own: the message carries it
    # instead, sent in autocommit mode (psycopg then adds none). Not with a session
    # characteristic psycopg's BEGIN would carry, nor inside a transaction already begun.
    own_begin = raw.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE and (
        raw.isolation_level is None and raw.read_only is None and raw.deferrable is None
    )
    cursor = psycopg.ClientCursor(raw)
    try:
        texts = []
        for sql, values in sent:
            for listener in conn.dispatch.before_cursor_execute:
                listener(conn, cursor, sql, values, None, False)
            texts.append(cursor.mogrify(sql, values))  # a value it cannot write raises here
        if own_begin:
            raw.autocommit = True
        cursor.execute(";\n".join([*(["BEGIN"] if own_begin else []), *texts, "COMMIT"]))
        results = []
        if own_begin:
            cursor.nextset()  # the BEGIN's
        for _ in texts:
            results.append([tuple(row) for row in cursor.fetchall()] if cursor.description else [])
            cursor.nextset()
        return results
    except psycopg.Error as exc:
        # SQLAlchemy's own handling, as `execute` has it: a disconnect invalidates this
        # connection and the pool's older ones, `handle_error` listeners run, and the error is
        # raised as SQLAlchemy's. Named by the statements' SQL (any of them may have failed),
        # not by the message, which holds their values: `hide_parameters` keeps those out of
        # errors and logs.
        named = ";\n".join([sql for sql, _ in sent] + ["COMMIT"])
        conn._handle_dbapi_exception(exc, named, {}, cast(Any, cursor), None)
        raise  # pragma: no cover (the line above raises)
    finally:
        cursor.close()
        if own_begin and not raw.closed:
            _leave_autocommit(raw)


def _leave_autocommit(raw: Any) -> None:
    """Turn `raw`'s autocommit off again, ending first what a failed message left open (psycopg
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

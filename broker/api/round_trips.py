"""Statements and the COMMIT after them sent to the database in one round trip.

Offers `commit_in_one_round_trip`, for the unit of work that owns the transaction
(`broker.api.unit_of_work`, its only caller: nothing else commits, `broker.platform.db`'s
rule), and `run_in_transaction`, the same statements inside a caller's transaction. A step's
work hands them its `broker.platform.db.Statement`s through a `Finish`.

On PostgreSQL the BEGIN, the statements and the COMMIT go in one write, one wait for the
answer: libpq's pipeline mode, each statement prepared once per server connection and then only
executed (`_in_pipeline`): parsing and planning literal SQL every time cost more than running
it. The server runs each as soon as the one before it ended, each reading the rows committed
before it starts (READ COMMITTED), so a statement after a lock still sees everything
the lock's previous holder committed; a lock the first one takes is held while the server runs
the others and commits, never across a round trip or a turn of this process (a GIL turn behind
its other threads). Elsewhere (SQLite), one `execute` after the other, then the commit.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

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
            idle = raw.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
            if idle and not _plain(raw):
                rows = _in_one_message(conn, raw, statements)  # psycopg's BEGIN, its options
            else:
                rows = _in_pipeline(conn, raw, statements, begin=idle)
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
    own_begin = raw.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE and _plain(raw)
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
        _raise_as_sqlalchemy(conn, exc, sent, cursor)
    finally:
        cursor.close()
        if own_begin and not raw.closed:
            _leave_autocommit(raw)


def _plain(raw: Any) -> bool:
    """Whether `raw`'s transactions begin with a plain BEGIN (no session characteristic that
    psycopg's own BEGIN would carry)."""
    return raw.isolation_level is None and raw.read_only is None and raw.deferrable is None


# Where a server connection's `_Prepared` is kept: SQLAlchemy's `info` of the DBAPI connection,
# emptied when that connection is closed or invalidated (a new server session prepares anew).
_PREPARED = "broker.round_trips.prepared"


# How many times a step is sent at most: once, again after a wipe, again when some survived it.
_MOST_SENT = 3

# The most statements prepared on one server connection, each holding its plan in the server's
# memory for the connection's life: the step has four, in a few parameter types each.
_MOST_PREPARED = 64


class _Prepared:
    """The names of the step's statements prepared on one server connection, and the psycopg
    adapters that write their parameters and read their rows."""

    def __init__(self, transformer: Any) -> None:
        self.transformer = transformer
        self.names: set[bytes] = set()


@functools.lru_cache(maxsize=256)
def _name(query: bytes, types: tuple[int, ...]) -> bytes:
    """The prepared statement's name: its SQL's and its parameter types' digest (a
    parameter's type follows its value: an int's size picks int2, int4 or int8). The same
    name is the same statement in every process, so a server session where it exists already
    (behind a pooler, another client's) runs what this one would have prepared."""
    digest = hashlib.blake2b(query + repr(types).encode(), digest_size=12).hexdigest()
    return f"broker_step_{digest}".encode()


def _in_pipeline(
    conn: sa.Connection, raw: Any, statements: Sequence[Statement], *, begin: bool
) -> list[list[tuple[Any, ...]]]:
    """`commit_in_one_round_trip` on `raw`, the psycopg connection of `conn`: BEGIN (when
    `begin`: no transaction is open), the statements and COMMIT sent in libpq's pipeline mode
    as one write, each statement as a named prepared statement (the protocol's, which
    PgBouncer 1.21+ carries in transaction mode, not SQL's PREPARE), prepared in the same
    write the first time this server connection runs it, then only bound and executed: no
    parse, and no plan once the server keeps a generic one (after five custom plans, when it
    costs no more).

    One write, not psycopg's pipeline: that flushes each statement as it is queued, so the
    server could take the first statement's lock while this thread still waits for the GIL
    to send the next. libpq keeps what is queued in its buffer until the sync.

    The statements vanish when psycopg deallocates its own (a rollback of a transaction on a
    connection where psycopg prepared any: DEALLOCATE ALL): the server then refuses to run
    them (26000), skips the rest and commits nothing, and the step is sent again with them
    prepared anew, its ROLLBACK ahead in the same write; a name found prepared already
    (42P05: a wipe that kept some, another client's session behind a pooler) is the same
    statement (`_name`), and the step is sent again running it. Not inside a caller's
    transaction, which the refusal ended (raised then, as any error). If a statement fails,
    the server skips the rest and the transaction stays open in error for the caller's
    rollback.
    """
    import psycopg
    from psycopg.adapt import PyFormat, Transformer

    info = conn.connection.info
    prepared = info.get(_PREPARED)
    if prepared is None:
        prepared = info[_PREPARED] = _Prepared(Transformer.from_context(raw))
    sent = [_driver_statement(conn.dialect, statement, params) for statement, params in statements]
    cursor = raw.cursor()  # what the listeners and SQLAlchemy's error handling are given
    try:
        calls = []
        encoding = raw.info.encoding
        writer = prepared.transformer
        for sql, values in sent:
            for listener in conn.dispatch.before_cursor_execute:
                listener(conn, cursor, sql, values, None, False)
            query, names = _numbered(sql, encoding)
            # psycopg's own dumpers, as its `execute` writes them; a value it cannot write
            # raises here, before anything is sent.
            params = writer.dump_sequence(
                [values[name] for name in names], [PyFormat.AUTO] * len(names)
            )
            calls.append(
                _Call(query, tuple(params), tuple(writer.types or ()), tuple(writer.formats or ()))
            )
        with raw.lock:  # psycopg's own, as its `execute` holds it
            sent_before = 0
            while True:
                try:
                    return _pipeline(raw, prepared, calls, begin=begin, rollback=sent_before > 0)
                except (
                    psycopg.errors.InvalidSqlStatementName,
                    psycopg.errors.DuplicatePreparedStatement,
                ) as exc:
                    sent_before += 1
                    if not begin or sent_before == _MOST_SENT:
                        raise
                    if isinstance(exc, psycopg.errors.InvalidSqlStatementName):
                        prepared.names.clear()  # wiped: all prepared again
    except psycopg.Error as exc:
        _raise_as_sqlalchemy(conn, exc, sent, cursor)
    finally:
        cursor.close()


def _raise_as_sqlalchemy(
    conn: sa.Connection, exc: Exception, sent: Sequence[tuple[str, Any]], cursor: Any
) -> NoReturn:
    """Raise the driver's `exc` through SQLAlchemy's own handling, as `execute` has it: a
    disconnect invalidates this connection and the pool's older ones, `handle_error` listeners
    run, and the error is raised as SQLAlchemy's. Named by the statements' SQL (any of them
    may have failed), never by their values: `hide_parameters` keeps those out of errors and
    logs."""
    named = ";\n".join([sql for sql, _ in sent] + ["COMMIT"])
    conn._handle_dbapi_exception(exc, named, {}, cursor, None)
    raise exc  # pragma: no cover (the line above raises)


class _Call:
    """One statement as the pipeline sends it: $n SQL, its parameters written by psycopg,
    their types and formats."""

    __slots__ = ("formats", "params", "query", "types")

    def __init__(
        self,
        query: bytes,
        params: tuple[Any, ...],
        types: tuple[int, ...],
        formats: tuple[int, ...],
    ) -> None:
        self.query, self.params, self.types, self.formats = query, params, types, formats


def _pipeline(
    raw: Any, prepared: _Prepared, calls: Sequence[_Call], *, begin: bool, rollback: bool = False
) -> list[list[tuple[Any, ...]]]:
    """Send `calls` in one write of libpq's pipeline mode (after a ROLLBACK when `rollback`,
    a BEGIN when `begin`), preparing those not yet prepared, then COMMIT and a sync; wait for
    the answer once and return each call's rows. The first error is raised (psycopg's), the
    statements the server prepared before it remembered."""
    import psycopg
    from psycopg import generators, pq

    pgconn = raw.pgconn
    # What each result answers: None (BEGIN, COMMIT, ROLLBACK), a call's index, or a prepare.
    expected: list[int | bytes | None] = []
    fresh: set[bytes] = set()  # prepared by this write
    pgconn.enter_pipeline_mode()
    try:
        for command in [b"ROLLBACK"] * rollback + [b"BEGIN"] * begin:
            pgconn.send_query_params(command, None)
            expected.append(None)
        for index, call in enumerate(calls):
            name = _name(call.query, call.types)
            known = name in prepared.names or name in fresh
            if not known and len(prepared.names) + len(fresh) < _MOST_PREPARED:
                fresh.add(name)
                pgconn.send_prepare(name, call.query, call.types)
                expected.append(name)
                known = True
            if known:
                pgconn.send_query_prepared(name, call.params, call.formats)
            else:  # past the bound: parsed and planned each time, as before
                pgconn.send_query_params(call.query, call.params, call.types, call.formats)
            expected.append(index)
        pgconn.send_query_params(b"COMMIT", None)
        expected.append(None)
        pgconn.pipeline_sync()  # libpq writes what is queued now, all of it
        raw.wait(generators.send(pgconn))  # the rest, should the socket take part of it
        results = []
        while True:
            got = raw.wait(generators.fetch_many(pgconn))
            if not got:
                raise psycopg.OperationalError("the server closed the connection")
            if got[0].status == pq.ExecStatus.PIPELINE_SYNC:
                break
            results.append(got[0])
    finally:
        try:
            pgconn.exit_pipeline_mode()
        except psycopg.Error:
            raw.close()  # left mid-pipeline: unusable, the pool replaces a closed connection
    error = None
    rows: list[list[tuple[Any, ...]]] = [[] for _ in calls]
    reader = prepared.transformer
    for answers, result in zip(expected, results, strict=True):
        status = result.status
        if status == pq.ExecStatus.FATAL_ERROR:
            failed = psycopg.errors.error_from_result(result, raw.info.encoding)
            if isinstance(answers, bytes) and isinstance(
                failed, psycopg.errors.DuplicatePreparedStatement
            ):
                prepared.names.add(answers)  # there already: the same statement (`_name`)
            error = error or failed
        elif isinstance(answers, bytes) and status == pq.ExecStatus.COMMAND_OK:
            prepared.names.add(answers)  # not when skipped after an error
        elif isinstance(answers, int) and status == pq.ExecStatus.TUPLES_OK:
            reader.set_pgresult(result)
            rows[answers] = reader.load_rows(0, result.ntuples, tuple)
    if error is not None:
        raise error
    return rows


_PLACEHOLDER = re.compile(r"%\((?P<name>[^)]+)\)s|%%")


@functools.lru_cache(maxsize=256)
def _numbered(sql: str, encoding: str) -> tuple[bytes, tuple[str, ...]]:
    """`sql` as SQLAlchemy writes it for psycopg (pyformat: `%(name)s`, `%%`) with
    PostgreSQL's `$n` placeholders instead, and the parameters' names in their order (a name
    used twice is one parameter)."""
    names: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        name = match["name"]
        if name is None:
            return "%"
        return f"${names.setdefault(name, len(names) + 1)}"

    return _PLACEHOLDER.sub(number, sql).encode(encoding), tuple(names)


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

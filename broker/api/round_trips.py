"""Statements and the COMMIT after them sent to the database in one round trip.

Offers `commit_in_one_round_trip`, for the unit of work that owns the transaction
(`broker.api.unit_of_work`, its only caller: nothing else commits, `broker.platform.db`'s
rule), and `run_in_transaction`, the same statements inside a caller's transaction. A step's
work hands them its `broker.platform.db.Statement`s through a `Finish`.

On PostgreSQL the BEGIN, the statements and the COMMIT go in one write, one wait for the
answer: libpq's pipeline mode, each statement prepared once per server connection (in a round
trip of its own, the first time) and then only executed (`_in_pipeline`): parsing and planning
literal SQL every time cost more than running it. The server runs each as soon as the one
before it ended, each reading the rows committed before it starts (READ COMMITTED), so a
statement after a lock still sees everything the lock's previous holder committed; a lock the
first one takes is held while the server runs the others and commits, never across a round trip
or a turn of this process (a GIL turn behind its other threads). Elsewhere (SQLite), one
`execute` after the other, then the commit.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import sqlalchemy as sa

from broker.platform.db import Statement

log = logging.getLogger("broker.api")


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
            prepared = _prepared(conn, raw)
            if prepared is None:
                rows = _in_one_message(conn, raw, statements)
            else:
                rows = _in_pipeline(conn, raw, prepared, statements, begin=idle)
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
    conn: sa.Connection, raw: Any, statements: Sequence[Statement], *, told: bool = False
) -> list[list[tuple[Any, ...]]]:
    """`commit_in_one_round_trip` on `raw`, the psycopg connection of `conn`: BEGIN, the
    statements and COMMIT in one message of PostgreSQL's simple query protocol.

    One message, not psycopg's pipeline mode: a pipeline flushes each statement as it is
    queued, and between two of them this thread may wait for the GIL behind the process's
    others while the server already holds the first statement's lock. Sent as one message, the
    server has every statement before it takes any lock. The simple protocol takes no
    parameters: psycopg's own client-side binding (`ClientCursor.mogrify`, its literal quoting
    for each value's type) writes them into the text. If a statement fails, the server skips
    the rest and the transaction stays open in error: it is rolled back here. The listeners
    are told of each statement unless they were `told` already (the same step, refused as
    prepared statements).
    """
    import psycopg

    sent = [_driver_statement(conn.dialect, statement, params) for statement, params in statements]
    # psycopg would send its own BEGIN first, a round trip of its own: the message carries it
    # instead (`_begin`), sent in autocommit mode (psycopg then adds none). Not inside a
    # transaction already begun.
    own_begin = raw.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
    cursor = psycopg.ClientCursor(raw)
    try:
        texts = []
        for sql, values in sent:
            for listener in () if told else conn.dispatch.before_cursor_execute:
                listener(conn, cursor, sql, values, None, False)
            texts.append(cursor.mogrify(sql, values))  # a value it cannot write raises here
        if own_begin:
            raw.autocommit = True
        begin = [_begin(raw).decode()] if own_begin else []
        cursor.execute(";\n".join([*begin, *texts, "COMMIT"]))
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


def _begin(raw: Any) -> bytes:
    """The BEGIN psycopg would send on `raw`: with the session characteristics set on it (an
    isolation level, read only, deferrable; SQLAlchemy's reset of a pooled connection sets
    its isolation level to the default one, explicitly)."""
    words = [b"BEGIN"]
    if raw.isolation_level is not None:
        words.append(b"ISOLATION LEVEL " + raw.isolation_level.name.replace("_", " ").encode())
    if raw.read_only is not None:
        words.append(b"READ ONLY" if raw.read_only else b"READ WRITE")
    if raw.deferrable is not None:
        words.append(b"DEFERRABLE" if raw.deferrable else b"NOT DEFERRABLE")
    return b" ".join(words)


# Where a server connection's `_Prepared` is kept: SQLAlchemy's `info` of the DBAPI connection,
# emptied when that connection is closed or invalidated (a new server session prepares anew).
_PREPARED = "broker.round_trips.prepared"

# The most statements prepared on one server connection, each holding its plan in the server's
# memory for the connection's life: the step has four, in a few parameter types each.
_MOST_PREPARED = 64

# The step's statements read and lock one user's and one scope's rows through their indexes,
# whatever the values: their generic plan is as good as a custom one. PostgreSQL's own choice
# (plan_cache_mode = auto) weighs the generic plan's estimated cost against the custom plans'
# and, once a user's history is large, keeps planning at every run: 0.7 ms a step at 10,000
# uploads in a day against 0.3 ms with the generic plan (bench_quota.py). Set for the step's
# own transaction only.
_GENERIC_PLANS = b"SET LOCAL plan_cache_mode = force_generic_plan"

# libpq's Close of a prepared statement (PQsendClosePrepared) came with PostgreSQL 17's libpq;
# psycopg's binary package bundles a newer one. An older libpq keeps the one-message path.
_LIBPQ_WITH_CLOSE = 170000

# Errors that say a prepared statement is no longer what this connection prepared: gone
# (26000: a DEALLOCATE, a pooler's other server session), or its plan's result changed since
# (0A000, "cached plan must not change result type": a migration altered a table under it).
_STALE = ("26000", "0A000")


# The engines whose connections do not keep prepared statements (a pooler in transaction mode
# that does not carry them): their steps go as SQL in one message. Found by a connection's first
# step; the engine's other connections go through the same pooler.
_SENDING_SQL: weakref.WeakSet[sa.Engine] = weakref.WeakSet()
_SENDING_SQL_LOCK = threading.Lock()


class _Prepared:
    """The names of the step's statements prepared on one server connection, and the psycopg
    adapters that write their parameters and read their rows."""

    def __init__(self, raw: Any) -> None:
        from psycopg.adapt import Transformer

        adapting = raw.cursor()  # its own copy of the connection's adapters, changed below
        for dumper in _literal_int_dumpers():
            adapting.adapters.register_dumper(int, dumper)
        self.transformer = Transformer.from_context(adapting)
        self.names: set[bytes] = set()


def _prepared(conn: sa.Connection, raw: Any) -> _Prepared | None:
    """`conn`'s `_Prepared`, or None when its statements go as SQL (a libpq without Close, an
    engine whose connections do not keep prepared statements)."""
    import psycopg

    if conn.engine in _SENDING_SQL:
        return None
    info = conn.connection.info
    prepared = info.get(_PREPARED)
    if prepared is None:
        if psycopg.pq.version() < _LIBPQ_WITH_CLOSE:
            return None
        prepared = info[_PREPARED] = _Prepared(raw)
    return prepared


@functools.cache
def _literal_int_dumpers() -> tuple[type, type]:
    """psycopg's int dumpers (text, binary), an int typed as PostgreSQL types the same number
    written in the SQL (int4, int8 past it, numeric past that), not int2 when it fits: the
    statements mean what the one message's literals meant (`1 + $1` of int2s could overflow),
    and a small and a larger user id run the same prepared statement."""
    from psycopg.types.numeric import IntBinaryDumper, IntDumper

    class AsLiteral:
        def upgrade(self: Any, obj: int, format: Any) -> Any:
            if -(2**15) <= obj < 2**15:
                return self._int4_dumper
            return super().upgrade(obj, format)  # type: ignore[misc]  # the dumper's

    class LiteralIntDumper(AsLiteral, IntDumper):
        pass

    class LiteralIntBinaryDumper(AsLiteral, IntBinaryDumper):
        pass

    return LiteralIntDumper, LiteralIntBinaryDumper


@functools.lru_cache(maxsize=256)
def _name(query: bytes, types: tuple[int, ...]) -> bytes:
    """The prepared statement's name: its SQL's and its parameter types' digest, so one name
    is one statement wherever it was prepared (a pooler's server session)."""
    digest = hashlib.blake2b(query + repr(types).encode(), digest_size=12).hexdigest()
    return f"broker_step_{digest}".encode()


class _Call:
    """One statement as the pipeline sends it: $n SQL, its prepared statement's name, its
    parameters written by psycopg, their types and formats."""

    __slots__ = ("formats", "name", "params", "query", "types")

    def __init__(
        self,
        query: bytes,
        params: tuple[Any, ...],
        types: tuple[int, ...],
        formats: tuple[int, ...],
    ) -> None:
        self.query, self.params, self.types, self.formats = query, params, types, formats
        self.name = _name(query, types)


def _in_pipeline(
    conn: sa.Connection,
    raw: Any,
    prepared: _Prepared,
    statements: Sequence[Statement],
    *,
    begin: bool,
) -> list[list[tuple[Any, ...]]]:
    """`commit_in_one_round_trip` on `raw`, the psycopg connection of `conn`: BEGIN (when
    `begin`: no transaction is open), the statements and COMMIT sent in libpq's pipeline mode
    as one write, one wait, each statement a named prepared statement of the protocol's (not
    SQL's PREPARE), only bound and run: no parse, and no plan but the first (the step's
    transaction runs generic plans, `_GENERIC_PLANS`).

    The statements this connection has not prepared yet are prepared first, in a round trip
    of their own (Close, then Parse: a name left by an earlier session is replaced, never an
    error). The step's write then carries no SQL: it stays far below the 8 KiB at which libpq
    starts writing before the sync, so nothing reaches the server before all of it is queued,
    and no lock the first statement takes waits for this thread to send the rest (psycopg's
    own pipeline flushes each statement as it is queued; a thread may wait for the GIL
    between two).

    A statement found stale (`_STALE`) makes the server refuse the step, commit nothing and
    skip the rest: its statements are prepared again behind a ROLLBACK and the step sent once
    more. Refused again although just prepared, the step goes as SQL in one message; gone
    again (26000), the connection does not keep prepared statements (a pooler in transaction
    mode that does not carry them), and from then on every connection of its engine sends its
    steps so. Inside a caller's transaction the refusal ended that transaction: raised, as
    any error. If a statement fails,
    the server skips the rest and the transaction stays open in error for the caller's
    rollback.
    """
    import psycopg

    sent = [_driver_statement(conn.dialect, statement, params) for statement, params in statements]
    cursor = raw.cursor()  # what the listeners and SQLAlchemy's error handling are given
    stale = None
    try:
        calls = []
        for sql, values in sent:
            # Told before anything is sent: a listener that raises leaves nothing half sent.
            for listener in conn.dispatch.before_cursor_execute:
                listener(conn, cursor, sql, values, None, False)
            calls.append(_call(prepared, sql, values, raw.info.encoding))
        with raw.lock:  # psycopg's own, as its `execute` holds it
            for again in (False, True):
                _prepare(raw, prepared, calls, rollback=again)
                try:
                    return _step(raw, prepared, calls, begin=begin)
                except psycopg.Error as exc:
                    if exc.sqlstate not in _STALE:
                        raise
                    prepared.names.difference_update(call.name for call in calls)
                    if not begin:
                        raise  # the caller's transaction ended: theirs to handle
                    stale = exc.sqlstate
            _exchange(raw, [_command(b"ROLLBACK")])
    except psycopg.Error as exc:
        _raise_as_sqlalchemy(conn, exc, sent, cursor)
    finally:
        cursor.close()
    # Refused twice, nothing committed: this step goes as SQL. Gone again although just
    # prepared (26000), the engine's connections do not keep prepared statements; changed again
    # (0A000: a pooler's other server session held the old plan too), only this step.
    if stale == "26000":
        _sending_sql(conn.engine)
    return _in_one_message(conn, raw, statements, told=True)


def _sending_sql(engine: sa.Engine) -> None:
    """Send `engine`'s steps as SQL from now on, and say so once."""
    with _SENDING_SQL_LOCK:  # said once, however many connections find it at once
        found = engine not in _SENDING_SQL
        _SENDING_SQL.add(engine)
    if found:
        log.warning(
            "the database connections do not keep prepared statements (a pooler in"
            " transaction mode without max_prepared_statements?): each create's statements"
            " go as SQL"
        )


def _call(prepared: _Prepared, sql: str, values: Mapping[str, Any], encoding: str) -> _Call:
    """`sql` (pyformat, as SQLAlchemy writes it for psycopg) and its `values` as the pipeline
    sends them: psycopg's own dumpers write the values, as its `execute` does; a value it
    cannot write raises here, before anything is sent."""
    from psycopg.adapt import PyFormat

    query, names = _numbered(sql, encoding)
    writer = prepared.transformer
    params = writer.dump_sequence([values[name] for name in names], [PyFormat.AUTO] * len(names))
    return _Call(query, tuple(params), tuple(writer.types or ()), tuple(writer.formats or ()))


def _prepare(raw: Any, prepared: _Prepared, calls: Sequence[_Call], *, rollback: bool) -> None:
    """Prepare the statements of `calls` that `raw` has not prepared (at most `_MOST_PREPARED`
    in all: past that, a statement is sent with its SQL), after a ROLLBACK when `rollback`, in
    one round trip; nothing is sent when there is nothing to do."""
    todo: dict[bytes, _Call] = {}
    for call in calls:
        if (
            call.name not in prepared.names
            and call.name not in todo
            and len(prepared.names) + len(todo) < _MOST_PREPARED
        ):
            todo[call.name] = call
    if not todo and not rollback:
        return
    sends = [_command(b"ROLLBACK")] if rollback else []
    for call in todo.values():
        sends.append(functools.partial(_close_and_parse, call))
    results = _exchange(raw, sends)
    _raise_first_error(raw, results)
    prepared.names.update(todo)


def _close_and_parse(call: _Call, pgconn: Any) -> None:
    pgconn.send_close_prepared(call.name)  # not an error when there is none
    pgconn.send_prepare(call.name, call.query, call.types)


def _step(
    raw: Any, prepared: _Prepared, calls: Sequence[_Call], *, begin: bool
) -> list[list[tuple[Any, ...]]]:
    """Send the step in one write: BEGIN when `begin`, each of `calls`, COMMIT; wait once;
    each call's rows, or the first error raised."""
    from psycopg import pq

    def run(call: _Call, pgconn: Any) -> None:
        if call.name in prepared.names:
            pgconn.send_query_prepared(call.name, call.params, call.formats)
        else:  # past the bound: parsed and planned each time
            pgconn.send_query_params(call.query, call.params, call.types, call.formats)

    sends = [_command(_begin(raw)), _command(_GENERIC_PLANS)] if begin else []
    sends += [functools.partial(run, call) for call in calls]
    sends.append(_command(b"COMMIT"))
    results = _exchange(raw, sends)
    _raise_first_error(raw, results)
    reader = prepared.transformer
    rows: list[list[tuple[Any, ...]]] = []
    for result in results[len(results) - len(calls) - 1 : -1]:  # one per call, COMMIT last
        if result.status == pq.ExecStatus.TUPLES_OK:
            reader.set_pgresult(result)
            rows.append(reader.load_rows(0, result.ntuples, tuple))
        else:
            rows.append([])
    return rows


def _command(sql: bytes) -> Any:
    def send(pgconn: Any) -> None:
        pgconn.send_query_params(sql, None)

    return send


def _exchange(raw: Any, sends: Sequence[Any]) -> list[Any]:
    """Queue `sends` (each queues its messages on the pgconn) in libpq's pipeline mode, sync,
    write it all and wait for the answers once; return them, one per message, in order (after
    a failure, the skipped ones' say so)."""
    import psycopg
    from psycopg import generators, pq

    pgconn = raw.pgconn
    results = []
    pgconn.enter_pipeline_mode()
    try:
        for send in sends:
            send(pgconn)
        pgconn.pipeline_sync()  # libpq writes what is queued now, all of it
        raw.wait(generators.send(pgconn))  # the rest, should the socket take part of it
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
    return results


def _raise_first_error(raw: Any, results: Sequence[Any]) -> None:
    import psycopg
    from psycopg import pq

    for result in results:
        if result.status == pq.ExecStatus.FATAL_ERROR:
            raise psycopg.errors.error_from_result(result, raw.info.encoding)


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

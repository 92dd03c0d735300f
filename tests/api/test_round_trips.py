"""`commit_in_one_round_trip`: statements and their COMMIT in one wait for the server on
PostgreSQL (prepared once per connection, then one write in libpq's pipeline mode; as SQL in
one message where they are not kept), as `execute` would run them: the bound types'
conversions, the listeners, SQLAlchemy's errors, nothing committed on failure, the connection
left as it was (not in autocommit) for the pool."""

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
        # Each wait for the server ends with a ReadyForQuery. A connection's first step
        # prepares its statements in a round trip of their own, taking no lock; the step
        # itself (BEGIN, the statements, COMMIT) waits once.
        prepare, step, after = (tmp_path / "wire").read_text().split("\tReadyForQuery")
        assert "Bind" not in prepare and prepare.count('Parse\t "broker_step_') == 2
        assert "BEGIN" in step and "COMMIT" in step and 'Parse\t "broker_step_' not in step
        assert after.strip() == "I"


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


def _postgres_only(database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's prepared statements: runs in the PostgreSQL pass")


def _ours(conn: sa.Connection) -> int:
    """How many of the step's prepared statements this connection's server session holds."""
    return conn.scalar(
        sa.text("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'broker_step_%'")
    )


def test_statements_are_prepared_once_per_connection_then_only_run(
    engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    """The first step on a connection prepares its statements first; the next ones only run
    them (no SQL sent), values written and rows read as `execute` does: a big and a small
    integer (their types differ: one statement each; typed as the same number written in SQL
    would be, so a small one and one past int2 share theirs), None, booleans, text with a %,
    a parameter used twice; a statement run twice in a step is prepared once."""
    _postgres_only(database_url)
    echo = sa.select(
        sa.bindparam("n", type_=sa.BigInteger),
        sa.bindparam("text", type_=sa.String),
        sa.bindparam("flag", type_=sa.Boolean),
        sa.literal_column("'50%'"),
        sa.bindparam("n", type_=sa.BigInteger) + 1,
    )
    sent = [
        ({"n": 2**40, "text": "a", "flag": True}, (2**40, "a", True, "50%", 2**40 + 1)),
        ({"n": 7, "text": None, "flag": False}, (7, None, False, "50%", 8)),
        ({"n": 2**40 + 5, "text": "é", "flag": False}, (2**40 + 5, "é", False, "50%", 2**40 + 6)),
        ({"n": 70000, "text": "b", "flag": True}, (70000, "b", True, "50%", 70001)),
    ]
    with engine.connect() as conn:
        wires = []
        for number, (params, row) in enumerate(sent):
            pgconn = _trace(conn, tmp_path / f"wire{number}")
            inserts = [(_insert, {"id": 2 * number + i, "at": datetime.now(UTC)}) for i in (0, 1)]
            rows = commit_in_one_round_trip(conn, [(echo, params), *inserts])
            pgconn.untrace()
            assert rows == [[row], [], []]
            wires.append((tmp_path / f"wire{number}").read_text())
        assert _ours(conn) == 3  # the echo with an int8 and with an int4, the insert
        conn.rollback()
        assert conn.scalar(_count) == 8
    assert [wire.count("\tReadyForQuery") for wire in wires] == [2, 2, 1, 1]
    assert wires[0].count('Parse\t "broker_step_') == 2  # the insert once, run twice
    assert wires[1].count('Parse\t "broker_step_') == 1  # the echo's n is an int4 there
    for wire in wires[2:]:
        sent_sql = [line for line in wire.splitlines() if line.startswith("F") and "SELECT" in line]
        assert sent_sql == []


def _second_insert_on_the_wire(conn: sa.Connection, path: Path) -> str:
    """Step: insert the row 2 (the row 1 is there) and count; what went on the wire."""
    pgconn = _trace(conn, path)
    rows = commit_in_one_round_trip(
        conn, [(_insert, {"id": 2, "at": datetime.now(UTC)}), (_count, {})]
    )
    pgconn.untrace()
    assert rows == [[], [(2,)]]
    assert _ours(conn) == 2
    conn.rollback()
    return path.read_text()


def test_the_step_runs_its_statements_generic_plan(engine: sa.Engine, database_url: str) -> None:
    """The server plans a step's statement once, not at every run (its own choice can keep
    planning at every run once a user's history is large); only in the step's transaction:
    the connection's next one plans as it would have."""
    _postgres_only(database_url)
    with engine.connect() as conn:
        for number in range(3):
            commit_in_one_round_trip(conn, [(_insert, {"id": number, "at": None})])
        plans = conn.execute(
            sa.text(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE name LIKE 'broker_step_%'"
            )
        ).all()
        assert plans == [(3, 0)]
        assert conn.scalar(sa.text("SHOW plan_cache_mode")) == "auto"
        conn.rollback()


def test_statements_prepared_before_a_failing_step_stay_prepared(
    engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    """A step that fails (a duplicate key) had its statements prepared before it was sent:
    the next step only runs them, in one round trip."""
    _postgres_only(database_url)
    with engine.connect() as conn:
        commit_in_one_round_trip(conn, [(_insert, {"id": 1, "at": datetime.now(UTC)})])
        with pytest.raises(sa.exc.IntegrityError):
            commit_in_one_round_trip(
                conn, [(_insert, {"id": 1, "at": datetime.now(UTC)}), (_count, {})]
            )
        conn.rollback()
        wire = _second_insert_on_the_wire(conn, tmp_path / "wire")
    assert wire.count("\tReadyForQuery") == 1 and 'Parse\t "broker_step_' not in wire


def test_statements_psycopg_deallocated_are_prepared_again(
    engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    """psycopg prepares a query it ran five times, and then deallocates everything on the
    rollback of a transaction (DEALLOCATE ALL: a read-only request's connection returned to
    the pool; the broker's own engines turn that off). The next step meets its statements
    gone: refused, nothing committed; they are prepared again behind a ROLLBACK and the step
    sent once more, and it commits once."""
    _postgres_only(database_url)
    with engine.connect() as conn:
        commit_in_one_round_trip(
            conn, [(_insert, {"id": 1, "at": datetime.now(UTC)}), (_count, {})]
        )
        assert _ours(conn) == 2
        for _ in range(6):
            conn.execute(_count)  # psycopg prepares it on the fifth
        conn.rollback()
        assert _ours(conn) == 0  # wiped
        conn.rollback()
        wire = _second_insert_on_the_wire(conn, tmp_path / "wire")
    refused, prepared, step, _ = wire.split("\tReadyForQuery")
    assert "26000" in refused and "COMMIT" not in refused.split("26000")[1]
    assert "ROLLBACK" in prepared and prepared.count('Parse\t "broker_step_') == 2
    assert "COMMIT" in step and 'Parse\t "broker_step_' not in step
    with engine.connect() as other:
        assert other.scalar(_count) == 2


def test_a_name_left_prepared_by_an_earlier_session_is_replaced(
    engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    """Behind a pooler a server session may hold a statement of the same name prepared by
    another client (here: this connection's, forgotten): it is closed before it is prepared
    again, never an error, and the step commits once."""
    _postgres_only(database_url)
    from broker.api import round_trips

    with engine.connect() as conn:
        commit_in_one_round_trip(
            conn, [(_insert, {"id": 1, "at": datetime.now(UTC)}), (_count, {})]
        )
        conn.connection.info.pop(round_trips._PREPARED)
        wire = _second_insert_on_the_wire(conn, tmp_path / "wire")
    assert wire.count("\tReadyForQuery") == 2 and wire.count("Close\t S") == 2
    assert "ErrorResponse" not in wire


def test_a_statement_whose_result_changed_under_it_is_prepared_again(
    engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    """A migration that changes a column a prepared statement returns makes the server refuse
    it on every connection that prepared it before (0A000, "cached plan must not change result
    type"): the step is refused, nothing committed, its statements prepared again and the step
    sent once more, its rows of the new type."""
    _postgres_only(database_url)
    with engine.connect() as conn:
        rows = commit_in_one_round_trip(conn, [(_insert_returning, {"id": 1, "at": None})])
        assert rows == [[(1, None)]]
        with engine.connect() as migrating:
            migrating.execute(sa.text("ALTER TABLE round_trip_probe ALTER COLUMN id TYPE text"))
            migrating.commit()
        pgconn = _trace(conn, tmp_path / "wire")
        rows = commit_in_one_round_trip(conn, [(_insert_returning, {"id": 2, "at": None})])
        pgconn.untrace()
        assert rows == [[("2", None)]]
    wire = (tmp_path / "wire").read_text()
    assert wire.count("\tReadyForQuery") == 3 and wire.count("0A000") == 1
    with engine.connect() as other:
        assert other.scalar(_count) == 2


def test_a_statement_changed_again_before_its_second_sending_goes_as_sql(
    engine: sa.Engine,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refused as changed (0A000) a second time, just prepared again (behind a pooler the
    next server session may hold the old plan too): that step goes as SQL, commits once, its
    statement told to the listeners once, and nothing is said; the next step runs prepared
    statements again."""
    _postgres_only(database_url)
    from broker.api import round_trips

    prepare = round_trips._prepare
    types = iter(["varchar(20)"])

    def prepare_then_migrate(*args: Any, rollback: bool) -> None:
        prepare(*args, rollback=rollback)
        if rollback:  # prepared again: the column changes once more before the step is sent
            with engine.connect() as migrating:
                migrating.execute(
                    sa.text(f"ALTER TABLE round_trip_probe ALTER COLUMN id TYPE {next(types)}")
                )
                migrating.commit()

    with engine.connect() as conn:
        commit_in_one_round_trip(conn, [(_insert_returning, {"id": 1, "at": None})])
        with engine.connect() as migrating:
            migrating.execute(sa.text("ALTER TABLE round_trip_probe ALTER COLUMN id TYPE text"))
            migrating.commit()
        monkeypatch.setattr(round_trips, "_prepare", prepare_then_migrate)
        told: list[str] = []
        sa.event.listen(conn, "before_cursor_execute", lambda *a: told.append(a[2].split()[0]))
        pgconn = _trace(conn, tmp_path / "wire")
        rows = commit_in_one_round_trip(conn, [(_insert_returning, {"id": 2, "at": None})])
        pgconn.untrace()
        assert told == ["INSERT"]
        assert rows == [[("2", None)]]
        monkeypatch.setattr(round_trips, "_prepare", prepare)
        pgconn = _trace(conn, tmp_path / "next")
        rows = commit_in_one_round_trip(conn, [(_insert_returning, {"id": 3, "at": None})])
        pgconn.untrace()
        assert rows == [[("3", None)]]
    wire = (tmp_path / "wire").read_text()
    assert wire.count("0A000") == 2 and wire.count("\tQuery\t") == 1
    assert wire.count("\tReadyForQuery") == 5  # step, prepare, step, ROLLBACK, SQL
    following = (tmp_path / "next").read_text()
    assert 'Bind\t "" "broker_step_' in following and "\tQuery\t" not in following
    assert [r for r in caplog.records if r.name == "broker.api"] == []
    with engine.connect() as other:
        assert other.scalar(_count) == 3


def test_a_connections_isolation_level_begins_the_step(
    engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    """A connection with an isolation level set (SQLAlchemy's reset of a pooled connection
    sets the default one explicitly) begins the step at that level, its statements prepared
    as on any other."""
    _postgres_only(database_url)
    level = sa.select(sa.func.current_setting("transaction_isolation"))
    with engine.connect() as conn:
        conn.execution_options(isolation_level="REPEATABLE READ")
        pgconn = _trace(conn, tmp_path / "repeatable")
        rows = commit_in_one_round_trip(conn, [(level, {})])
        pgconn.untrace()
        assert rows == [[("repeatable read",)]]
    with engine.connect() as conn:  # the same connection, its level reset to the default
        pgconn = _trace(conn, tmp_path / "reset")
        rows = commit_in_one_round_trip(conn, [(level, {})])
        pgconn.untrace()
        assert rows == [[("read committed",)]]
    for wire, begin in [("repeatable", "REPEATABLE READ"), ("reset", "READ COMMITTED")]:
        sent = (tmp_path / wire).read_text()
        assert f'"BEGIN ISOLATION LEVEL {begin}"' in sent
        assert 'Bind\t "" "broker_step_' in sent


def test_statements_deallocated_inside_a_callers_transaction_are_its_error(
    engine: sa.Engine, database_url: str
) -> None:
    """Inside a transaction the caller began, the refusal ended it: not run again (what the
    caller did before would be lost), SQLAlchemy's error, nothing committed, the connection
    usable after the rollback."""
    _postgres_only(database_url)
    with engine.connect() as conn:
        commit_in_one_round_trip(conn, [(_insert, {"id": 1, "at": datetime.now(UTC)})])
        conn.execute(sa.text("DEALLOCATE ALL"))  # the caller's transaction goes on
        conn.execute(_insert, {"id": 2, "at": datetime.now(UTC)})
        with pytest.raises(sa.exc.ProgrammingError, match="does not exist"):
            commit_in_one_round_trip(conn, [(_insert, {"id": 3, "at": datetime.now(UTC)})])
        conn.rollback()
        assert conn.scalar(_count) == 1
        conn.rollback()
        commit_in_one_round_trip(conn, [(_insert, {"id": 4, "at": datetime.now(UTC)})])
    with engine.connect() as other:
        assert other.scalar(_count) == 2


def test_a_statement_failing_once_prepared_leaves_them_prepared(
    engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    """A prepared statement failing (a duplicate key): SQLAlchemy's error named by the SQL,
    never the values (`hide_parameters`), nothing committed; after the rollback the next step
    runs the same prepared statements, in one round trip."""
    _postgres_only(database_url)
    hiding = sa.create_engine(database_url, hide_parameters=True)
    try:
        with hiding.connect() as conn:
            commit_in_one_round_trip(conn, [(_insert, {"id": 1, "at": datetime.now(UTC)})])
            secret = datetime(2031, 4, 5, 6, 7, 8, tzinfo=UTC)
            with pytest.raises(sa.exc.IntegrityError) as failed:
                commit_in_one_round_trip(
                    conn, [(_insert, {"id": 2, "at": secret}), (_insert, {"id": 1, "at": secret})]
                )
            assert "INSERT INTO round_trip_probe" in str(failed.value)
            assert "2031" not in str(failed.value)
            conn.rollback()
            pgconn = _trace(conn, tmp_path / "wire")
            commit_in_one_round_trip(conn, [(_insert, {"id": 3, "at": datetime.now(UTC)})])
            pgconn.untrace()
            assert conn.scalar(sa.select(_probe.c.id).order_by(_probe.c.id)) == 1
            conn.rollback()
        wire = (tmp_path / "wire").read_text()
        assert wire.count("\tReadyForQuery") == 1 and 'Parse\t "broker_step_' not in wire
        with hiding.connect() as other:
            assert other.scalars(sa.select(_probe.c.id)).all() == [1, 3]
    finally:
        hiding.dispose()


def test_past_the_bound_statements_run_unprepared(
    engine: sa.Engine, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection holds a bounded number of prepared statements: past it, one more
    statement is sent with its SQL each time, in the same round trip, its rows as before."""
    _postgres_only(database_url)
    from broker.api import round_trips

    monkeypatch.setattr(round_trips, "_MOST_PREPARED", 1)
    with engine.connect() as conn:
        for number in range(2):
            rows = commit_in_one_round_trip(
                conn,
                [(_insert_returning, {"id": number, "at": None}), (_count, {})],
            )
            assert rows == [[(number, None)], [(number + 1,)]]
        assert _ours(conn) == 1
        conn.rollback()

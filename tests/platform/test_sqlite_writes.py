"""The in-process SQLite write gate: threads queue for the write lock instead of polling it."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from broker.platform import sqlite_writes
from broker.platform.sqlite_writes import GatedConnection, gate_for, gate_sqlite_writes

THREADS = 8
TRANSACTIONS = 25


def _engine(path: Path) -> sa.Engine:
    """A gated engine whose SQLite busy handler is off: any unqueued contention fails at once."""
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 30})
    gate_sqlite_writes(engine)

    @sa.event.listens_for(engine, "connect")
    def _no_busy_wait(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout=0")

    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        conn.exec_driver_sql("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER)")
        conn.exec_driver_sql("INSERT INTO counter VALUES (1, 0)")
    return engine


def test_threads_of_one_process_take_turns_instead_of_failing(tmp_path: Path) -> None:
    engine = _engine(tmp_path / "gate.sqlite3")
    errors: list[BaseException] = []
    gate = threading.Barrier(THREADS)

    def writer() -> None:
        gate.wait(30)
        try:
            for _ in range(TRANSACTIONS):
                with engine.begin() as conn:
                    n = conn.exec_driver_sql("SELECT n FROM counter WHERE id = 1").scalar_one()
                    conn.exec_driver_sql("INSERT INTO counter (n) VALUES (?)", (n,))
                    conn.exec_driver_sql("UPDATE counter SET n = n + 1 WHERE id = 1")
        except BaseException as exc:  # collected: the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT n FROM counter WHERE id = 1").scalar_one() == (
            THREADS * TRANSACTIONS
        )
    engine.dispose()


def test_the_gate_is_released_however_the_transaction_ends(tmp_path: Path) -> None:
    engine = _engine(tmp_path / "release.sqlite3")
    gate = gate_for(str(tmp_path / "release.sqlite3"))
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE counter SET n = 1")
        assert gate.owner_thread == threading.get_ident()
    assert gate.owner_thread is None  # commit
    with engine.connect() as conn:
        conn.exec_driver_sql("UPDATE counter SET n = 2")
        conn.rollback()
        assert gate.owner_thread is None
        conn.exec_driver_sql("UPDATE counter SET n = 3")
        conn.invalidate()  # closes the DBAPI connection mid-transaction
    assert gate.owner_thread is None
    with engine.connect() as conn:
        with pytest.raises(sa.exc.IntegrityError):
            conn.exec_driver_sql("INSERT INTO counter VALUES (1, 0)")
        conn.rollback()
    assert gate.owner_thread is None
    # Not returned explicitly: the pool's reset-on-return rolls back and frees the gate.
    conn = engine.connect()
    conn.exec_driver_sql("UPDATE counter SET n = 4")
    conn.close()
    assert gate.owner_thread is None
    engine.dispose()


def test_a_thread_writing_on_two_connections_fails_instead_of_deadlocking(
    tmp_path: Path,
) -> None:
    path = tmp_path / "two.sqlite3"
    _engine(path).dispose()
    first = sqlite3.connect(path, timeout=30, factory=GatedConnection)
    second = sqlite3.connect(path, timeout=30, factory=GatedConnection)
    second.execute("PRAGMA busy_timeout=0")
    try:
        first.execute("UPDATE counter SET n = 1")
        # Waiting on the gate would wait for this very thread: SQLite answers instead.
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            second.execute("UPDATE counter SET n = 2")
        first.commit()
        second.rollback()
        second.execute("UPDATE counter SET n = 2")
        second.commit()
    finally:
        first.close()
        second.close()
    assert gate_for(str(path)).owner_thread is None


def test_checkpoints_run_every_so_many_commits_after_the_gate_is_let_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_writes, "CHECKPOINT_EVERY", 3)
    path = tmp_path / "checkpoint.sqlite3"
    setup = sqlite3.connect(path)  # not gated: no commit of this process counted yet
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE counter (id INTEGER PRIMARY KEY, n)")
    setup.execute("INSERT INTO counter VALUES (1, 0)")
    setup.commit()
    setup.close()  # the last connection: its log is checkpointed
    holders: list[int | None] = []

    class Probe(GatedConnection):
        def checkpoint(self) -> None:
            holders.append(self._gate.owner_thread)
            super().checkpoint()

    conn = sqlite3.connect(path, factory=Probe)
    try:
        # SQLite's own checkpoint (inside commit, with the gate held) is off.
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        size = path.stat().st_size
        for n in range(1, 4):
            conn.execute("INSERT INTO counter (n) VALUES (?)", (n,))
            conn.execute("UPDATE counter SET n = zeroblob(20000) WHERE id = 1")
            conn.commit()
            if n < 3:  # the rows sit in the log; the database file is as it was
                assert (holders, path.stat().st_size) == ([], size)
        # The third commit of the process checkpointed, the gate free by then.
        assert holders == [None]
        assert path.stat().st_size > size
        conn.execute("SELECT n FROM counter").fetchall()  # reads take no gate
        conn.commit()
        assert holders == [None]
    finally:
        conn.close()

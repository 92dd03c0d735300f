"""The SQLite write gate: threads and processes queue for the write lock instead of polling it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import types
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from broker.platform import sqlite_writes
from broker.platform.sqlite_writes import FileLock, GatedConnection, gate_for, gate_sqlite_writes

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
        # SQLite's own checkpoint (inside commit, with the gate held) is only a backstop.
        backstop = conn.execute("PRAGMA wal_autocheckpoint").fetchone()
        assert backstop == (sqlite_writes.BACKSTOP_PAGES,)
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


# Writers of other processes queue on a flock of `<database>-writers`. The processes below are
# real ones; they report over their stdout and wait for their orders on their stdin.
CHILD = """
import fcntl, json, os, sqlite3, sys, time
from broker.platform.sqlite_writes import GatedConnection

role, path = sys.argv[1], sys.argv[2]
conn = sqlite3.connect(path, timeout=30, factory=GatedConnection)
conn.execute("PRAGMA busy_timeout=0")  # contention the gate lets through fails at once
if role == "writer":
    sys.stdin.readline()  # go
    held, times = 0, []
    for n in range(int(sys.argv[3])):
        conn.execute("UPDATE counter SET n = n + 1 WHERE id = 1")
        start = time.monotonic_ns()  # system-wide: comparable between processes
        held += conn._gate.files.held
        conn.execute("INSERT INTO counter (n) VALUES (?)", (n,))
        times.append((start, time.monotonic_ns()))
        conn.commit()
    print(json.dumps({"held": held, "times": times}), flush=True)
else:  # holder: takes the gate and keeps it until told
    conn.execute("UPDATE counter SET n = n + 1 WHERE id = 1")
    print("holding", conn._gate.files.held, flush=True)
    sys.stdin.readline()
    conn.commit()
    # Blocks until every other process of the host has given the file lock back.
    fcntl.flock(os.open(path + "-writers", os.O_RDONLY), fcntl.LOCK_EX)
    print("retaken", flush=True)
    sys.stdin.readline()
conn.close()
"""


def _child(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _holder(path: Path) -> subprocess.Popen[str]:
    holder = _child("holder", path)
    assert holder.stdout is not None
    assert holder.stdout.readline() == "holding True\n"
    return holder


def _tell(proc: subprocess.Popen[str], order: str) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(order + "\n")
    proc.stdin.flush()
    return proc.stdout.readline()


def _end(proc: subprocess.Popen[str]) -> None:
    try:
        proc.communicate(timeout=60)
    finally:
        if proc.returncode is None:  # stuck: it must not outlive the test
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0


def test_writers_of_two_processes_take_turns_on_the_file_lock(tmp_path: Path) -> None:
    path = tmp_path / "processes.sqlite3"
    _engine(path).dispose()
    writers = [_child("writer", path, TRANSACTIONS) for _ in range(2)]
    out = [w.communicate("go\n", timeout=60)[0] for w in writers]
    assert [w.returncode for w in writers] == [0, 0]  # not one "database is locked"
    reports = [json.loads(o) for o in out]
    assert [r["held"] for r in reports] == [TRANSACTIONS, TRANSACTIONS]
    intervals = sorted(tuple(t) for r in reports for t in r["times"])
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert end <= start  # one process's transaction never overlaps the other's
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT n FROM counter WHERE id = 1").fetchone() == (2 * TRANSACTIONS,)
    conn.close()
    assert (tmp_path / "processes.sqlite3-writers").exists()


def test_a_holder_killed_mid_transaction_does_not_block_the_next_writer(tmp_path: Path) -> None:
    path = tmp_path / "killed.sqlite3"
    _engine(path).dispose()
    holder = _holder(path)
    try:
        lock = FileLock(f"{path}-writers")
        assert lock.acquire(0) is False
    finally:
        holder.kill()
        holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    # The kernel dropped the dead process's flock (and SQLite's own lock): a writer goes on.
    conn = sqlite3.connect(path, timeout=30, factory=GatedConnection)
    try:
        conn.execute("PRAGMA busy_timeout=0")
        conn.execute("UPDATE counter SET n = 7 WHERE id = 1")
        assert conn._gate.files is not None and conn._gate.files.held
        conn.commit()
        assert not conn._gate.files.held
        assert conn.execute("SELECT n FROM counter WHERE id = 1").fetchone() == (7,)
    finally:
        conn.close()
    assert lock.acquire(30) is True
    lock.close()


def test_a_holder_that_never_lets_go_blocks_writers_only_for_the_busy_timeout(
    tmp_path: Path,
) -> None:
    path = tmp_path / "stuck.sqlite3"
    _engine(path).dispose()
    holder = _holder(path)
    try:
        gate = gate_for(str(path))
        assert gate.files is not None
        # Past its timeout the writer goes on without the file lock; SQLite decides.
        assert gate.acquire(0) is True
        assert not gate.files.held
        gate.release()
        # When the holder lets go, the lock the waiter thread obtains for nobody goes back at
        # once: the holder, blocking for it, gets it again.
        assert _tell(holder, "commit") == "retaken\n"
        # A writer that waits long enough has it once the holder is gone, whether the waiter
        # thread is still blocked from the last timeout or not.
        assert gate.files.acquire(0) is False
        holder.stdin.write("exit\n")  # type: ignore[union-attr]
        holder.stdin.flush()  # type: ignore[union-attr]
        assert gate.files.acquire(30) is True
        gate.files.release()
    finally:
        _end(holder)
    gate.files.close()


def _in_a_forked_child(check: Callable[[], bool]) -> bool:
    """Run `check` in a forked child (which never returns into pytest); return its answer."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if check() else 2
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1] == 0


@pytest.mark.filterwarnings("ignore:.*fork:DeprecationWarning")  # fork with threads, 3.12+
def test_a_forked_child_has_a_lock_of_its_own(tmp_path: Path) -> None:
    lock = FileLock(str(tmp_path / "fork.sqlite3-writers"))
    assert lock.acquire(0) is True

    def still_the_parents() -> bool:
        lock.release()  # inherited `held`: must not let go of the parent's lock
        return lock.acquire(0) is False

    assert _in_a_forked_child(still_the_parents)
    # Still the parent's: another open file description of this process cannot take it.
    other = FileLock(lock.path)
    assert other.acquire(0) is False
    lock.close()
    free = FileLock(lock.path)  # not `other`, whose flock thread may take it back for nobody
    assert free.acquire(0) is True
    free.close()
    other.close()


def test_in_memory_and_uri_databases_take_no_file_lock(tmp_path: Path) -> None:
    memory = sqlite3.connect(":memory:", factory=GatedConnection)
    uri = sqlite3.connect(
        f"file:{tmp_path}/uri.sqlite3?mode=rwc", uri=True, factory=GatedConnection
    )
    try:
        for conn in (memory, uri):
            conn.execute("CREATE TABLE t (n)")
            conn.execute("INSERT INTO t VALUES (1)")
            assert conn._gate.files is None
            conn.commit()
    finally:
        memory.close()
        uri.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uri.sqlite3"]


def test_a_lock_file_that_cannot_be_opened_leaves_the_writer_to_sqlite(tmp_path: Path) -> None:
    lock = FileLock(str(tmp_path / "missing" / "db.sqlite3-writers"))
    assert lock.acquire(30) is False  # at once: nothing to wait for
    assert not lock.held
    lock.release()


class _Queue(deque[Any]):
    """A gate's waiter queue that lets a test wait, without spinning, until it holds so many."""

    def __init__(self) -> None:
        super().__init__()
        self.grew = threading.Condition()

    def append(self, item: Any) -> None:
        with self.grew:
            super().append(item)
            self.grew.notify_all()

    def reach(self, length: int) -> None:
        with self.grew:
            assert self.grew.wait_for(lambda: len(self) >= length, 30), "nobody queued"


def _watched(gate: sqlite_writes.WriteGate) -> _Queue:
    queue = _Queue()
    gate._waiters = queue
    return queue


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_gate_goes_to_its_waiters_in_the_order_they_came(tmp_path: Path) -> None:
    gate = gate_for(str(tmp_path / "order.sqlite3"))
    queue = _watched(gate)
    assert gate.acquire(30) is True
    descriptors = _open_descriptors()
    order: list[int] = []

    def writer(n: int) -> None:
        assert gate.acquire(30) is True
        assert gate.owner_thread == threading.get_ident()
        order.append(n)
        gate.release()

    threads = []
    for n in range(5):
        threads.append(threading.Thread(target=writer, args=(n,)))
        threads[-1].start()
        queue.reach(n + 1)  # queued before the next one comes
    assert _open_descriptors() == descriptors + 2 * 5  # a pipe per waiter
    gate.release()  # handed to the first, which hands it on
    for t in threads:
        t.join(30)
    assert order == [0, 1, 2, 3, 4]
    assert gate.owner_thread is None and gate.acquire(0) is True  # free again
    gate.release()
    assert _open_descriptors() == descriptors  # every waiter's pipe closed


def test_a_writer_that_times_out_leaves_the_queue(tmp_path: Path) -> None:
    gate = gate_for(str(tmp_path / "timeout.sqlite3"))
    assert gate.acquire(30) is True
    descriptors = _open_descriptors()
    answers: list[bool] = []
    waiter = threading.Thread(target=lambda: answers.append(gate.acquire(0)))
    waiter.start()
    waiter.join(30)
    assert answers == [False]  # went on without it
    assert len(gate._waiters) == 0 and _open_descriptors() == descriptors
    gate.release()  # nobody to hand it to: free
    assert gate.acquire(0) is True
    gate.release()


@pytest.mark.parametrize("ending", ["timeout", "interrupt", "interrupt after the wake-up"])
def test_a_gate_handed_over_as_the_wait_ends_is_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    gate = gate_for(str(tmp_path / f"{ending.replace(' ', '-')}.sqlite3"))
    assert gate.acquire(30) is True
    descriptors = _open_descriptors()

    class Late(sqlite_writes.Turn):
        def wait(self, timeout: float | None) -> bool:
            gate.release()  # the holder lets go just as the waiter's wait ends
            if ending == "interrupt after the wake-up":
                super().wait(timeout)  # the hand-off's byte is read, then Ctrl-C comes
            if ending.startswith("interrupt"):  # e.g. Ctrl-C in a command's main thread
                raise KeyboardInterrupt
            return False

    monkeypatch.setattr(sqlite_writes, "Turn", Late)
    answers: list[object] = []

    def waiter() -> None:
        try:
            answers.append(gate.acquire(30))
        except KeyboardInterrupt:
            answers.append("interrupted")
        answers.append(gate.owner_thread == threading.get_ident())
        if answers[0] is True:
            gate.release()

    thread = threading.Thread(target=waiter)
    thread.start()
    thread.join(30)
    # Timed out: it had been handed the gate, so it writes with it. Interrupted: it passed the
    # gate on rather than leave it held by nobody.
    assert answers == ([True, True] if ending == "timeout" else ["interrupted", False])
    assert len(gate._waiters) == 0 and gate.acquire(0) is True
    assert _open_descriptors() == descriptors
    gate.release()


@pytest.mark.filterwarnings("ignore:.*fork:DeprecationWarning")  # fork with threads, 3.12+
def test_a_forked_child_finds_the_gate_its_parent_held_free(tmp_path: Path) -> None:
    gate = gate_for(str(tmp_path / "forked.sqlite3"))
    assert gate.acquire(30) is True

    def free_in_the_child() -> bool:
        child = gate_for(str(tmp_path / "forked.sqlite3"))
        return child.owner_thread is None and child.acquire(0) is True

    assert _in_a_forked_child(free_in_the_child)
    assert gate.owner_thread == threading.get_ident()  # the parent's still
    gate.release()


def test_a_stuck_holder_is_logged_once_until_the_lock_is_taken_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "logged.sqlite3"
    _engine(path).dispose()
    descriptors, threads = _open_descriptors(), threading.active_count()
    lock = FileLock(f"{path}-writers")
    caplog.set_level("INFO", logger="broker.sqlite_writes")
    for episode in range(2):
        holder = _holder(path)
        try:
            for _ in range(3):  # three writes while it is stuck: one warning
                assert lock.acquire(0) is False
        finally:
            holder.stdin.write("commit\nexit\n")  # type: ignore[union-attr]
            holder.stdin.flush()  # type: ignore[union-attr]
            _end(holder)
        assert lock.acquire(30) is True  # the holder is gone
        lock.release()
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 2 * (episode + 1)
        assert "held by another process for 0s" in messages[-2]
        assert [r.levelname for r in caplog.records[-2:]] == ["WARNING", "INFO"]
        assert messages[-1] == f"SQLite writers' lock {path}-writers taken again"
        assert lock.acquire(0) is True  # not stuck: nothing more logged
        lock.release()
        assert len(caplog.records) == 2 * (episode + 1)
    lock.close()  # its flock thread ends, its descriptors are closed
    assert (_open_descriptors(), threading.active_count()) == (descriptors, threads)


def test_a_collection_at_a_waiters_allocation_may_release_the_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A connection leaked while it writes (in a reference cycle) is rolled back by SQLAlchemy's
    # clean-up when the garbage collector finds it, which releases the gate, on whatever thread
    # the collection ran: here the one that allocates as it queues for that very gate.
    path = tmp_path / "collected.sqlite3"
    engine = _engine(path)
    gate = gate_for(str(path))
    gc.disable()
    try:

        def leak() -> None:
            conn = engine.connect()
            conn.exec_driver_sql("UPDATE counter SET n = 1")
            cycle: list[Any] = [conn]
            cycle.append(cycle)

        leak()
        assert gate.owner_thread == threading.get_ident()
        real_pipe = os.pipe

        def pipe() -> tuple[int, int]:
            gc.collect()  # stands for an automatic collection triggered by this allocation
            return real_pipe()

        monkeypatch.setattr(os, "pipe", pipe)
        answers: list[bool] = []
        writer = threading.Thread(target=lambda: answers.append(gate.acquire(30)), daemon=True)
        writer.start()
        writer.join(30)
        assert not writer.is_alive(), "the writer deadlocked on the gate's own mutex"
    finally:
        gc.enable()
    assert answers == [True]  # the leaked writer's gate, let go by the collection, is its own
    gate.release()
    _assert_free(gate)
    engine.dispose()


def _in_thread(call: Any) -> list[object]:
    """Run `call` in another thread to its end; its answer, or the exception it raised."""
    answers: list[object] = []

    def run() -> None:
        try:
            answers.append(call())
        except BaseException as exc:  # collected: the caller's assertion shows it
            answers.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    return answers


def _assert_free(gate: sqlite_writes.WriteGate) -> None:
    assert gate.acquire(0) is True
    gate.release()


def _no_pipes(monkeypatch: pytest.MonkeyPatch, after: int = 0) -> None:
    """Make every os.pipe fail as it does when the process has no descriptor left."""
    real_pipe, calls = os.pipe, itertools.count()

    def pipe() -> tuple[int, int]:
        if next(calls) >= after:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_pipe()

    monkeypatch.setattr(os, "pipe", pipe)


def test_a_writer_that_cannot_open_a_pipe_goes_on_without_the_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gate = gate_for(str(tmp_path / "emfile.sqlite3"))
    assert gate.acquire(30) is True
    _no_pipes(monkeypatch)
    assert _in_thread(lambda: gate.acquire(0)) == [False]  # gives up at once: needs no pipe
    assert not [r for r in caplog.records if "cannot queue" in r.getMessage()]
    answers = [*_in_thread(lambda: gate.acquire(30)), *_in_thread(lambda: gate.acquire(30))]
    assert answers == [False, False]  # SQLite's busy handler decides, as after a timeout
    assert [r.getMessage() for r in caplog.records if "cannot queue" in r.getMessage()] == [
        "SQLite write gate cannot queue ([Errno 24] Too many open files); writers go on without it"
    ]  # once per episode
    assert len(gate._waiters) == 0
    gate.release()
    _assert_free(gate)


def test_a_file_lock_without_pipes_lets_its_writer_through_and_is_not_left_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "emfile-files.sqlite3"
    _engine(path).dispose()
    holder = _holder(path)  # the file lock is busy: a writer of this process would wait
    try:
        descriptors = _open_descriptors()
        gate = gate_for(str(path))
        assert gate.files is not None
        _no_pipes(monkeypatch, after=1)  # the request pipe opens, the answer's does not
        assert gate.acquire(30) is True  # with the gate, without the file lock: SQLite decides
        assert not gate.files.held and gate.files._signals is None
        assert _open_descriptors() == descriptors  # no pipe left open
        gate.release()
        assert _in_thread(lambda: gate.acquire(0)) == [True]  # not left held by nobody
        gate.release()
    finally:
        holder.stdin.write("commit\nexit\n")  # type: ignore[union-attr]
        holder.stdin.flush()  # type: ignore[union-attr]
        _end(holder)


class _Interrupting(_Queue):
    """A queue whose next popleft is interrupted (Ctrl-C) just after it took the waiter out."""

    def popleft(self) -> Any:
        super().popleft()
        raise KeyboardInterrupt


def test_a_release_interrupted_mid_hand_off_still_hands_the_gate_over(tmp_path: Path) -> None:
    gate = gate_for(str(tmp_path / "handoff.sqlite3"))
    queue = _Interrupting()
    gate._waiters = queue
    assert gate.acquire(30) is True
    answers: list[bool] = []

    def writer() -> None:
        answers.append(gate.acquire(30))
        gate._waiters = _Queue()  # the next release is not interrupted
        gate.release()

    thread = threading.Thread(target=writer)
    thread.start()
    queue.reach(1)
    with pytest.raises(KeyboardInterrupt):
        gate.release()
    thread.join(30)
    assert answers == [True]  # woken with the gate, not left waiting for nobody
    _assert_free(gate)


def test_an_interrupt_while_the_file_lock_is_awaited_releases_the_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = gate_for(str(tmp_path / "interrupted.sqlite3"))
    assert gate.files is not None

    def interrupted(timeout: float) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(gate.files, "acquire", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gate.acquire(30)
    assert gate.owner_thread is None and gate._holder is None


def test_an_interrupted_file_lock_wait_leaves_the_lock_to_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "flock-interrupt.sqlite3"
    _engine(path).dispose()
    holder = _holder(path)
    try:
        lock = FileLock(f"{path}-writers")
        assert lock.acquire(0) is False  # the waiter thread now blocks in flock
        assert lock._signals is not None

        def interrupted(timeout: float | None) -> bool:
            raise KeyboardInterrupt

        monkeypatch.setattr(lock._signals[1], "wait", interrupted)
        with pytest.raises(KeyboardInterrupt):
            lock.acquire(30)
        assert not lock._wanted and not lock.held
        # The waiter gets the lock when the holder lets go, and gives it back at once: the
        # holder, blocking for it, has it again.
        assert _tell(holder, "commit") == "retaken\n"
    finally:
        holder.stdin.write("exit\n")  # type: ignore[union-attr]
        holder.stdin.flush()  # type: ignore[union-attr]
        _end(holder)
    monkeypatch.undo()
    lock.close()


class _ReleasingOnAppend(deque[Any]):
    """A gate's queue whose first append runs a release, as a garbage collection could while
    the waiter holds the gate's mutex: the clean-up of a leaked connection holding the gate."""

    def __init__(self, gate: sqlite_writes.WriteGate) -> None:
        super().__init__()
        self.gate = gate
        self.fired = False

    def append(self, turn: Any) -> None:
        super().append(turn)
        if not self.fired:
            self.fired = True
            self.gate.release()


def test_a_release_run_inside_the_gates_own_section_goes_through(tmp_path: Path) -> None:
    """Python 3.12+ may collect at any call, so such a release can come while the waiter's
    thread holds the gate's mutex: it goes through (no self-deadlock), and the gate goes to
    that waiter."""
    gate = gate_for(str(tmp_path / "reentrant.sqlite3"))
    assert gate.acquire(30) is True  # the leaked connection's
    gate._waiters = _ReleasingOnAppend(gate)
    answers: list[bool] = []

    def writer() -> None:
        answers.append(gate.acquire(30))
        gate._waiters = deque()
        gate.release()

    thread = threading.Thread(target=writer, daemon=True)  # a deadlock must not hang the suite
    thread.start()
    thread.join(30)
    assert answers == [True]
    _assert_free(gate)


def test_a_wait_longer_than_one_poll_can_take_is_capped() -> None:
    """poll takes a C int of milliseconds: a busy timeout of a month must not overflow it."""
    wakeup = sqlite_writes.Wakeup()
    try:
        wakeup.set()
        assert wakeup.wait(30 * 86400.0) is True
    finally:
        wakeup.close()


def _closed_here(turn: sqlite_writes.Turn) -> Callable[[], bool]:
    """A check that both ends of `turn`'s pipe (as numbered now) are closed where it runs."""
    pipe = (turn._read, turn._write)

    def closed() -> bool:
        for fd in pipe:
            try:
                os.fstat(fd)
            except OSError:
                continue
            return False
        return True

    return closed


@pytest.mark.filterwarnings("ignore:.*fork:DeprecationWarning")  # fork with threads, 3.12+
def test_a_forked_child_closes_the_pipes_of_its_parents_waiters(tmp_path: Path) -> None:
    gate = gate_for(str(tmp_path / "fork-turns.sqlite3"))
    queue = _watched(gate)
    assert gate.acquire(30) is True
    waiter = threading.Thread(target=lambda: gate.acquire(30) and gate.release())
    waiter.start()
    queue.reach(1)
    turn = gate._waiters[0]
    assert _in_a_forked_child(_closed_here(turn))
    gate.release()
    waiter.join(30)
    _assert_free(gate)


@contextlib.contextmanager
def _held_by_another_process(path: Path) -> Iterator[None]:
    """A new database at `path` whose writers' lock another process holds inside the block."""
    _engine(path).dispose()
    holder = _holder(path)
    try:
        yield
    finally:
        holder.stdin.write("commit\nexit\n")  # type: ignore[union-attr]
        holder.stdin.flush()  # type: ignore[union-attr]
        _end(holder)


def test_a_flock_waiter_that_cannot_start_leaves_no_request_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "no-thread.sqlite3"
    lock = FileLock(f"{path}-writers")

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with _held_by_another_process(path):
        monkeypatch.setattr(threading.Thread, "start", no_thread)
        assert lock.acquire(30) is False  # at once: the writer goes on, SQLite decides
        monkeypatch.undo()
        assert not lock._pending and lock._waiter is None
    # The holder is gone: the next writer takes the lock at once, not after waiting for the
    # answer of a waiter that never ran.
    assert lock.acquire(0) is True
    lock.close()


def _blocked(path: str) -> tuple[FileLock, FileLock]:
    """`blocker`, holding the lock of `path` as another process would, and a `lock` on it."""
    blocker = FileLock(path)  # another open file description: as another process's
    assert blocker.acquire(0) is True
    return blocker, FileLock(path)


def test_an_interrupt_as_the_flock_waiter_hands_over_leaves_the_lock_to_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker, lock = _blocked(str(tmp_path / "given.sqlite3-writers"))
    assert lock.acquire(0) is False  # the waiter thread now blocks in flock
    with lock._mutex:
        lock._wanted = True  # a caller waits for its answer
    blocker.release()  # the waiter takes the lock and hands it to that caller

    def interrupted() -> bool:
        raise KeyboardInterrupt  # Ctrl-C as the caller takes what it was handed

    monkeypatch.setattr(lock, "_taken", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lock._await_waiter(float("inf"), 30)
    # Held, so the gate's handler lets it go: not left locked by nobody.
    lock.release()
    assert blocker.acquire(0) is True
    blocker.close()
    monkeypatch.undo()
    lock.close()


def _held_and_watched(path: Path) -> tuple[sqlite_writes.WriteGate, _Queue, int]:
    """The gate of `path`, held by this thread, its queue watched; the descriptors open now."""
    gate = gate_for(str(path))
    queue = _watched(gate)
    assert gate.acquire(30) is True
    return gate, queue, _open_descriptors()


def test_an_interrupt_as_a_granted_turn_is_closed_still_passes_the_gate_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, queue, descriptors = _held_and_watched(tmp_path / "close.sqlite3")
    interrupted: list[bool] = []

    class Closing(sqlite_writes.Turn):
        def close(self) -> None:
            super().close()
            if not interrupted:  # Ctrl-C as the waiter closes its pipe, the gate its own
                interrupted.append(True)
                raise KeyboardInterrupt

    monkeypatch.setattr(sqlite_writes, "Turn", Closing)
    answers: list[object] = []
    waiter = threading.Thread(target=lambda: answers.extend(_in_thread(lambda: gate.acquire(30))))
    waiter.start()
    queue.reach(1)
    gate.release()
    waiter.join(30)
    assert len(answers) == 1 and isinstance(answers[0], KeyboardInterrupt)
    _assert_free(gate)  # given back, not held by nobody
    assert _open_descriptors() == descriptors


def test_a_second_interrupt_while_leaving_the_queue_leaves_no_turn_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, queue, descriptors = _held_and_watched(tmp_path / "twice.sqlite3")

    class Interrupted(sqlite_writes.Turn):
        def wait(self, timeout: float | None) -> bool:
            raise KeyboardInterrupt  # Ctrl-C while waiting

    leave, leaves = gate._leave, itertools.count()

    def interrupted_leave(turn: sqlite_writes.Turn) -> bool:
        if next(leaves) == 0:
            raise KeyboardInterrupt  # a second Ctrl-C as the first is handled
        return leave(turn)

    monkeypatch.setattr(sqlite_writes, "Turn", Interrupted)
    monkeypatch.setattr(gate, "_leave", interrupted_leave)
    answers = _in_thread(lambda: gate.acquire(30))
    assert len(answers) == 1 and isinstance(answers[0], KeyboardInterrupt)
    assert len(queue) == 0  # out of the queue: no release writes to its closed pipe
    gate.release()
    _assert_free(gate)
    assert _open_descriptors() == descriptors


@contextlib.contextmanager
def _gated_connection(path: Path) -> Iterator[GatedConnection]:
    """A gated connection to a new database at `path`, closed after the block."""
    _engine(path).dispose()
    conn = sqlite3.connect(path, timeout=30, factory=GatedConnection)
    try:
        yield conn
    finally:
        conn.close()


def _write_interrupted(conn: GatedConnection, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a first write on `conn` that the patched interrupts cut short; then, patches undone,
    check that the gate is free."""
    gate = conn._gate
    with pytest.raises(KeyboardInterrupt):
        conn.execute("UPDATE counter SET n = n + 1 WHERE id = 1")
    monkeypatch.undo()
    assert gate.owner_thread is None
    assert _in_thread(lambda: gate.acquire(0) and gate.release() is None) == [True]


@pytest.mark.parametrize("release_begun", [False, True])
def test_an_interrupt_as_the_gate_is_taken_for_a_connection_gives_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, release_begun: bool
) -> None:
    with _gated_connection(tmp_path / "holding.sqlite3") as conn:
        gate = conn._gate
        acquire = gate.acquire

        def interrupted(timeout: float, holder: object) -> bool:
            acquire(timeout, holder)
            if release_begun:  # a release of the gate began (its owner forgotten), cut short
                gate.owner_thread = None
            raise KeyboardInterrupt  # after `acquire` returned, before the connection noted it

        monkeypatch.setattr(gate, "acquire", interrupted)
        _write_interrupted(conn, monkeypatch)


def _flock_free(path: str) -> bool:
    """Tell whether nobody holds the flock of `path`, trying it on an open file of its own."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def _with_idle_waiter(path: str) -> tuple[FileLock, FileLock]:
    """A lock on `path` held by `blocker` (as by another process) and `lock`, whose flock
    waiter thread runs, answered, and waits for its next request."""
    blocker, lock = _blocked(path)
    assert lock.acquire(0) is False  # the waiter thread now blocks in flock
    blocker.release()
    assert lock.acquire(30) is True  # the waiter's answer, or at once once it gave it back
    lock.release()
    assert blocker.acquire(0) is True
    assert not lock._pending and lock._waiter is not None and lock._signals is not None
    return blocker, lock


def test_an_interrupt_as_a_flock_request_is_sent_leaves_none_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker, lock = _with_idle_waiter(str(tmp_path / "request.sqlite3-writers"))
    assert lock._signals is not None

    def interrupted() -> None:
        raise KeyboardInterrupt  # Ctrl-C before the request's byte is written

    monkeypatch.setattr(lock._signals[0], "set", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lock.acquire(30)
    monkeypatch.undo()
    blocker.release()
    # Nothing pending: the next writer takes the free lock at once, not after its busy timeout
    # spent waiting for an answer to a request the waiter never saw.
    assert lock.acquire(0) is True
    lock.close()
    blocker.close()


def test_a_stale_flock_request_is_not_answered_under_the_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "stale.sqlite3-writers")
    blocker, lock = _with_idle_waiter(path)
    blocker.release()
    assert lock.acquire(0) is True  # taken at once by this process's writer
    assert lock._signals is not None
    request = lock._signals[0]
    waited = threading.Event()
    wait = request.wait

    def next_wait(timeout: float | None) -> bool:
        waited.set()  # the waiter is done with the byte below and waits for the next one
        return wait(timeout)

    monkeypatch.setattr(request, "wait", next_wait)
    # The byte a request leaves when Ctrl-C comes right after it was written (the caller
    # took its request back): the waiter must not flock for nobody through the descriptor
    # the holder's lock is on, then let it go under the holder.
    request.set()
    assert waited.wait(30)
    assert not _flock_free(path)  # still the holder's
    lock.release()
    assert _flock_free(path)
    monkeypatch.undo()
    lock.close()
    blocker.close()


def _flock_by(monkeypatch: pytest.MonkeyPatch, flock: Callable[[int, int], None]) -> None:
    """Make the gate's module call `flock` for every flock it makes."""
    names = ("LOCK_EX", "LOCK_NB", "LOCK_UN")
    fake = types.SimpleNamespace(flock=flock, **{n: getattr(fcntl, n) for n in names})
    monkeypatch.setattr(sqlite_writes, "fcntl", fake)


def test_an_interrupt_right_after_the_flock_is_taken_leaves_it_to_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = gate_for(str(tmp_path / "taken.sqlite3"))
    assert gate.files is not None
    flock = fcntl.flock

    def interrupted(fd: int, operation: int) -> None:
        flock(fd, operation)
        if operation == fcntl.LOCK_EX | fcntl.LOCK_NB:
            raise KeyboardInterrupt  # Ctrl-C as the flock returns, taken

    _flock_by(monkeypatch, interrupted)
    with pytest.raises(KeyboardInterrupt):
        gate.acquire(30)
    monkeypatch.undo()
    assert _flock_free(gate.files.path)  # the gate's handler let it go: not held by nobody
    _assert_free(gate)


@pytest.mark.parametrize("when", ["as it begins", "as it returns"])
def test_an_interrupted_release_of_a_connections_gate_is_finished_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    path = tmp_path / "release.sqlite3"
    _engine(path).dispose()
    conn = sqlite3.connect(path, timeout=30, factory=GatedConnection)
    gate = conn._gate
    release = gate.release

    def interrupted(*args: object) -> None:
        monkeypatch.undo()  # once
        if when == "as it returns":
            release(*args)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    try:
        conn.execute("UPDATE counter SET n = n + 1 WHERE id = 1")
        monkeypatch.setattr(gate, "release", interrupted)
        with pytest.raises(KeyboardInterrupt):
            conn.commit()
        if when == "as it begins":
            conn.close()  # the connection still holds the gate: its close gives it back
            _assert_free(gate)
        else:  # released: the gate is another writer's now, and stays so
            assert _in_thread(lambda: gate.acquire(0)) == [True]
            conn.close()
            assert _in_thread(lambda: gate.acquire(0)) == [False]
            gate.release()
            _assert_free(gate)
    finally:
        conn.close()


@pytest.mark.filterwarnings("ignore:.*fork:DeprecationWarning")  # fork with threads, 3.12+
def test_a_forked_child_closes_the_pipe_of_a_turn_not_queued_yet() -> None:
    turn = sqlite_writes.Turn()  # a writer's, made outside the gate's mutex, not queued yet
    try:
        assert _in_a_forked_child(_closed_here(turn))
    finally:
        turn.close()


def _flock_waiters() -> int:
    return sum(thread.name == "sqlite-writers-flock" for thread in threading.enumerate())


def test_an_interrupt_as_the_flock_waiter_starts_leaves_one_waiter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker, lock = _blocked(str(tmp_path / "started.sqlite3-writers"))
    start, waiters = threading.Thread.start, _flock_waiters()

    def interrupted(self: threading.Thread) -> None:
        start(self)
        raise KeyboardInterrupt  # Ctrl-C as the waiter thread runs, before it was noted

    monkeypatch.setattr(threading.Thread, "start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lock.acquire(30)
    monkeypatch.undo()
    assert lock._waiter is not None and lock._waiter.is_alive()
    assert lock.acquire(0) is False  # its request goes to that waiter: no second one
    assert _flock_waiters() == waiters + 1
    blocker.release()
    assert lock.acquire(30) is True
    lock.close()
    blocker.close()


def test_a_file_system_without_locks_leaves_the_writer_to_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = gate_for(str(tmp_path / "nolocks.sqlite3"))
    assert gate.files is not None

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))  # e.g. NFS without a lock daemon

    _flock_by(monkeypatch, no_locks)
    assert gate.acquire(30) is True  # the gate, not the file lock: SQLite decides
    assert not gate.files.held
    gate.release()  # lets go of no file lock it does not hold: nothing to fail
    monkeypatch.undo()
    _assert_free(gate)


def _next_idle(monkeypatch: pytest.MonkeyPatch, lock: FileLock) -> threading.Event:
    """An event set when the flock waiter of `lock`, its request pending now, has answered it
    and waits for the next one."""
    assert lock._signals is not None and lock._pending
    request, idle = lock._signals[0], threading.Event()
    wait = request.wait

    def next_wait(timeout: float | None) -> bool:
        if not lock._pending:
            idle.set()
        return wait(timeout)

    monkeypatch.setattr(request, "wait", next_wait)
    return idle


def test_an_interrupt_before_the_flock_answer_is_awaited_leaves_the_lock_to_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "unawaited.sqlite3-writers")
    blocker, lock = _with_idle_waiter(path)

    def interrupted(deadline: float, timeout: float) -> bool:
        raise KeyboardInterrupt  # Ctrl-C after the request went out, before its answer is awaited

    monkeypatch.setattr(lock, "_await_waiter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lock.acquire(30)
    idle = _next_idle(monkeypatch, lock)
    blocker.release()  # the waiter takes the lock: for nobody, so it gives it back
    assert idle.wait(30)
    assert _flock_free(path)  # not held by a waiter answering a caller that is gone
    monkeypatch.undo()
    lock.close()
    blocker.close()


def test_an_answer_left_for_a_caller_that_is_gone_is_not_taken_by_a_later_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "stale-answer.sqlite3-writers")
    blocker, lock = _with_idle_waiter(path)
    assert lock.acquire(0) is False  # the waiter now blocks in flock for a request
    with lock._mutex:
        lock._wanted = True  # a caller that waited for the answer, gone without a word
    idle = _next_idle(monkeypatch, lock)
    blocker.release()
    assert idle.wait(30)  # the lock taken and handed to that caller: nobody
    assert lock.acquire(0) is True  # the next writer takes it through the same descriptor
    lock.release()
    assert _flock_free(path)
    assert blocker.acquire(0) is True
    # Held by another again: the old answer must not pass for this writer's.
    assert lock.acquire(0) is False
    blocker.release()
    monkeypatch.undo()
    lock.close()
    blocker.close()


class _Mutex:
    """A gate's mutex whose next entry, once armed, is interrupted (Ctrl-C)."""

    def __init__(self, mutex: Any) -> None:
        self.mutex, self.armed = mutex, False

    def __enter__(self) -> None:
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        self.mutex.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.mutex.__exit__(*exc)


def test_a_second_interrupt_as_an_interrupted_acquire_gives_the_gate_back_is_survived(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _gated_connection(tmp_path / "give-up.sqlite3") as conn:
        gate = conn._gate
        assert gate.files is not None
        mutex = _Mutex(gate._mutex)

        def interrupted(timeout: float) -> bool:
            mutex.armed = True  # the second Ctrl-C comes as the gate is handed on
            raise KeyboardInterrupt  # the first, as the file lock is awaited

        monkeypatch.setattr(gate, "_mutex", mutex)
        monkeypatch.setattr(gate.files, "acquire", interrupted)
        _write_interrupted(conn, monkeypatch)
        assert not mutex.armed  # the second interrupt came


def test_the_gate_keeps_no_reference_to_the_connection_holding_it(tmp_path: Path) -> None:
    with _gated_connection(tmp_path / "referents.sqlite3") as conn:
        conn.execute("UPDATE counter SET n = n + 1 WHERE id = 1")
        gate = conn._gate
        assert gate.owner_thread == threading.get_ident()  # held for this connection
        fields = vars(gate)
        assert not any(ref is gate or ref is fields for ref in gc.get_referrers(conn))
        conn.rollback()
        _assert_free(gate)


class _InterruptedBeforePop(_Queue):
    """A queue whose next popleft is interrupted (Ctrl-C) before it took the waiter out."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupt = True

    def popleft(self) -> Any:
        if self.interrupt:
            self.interrupt = False
            raise KeyboardInterrupt
        return super().popleft()


def test_a_waiter_handed_the_gate_by_a_cut_short_release_leaves_the_queue(
    tmp_path: Path,
) -> None:
    gate = gate_for(str(tmp_path / "unpopped.sqlite3"))
    queue = _InterruptedBeforePop()
    gate._waiters = queue
    assert gate.acquire(30) is True
    answers: list[bool] = []
    writer = threading.Thread(target=lambda: answers.append(gate.acquire(30)))
    writer.start()
    queue.reach(1)
    with pytest.raises(KeyboardInterrupt):
        gate.release()  # granted and woken, but not taken out of the queue
    writer.join(30)
    assert answers == [True]
    assert len(queue) == 0  # no later release hands the gate to its closed pipe
    gate.release()
    _assert_free(gate)

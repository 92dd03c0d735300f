"""One writer at a time per SQLite file within a process, queued on a lock instead of polled.

SQLite has a single write lock per database file. When it is taken, other connections retry
through SQLite's busy handler, which *sleeps* between attempts (1, 2, 5, … up to 100 ms) and
serves nobody in order: under a few dozen request threads a waiter can lose again and again,
which is where the broker's multi-second p99 on SQLite came from. Threads of one process
therefore queue on an in-process lock first (woken the moment the writer finishes), and the
one thread that holds it then takes an exclusive `flock` on a file beside the database
(`<database>-writers`), so that the writers of *different* processes (gunicorn's web
processes, the worker, a `flask` command) queue in the kernel too instead of meeting in
SQLite's busy handler. The kernel drops a flock when its holder dies, however it dies.

Both waits end after the connection's busy timeout: a writer that cannot have the gate (say,
an open `flask shell` that never commits holds the file lock) goes on without it and SQLite's
own busy handling decides, as it would with no gate at all.

`gate_sqlite_writes(engine)` makes an engine's connections `GatedConnection`s: the gate is
taken before a connection's first data-changing statement and released when its transaction
ends (commit, rollback, close, or a statement that ended it).

Checkpoints run outside the gate. By default the commit that makes the write-ahead log pass
1000 pages copies the log back into the database file and syncs it, a few to tens of
milliseconds, all of it inside `commit()` and so with the gate still held: every queued writer
of the process waited for it. Gated connections run a passive one (it never waits for, nor
blocks, readers or writers) every CHECKPOINT_EVERY commits of the process, after the gate was
let go; SQLite's own stays only as a backstop far above that (BACKSTOP_PAGES), for writes made
outside a transaction, which are not counted.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import select
import sqlite3
import threading
import time
import weakref
from collections import deque
from typing import Any

import sqlalchemy as sa

log = logging.getLogger("broker.sqlite_writes")

_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")
# A create's write transaction adds a few pages to the log: this keeps it near SQLite's default
# size (1000 pages) between two checkpoints.
CHECKPOINT_EVERY = 200
# SQLite checkpoints inside a commit once the log holds this many pages (about 40 MB).
BACKSTOP_PAGES = 10_000
# The longest wait one poll takes, in milliseconds (a C int: about 24.8 days).
MAX_POLL_MS = 2**31 - 1


class Wakeup:
    """A one-shot signal between two threads whose `set` never wakes anyone while holding the GIL.

    A `threading.Lock` or `Event` wakes its waiter from inside `release`/`set` with the GIL
    held. On a busy machine the kernel often runs the woken thread at once on the releaser's
    CPU (wake-up preemption); it then waits for the GIL that the now descheduled releaser still
    holds, and the whole process stands still until the scheduler comes back to the releaser.
    Measured under 32 clients, a third of the gate's hand-offs were preempted so and cost
    5.5 ms each: 1.75 ms per hand-off on average, a quarter of a web process's time. `os.write`
    and `select.poll` let go of the GIL around their system calls, so here the woken thread
    finds the GIL free.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()

    def set(self) -> None:
        """Wake the waiter (or let its next `wait` return at once)."""
        os.write(self._write, b"\0")

    def wait(self, timeout: float | None) -> bool:
        """Wait up to `timeout` seconds (None: for ever) for `set`; True when it came."""
        poll = select.poll()
        poll.register(self._read, select.POLLIN)
        wait = None
        if timeout is not None:
            # poll takes a C int of milliseconds: a longer wait (weeks, for ever) is capped.
            wait = (
                MAX_POLL_MS if timeout * 1000 >= MAX_POLL_MS else math.ceil(max(0, timeout) * 1000)
            )
        if not poll.poll(wait):
            return False
        os.read(self._read, 1)
        return True

    def close(self) -> None:
        """Close both ends of the pipe (again: nothing; each end is forgotten as it closes)."""
        read, write, self._read, self._write = self._read, self._write, -1, -1
        try:
            if read >= 0:
                os.close(read)
        finally:
            if write >= 0:
                os.close(write)


class Turn(Wakeup):
    """A waiter's place in the gate's queue: `granted` is the hand-off, the pipe only wakes it.

    The gate sets `granted` and writes the wake-up byte together under its mutex, so a waiter
    whose wait ended some other way (a timeout, Ctrl-C) learns from `granted`, under the same
    mutex, whether the gate is its own, and never waits for a byte it may already have read.
    """

    def __init__(self) -> None:
        super().__init__()
        self.granted = False
        _turns.add(self)  # only when a writer must queue: an uncontended write makes no turn


# Every turn not yet collected, queued or not (one is made outside the gate's mutex): a forked
# child closes its copies of their pipes, which belong to the parent's threads.
_turns: weakref.WeakSet[Turn] = weakref.WeakSet()


def _signal_pair() -> tuple[Wakeup, Wakeup]:
    """Open a FileLock's request and answer pipes, none left open when the second fails."""
    first = Wakeup()
    try:
        return first, Wakeup()
    except BaseException:
        first.close()
        raise


class FileLock:
    """An exclusive flock on one file, shared by the writers of every process of the host."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.held = False
        self._pid = -1  # the process the descriptor and waiter below belong to
        self._fd = -1
        self._signals: tuple[Wakeup, Wakeup] | None = None

    def _reset(self) -> None:
        # A forked child's inherited descriptors are the parent's open file descriptions (the
        # flock is the parent's, the pipes its threads'): it opens its own (and has none of the
        # parent's threads).
        self._close_descriptors()
        self._pid = os.getpid()
        self.held = False
        self._mutex = threading.Lock()  # orders the waiter's result with a caller's timeout
        self._given = False  # the waiter took the lock for the caller waiting for its answer
        self._pending = False  # the waiter is (about to be) blocked in flock
        self._wanted = False  # a caller is waiting for the waiter's result
        # A caller went on without the lock since it was last taken. Read and written without
        # the mutex: two writers that race may both log the same episode; nothing else differs.
        self._stuck = False
        self._waiter: threading.Thread | None = None
        self._closing = False  # the waiter thread ends at its next request
        # Read-only is enough to flock, so a user who may only read the database can still
        # queue; the file holds nothing.
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as exc:  # e.g. a directory this user may not write in
            log.warning("SQLite writers' lock %s not opened, not taken: %s", self.path, exc)

    def acquire(self, timeout: float) -> bool:
        """Take the lock within `timeout` seconds; False when the caller must go on without it."""
        if self._pid != os.getpid():
            self._reset()
        if self._fd < 0:  # SQLite's busy handler decides, as it would with no file lock
            return False
        # One handler from the request to its answer (e.g. Ctrl-C wherever it comes, even
        # between the two): a lock the waiter took for this caller is given back, never left
        # held for nobody by a waiter that still thinks it is wanted.
        try:
            with self._mutex:
                if not self._pending:
                    # Held before it is taken: an interrupt as the flock returns leaves it to the
                    # gate's release (which lets go of a lock not taken harmlessly), not to nobody.
                    self.held = True
                    try:
                        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError as exc:
                        self.held = False  # not taken: only an interrupt leaves it to the release
                        if not isinstance(exc, BlockingIOError):
                            raise  # e.g. no locks on this file system: SQLite decides
                        # Held by another process. A blocking flock cannot time out in a thread
                        # that is not the main one, so a waiter thread blocks in the kernel while
                        # the caller waits for its answer with a timeout.
                        if self._signals is None:  # the first wait of this process
                            self._signals = _signal_pair()
                        if self._waiter is None:
                            waiter = threading.Thread(
                                target=self._wait, name="sqlite-writers-flock", daemon=True
                            )
                            # Noted before it runs: one started by a start cut short (Ctrl-C)
                            # stays the only one, never doubled by the next caller's.
                            self._waiter = waiter
                            try:
                                waiter.start()
                            except BaseException as exc:
                                if not waiter.is_alive():  # never ran: the next caller starts one
                                    self._waiter = None
                                if not isinstance(exc, RuntimeError):
                                    raise
                                self.not_taken(exc)  # no thread to be had: as without pipes
                                return False
                        # Pending only once a waiter will see the request: a flag left set with
                        # none (no thread, or an interrupt before the byte went out) would send
                        # every later writer to wait for an answer that never comes. A byte that
                        # went out all the same is skipped by the waiter, which finds none pending.
                        self._pending = True
                        try:
                            self._signals[0].set()
                        except BaseException:
                            self._pending = False
                            raise
                    else:
                        # Nothing pending, so an answer not taken is for a caller that is gone: a
                        # later caller must not take it for a lock it holds.
                        self._given = False
                        return self._taken()
                # A waiter left blocked by a caller that timed out is reused, never doubled.
                self._wanted = True
            return self._await_waiter(time.monotonic() + timeout, timeout)
        except BaseException:
            with self._mutex:
                self._wanted = False
                if self._given:
                    self._given = self.held = False
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
            raise

    def _await_waiter(self, deadline: float, timeout: float) -> bool:
        # `_given`, under the mutex, says whether the lock is the caller's; the answer's byte
        # only wakes it (one left unread by an interrupted or timed-out caller wakes the next
        # caller early, which then finds `_given` false and waits on).
        signals = self._signals
        assert signals is not None
        while True:
            signals[1].wait(deadline - time.monotonic())
            with self._mutex:
                if self._given:
                    # Held before no longer given: an interrupt between the two leaves the
                    # lock to `acquire`'s handler, or to the gate's release, never to nobody.
                    self.held = True
                    self._given = False
                    return self._taken()
                if time.monotonic() >= deadline:
                    self._wanted = False  # the waiter gives the lock back when it gets it
                    self.not_taken(f"held by another process for {timeout:.0f}s")
                    return False

    def _taken(self) -> bool:
        self.held = True
        if self._stuck:
            self._stuck = False
            log.info("SQLite writers' lock %s taken again", self.path)
        return True

    def not_taken(self, reason: object) -> None:
        """Note a writer going on without the lock: logged once until it is taken again."""
        # A holder that never lets go would otherwise make one warning per write.
        if not self._stuck:
            self._stuck = True
            log.warning(
                "SQLite writers' lock %s not taken (%s); writers go on without it until it is",
                self.path,
                reason,
            )

    def _wait(self) -> None:
        # Only the thread holding the in-process gate ever asks, so one waiter per process.
        signals = self._signals
        assert signals is not None
        while True:
            signals[0].wait(None)
            if self._closing:
                return
            with self._mutex:
                # A byte left by an interrupted request, or one whose flock this thread already
                # answered: a flock now could take the lock a caller holds through the same
                # descriptor, and the unlock of an unwanted answer would let it go under it.
                if not self._pending:
                    continue
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except OSError as exc:  # the caller times out and goes on without the lock
                with self._mutex:
                    self._pending = False
                    self.not_taken(exc)
                continue
            with self._mutex:
                self._pending = False
                if self._wanted:
                    self._wanted = False
                    self._given = True
                    signals[1].set()
                else:  # its caller gave up: nobody in this process may keep others waiting
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def release(self) -> None:
        """Let the writers of other processes in."""
        if self.held and self._pid == os.getpid():
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self.held = False

    def close(self) -> None:
        """End the waiter thread and close the descriptors; waits while its flock is pending."""
        if self._pid != os.getpid():
            return  # nothing opened in this process
        if self._waiter is not None and self._signals is not None:
            self._closing = True
            self._signals[0].set()
            self._waiter.join()
        self.release()
        self._close_descriptors()
        self._pid = -1  # a later acquire opens everything again

    def _close_descriptors(self) -> None:
        # Each is forgotten before it is closed: a failure never leaves one to be closed twice.
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        if self._signals is not None:
            signals, self._signals = self._signals, None
            for signal in signals:
                signal.close()


class WriteGate:
    """A lock that knows its holder, so a thread never waits for a transaction of its own.

    It is handed from one writer straight to the next in the order they came, each waiter
    woken through a `Wakeup` of its own, so that no hand-off wakes a thread with the GIL held
    and no woken thread finds the gate already taken by one that came later.
    """

    def __init__(self, database: str = "") -> None:
        # Only a file has a name that other processes can share; `:memory:`, a temporary
        # database ("") and `file:` URIs are one process's alone or not a plain path.
        self.files = (
            FileLock(database + "-writers")
            if database and database != ":memory:" and not database.startswith("file:")
            else None
        )
        self._commits = 0
        self._reset()

    def _reset(self) -> None:
        # Also in a forked child, where the holder and the waiters were the parent's threads.
        # The mutex is held only to read and change the fields below. Re-entrant: a garbage
        # collection while a waiter holds it (Python 3.12+ runs one at any call, not only at an
        # allocation) may run the clean-up of a leaked connection that holds the gate, whose
        # `release` takes this mutex again on the same thread; each section is correct with a
        # whole release run inside it (`_leave` finds its turn granted and popped).
        self._mutex = threading.RLock()
        # Who holds the gate (None: nobody): the `holder` its `acquire` was given, or the turn
        # it was handed to until that caller notes itself. One store changes it, so a holder's
        # `release` cut short by an interrupt can be run again: it is finished, or, once the
        # gate went on, does nothing.
        self._holder: object = None
        self._waiters: deque[Turn] = deque()
        self.owner_thread: int | None = None
        # Set while pipes cannot be opened (EMFILE): logged once per episode. Unlocked: two
        # writers that race may both log it.
        self._no_pipes = False

    def acquire(self, timeout: float, holder: object = True) -> bool:
        """Wait up to `timeout` seconds; False when the caller must go on without the gate."""
        if self.owner_thread == threading.get_ident():
            # This thread already writes through another connection: waiting here would
            # deadlock; SQLite's own busy handling decides, as it would without the gate.
            return False
        deadline = time.monotonic() + timeout
        turn: Turn | None = None
        taken = False  # the gate is this caller's: taken free, or handed to its turn
        # One handler over all of it (e.g. Ctrl-C in a command's main thread, wherever it
        # comes): a gate taken or handed over is given back, and a turn closed only once it
        # is out of the queue, so no release writes to its closed pipe.
        try:
            queued = False
            while not (queued or taken):
                with self._mutex:
                    if self._holder is None:
                        self._holder, taken = holder, True
                    elif turn is not None:
                        self._waiters.append(turn)
                        queued = True
                if not (queued or taken):
                    if timeout <= 0:  # no wait: no pipe either
                        return self._not_free(timeout)
                    turn = self._new_turn()  # outside the mutex, then look again
                    if turn is None:
                        return False
            if turn is not None:
                if queued:
                    taken = self._wait_for(turn, deadline)  # out of the queue either way
                    if taken:
                        with self._mutex:
                            self._holder = holder
                            # Popped by the release that granted it, unless an interrupt cut
                            # that release short: a turn left queued would be handed the gate
                            # again, through the pipe closed below.
                            if turn in self._waiters:
                                self._waiters.remove(turn)
                turn.close()  # also one made for a gate that was free by then
            if not taken:
                return self._not_free(timeout)
            self.owner_thread = threading.get_ident()
            if self.files is not None:
                try:
                    self.files.acquire(max(0.0, deadline - time.monotonic()))
                except OSError as exc:  # e.g. no locks on this file system: SQLite decides
                    self.files.not_taken(exc)
            return True
        except BaseException:
            self._give_up(turn, taken, holder)
            raise

    def _give_up(self, turn: Turn | None, taken: bool, holder: object) -> None:
        # An acquire cut short: its turn out of the queue (a second interrupt meanwhile waits
        # until that is done: a turn left queued would be handed the gate with nobody to use
        # it), the gate given back if it was this caller's, the turn's pipe closed.
        later: BaseException | None = None
        while turn is not None:
            try:
                taken = self._leave(turn) or taken
                break
            except BaseException as exc:  # _leave again: it only removes what is still there
                later = exc
        try:
            # The next writer must not wait for a gate nobody holds. Released as its holder (or
            # as the turn it was handed to, before the caller noted itself), so that a release
            # cut short by a second interrupt is run again, and one that went through is not.
            while taken:
                try:
                    self.release(turn if turn is not None and self._holder is turn else holder)
                    break
                except BaseException as exc:
                    later = exc
        finally:
            if turn is not None:
                turn.close()
        if later is not None:
            raise later

    def _not_free(self, timeout: float) -> bool:
        log.warning("SQLite write gate not free after %.0fs; going on without it", timeout)
        return False

    def _new_turn(self) -> Turn | None:
        try:
            turn = Turn()
        except OSError as exc:  # e.g. EMFILE: SQLite's busy handler decides, as on a timeout
            if not self._no_pipes:
                self._no_pipes = True
                log.warning("SQLite write gate cannot queue (%s); writers go on without it", exc)
            return None
        self._no_pipes = False
        return turn

    def _wait_for(self, turn: Turn, deadline: float) -> bool:
        # True when the gate is the caller's. A wait that returned True read the byte that
        # `release` writes after granting; a timeout is decided by `granted`, read under the
        # mutex (so is an interrupt, by `acquire`, which may come after the byte was read).
        return turn.wait(deadline - time.monotonic()) or self._leave(turn)

    def _leave(self, turn: Turn) -> bool:
        # True when the gate was handed to `turn`; otherwise `turn` is out of the queue.
        with self._mutex:
            if not turn.granted:
                with contextlib.suppress(ValueError):  # popped by a release run inside this
                    self._waiters.remove(turn)
            return turn.granted

    def release(self, holder: object = None) -> None:
        """Hand the gate to the writer that has waited longest, or leave it free."""
        if holder is not None and self._holder is not holder:
            return  # released before (by a release cut short as it returned): maybe another's now
        self.owner_thread = None
        try:
            if self.files is not None:
                self.files.release()
        finally:
            with self._mutex:
                if not self._waiters:
                    self._holder = None
                else:
                    # Granted before it leaves the queue and woken under the mutex, so that a
                    # waiter whose wait ends otherwise finds it granted only once its pipe was
                    # written to (it may close it then), and an interrupt between these lines
                    # cannot leave it out of the queue yet never granted nor woken.
                    turn = self._waiters[0]
                    turn.granted = True
                    try:
                        # After `granted`: a release run again before this line hands the gate
                        # to the same first turn again, which changes nothing.
                        self._holder = turn
                        self._waiters.popleft()
                    finally:
                        turn.set()

    def checkpoint_due(self) -> bool:
        """Count a commit; True on every CHECKPOINT_EVERY-th of the process."""
        # Under the GIL; a count lost to a race only moves one checkpoint by a commit.
        self._commits += 1
        return self._commits % CHECKPOINT_EVERY == 0


# Keyed by database path: SQLite's lock is per file, and every engine of the process (the
# app's, the budget's, another app's in tests) must queue on the same gate.
_gates: dict[str, WriteGate] = {}
_gates_lock = threading.Lock()


def gate_for(database: str) -> WriteGate:
    """Return the process's write gate of one database file."""
    with _gates_lock:
        if database not in _gates:
            _gates[database] = WriteGate(database)
        return _gates[database]


def _after_fork_in_child() -> None:
    # Only the forking thread lives on: a gate held or waited for by another is free here.
    global _gates_lock
    _gates_lock = threading.Lock()
    for turn in list(_turns):
        with contextlib.suppress(OSError):
            turn.close()
    for gate in _gates.values():
        gate._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _file_key(database: Any) -> str:
    """Name the file the same way whichever engine (relative or absolute path) opened it."""
    name: str | bytes = os.fspath(database)
    if isinstance(name, bytes):
        name = name.decode()
    if name in ("", ":memory:") or name.startswith("file:"):
        return name
    return os.path.realpath(name)


class GatedCursor(sqlite3.Cursor):
    """A cursor whose data-changing statements first take the connection's write gate."""

    connection: GatedConnection

    def execute(self, sql: str, parameters: Any = (), /) -> GatedCursor:
        """Run `sql`, taking the gate first when it writes."""
        self.connection._before(sql)
        try:
            return super().execute(sql, parameters)
        finally:
            self.connection._after()

    def executemany(self, sql: str, seq_of_parameters: Any, /) -> GatedCursor:
        """Run `sql` for each parameter set, taking the gate first when it writes."""
        self.connection._before(sql)
        try:
            return super().executemany(sql, seq_of_parameters)
        finally:
            self.connection._after()


class GatedConnection(sqlite3.Connection):
    """A sqlite3 connection that holds its file's write gate for the length of a write."""

    def __init__(self, database: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(database, *args, **kwargs)
        self._gate = gate_for(_file_key(database))
        self._holding = False
        # Who holds the gate when this connection does: not the connection itself, which the
        # gate would then keep alive (one object, made here, so a write makes none).
        self._token = object()
        # Wait on the gate as long as SQLite itself would wait for its lock.
        self._gate_timeout = float(kwargs.get("timeout", 5.0))
        # Checkpoints are run by `commit`, after the gate is let go. SQLite's own stays as a
        # backstop far above their interval: writes outside a transaction (autocommit, such as
        # the batch API's per-second rate) are not counted, and alone would grow the log.
        super().execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")

    def cursor(self, factory: Any = GatedCursor) -> Any:
        """Return a cursor that gates writes."""
        return super().cursor(factory)

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        """Run `sql` on a new gated cursor."""
        return self.cursor().execute(sql, parameters)

    def _before(self, sql: str) -> None:
        if not self._holding and sql.lstrip()[:7].upper().startswith(_WRITES):
            try:
                self._holding = self._gate.acquire(self._gate_timeout, self._token)
            except BaseException:
                # An interrupt as `acquire` returned, before `_holding` said so, or one that cut
                # short the release of `acquire`'s own handler: a gate still held for this
                # connection (known by its holder, whatever thread it names) is given back here.
                if not self._holding and self._gate._holder is self._token:
                    self._gate.release(self._token)
                raise

    def _after(self) -> None:
        # A failed first write, or SQL that ended the transaction itself, must not keep it.
        if self._holding and not self.in_transaction:
            self._release()

    def _release(self) -> None:
        # Not holding only once the release returned: one cut short (Ctrl-C) is run again by
        # the connection's next commit, rollback or close; the gate knows whether it is done.
        if self._holding:
            self._gate.release(self._token)
            self._holding = False

    def commit(self) -> None:
        """Commit, let the next writer in, then checkpoint when one is due."""
        wrote = self.in_transaction
        try:
            super().commit()
        finally:
            self._release()
        if wrote and self._gate.checkpoint_due():
            self.checkpoint()

    def checkpoint(self) -> None:
        """Copy what the log holds back into the database file, waiting for nobody."""
        try:
            super().execute("PRAGMA wal_checkpoint(PASSIVE)").close()
        except sqlite3.Error as exc:  # the commit stands; the next checkpoint due tries again
            log.warning("SQLite checkpoint failed: %s", exc)

    def rollback(self) -> None:
        """Roll back, then let the next writer in."""
        try:
            super().rollback()
        finally:
            self._release()

    def close(self) -> None:
        """Close, giving the gate back if a write was still open."""
        try:
            super().close()
        finally:
            self._release()


def gate_sqlite_writes(engine: sa.Engine) -> None:
    """Make every new connection of a SQLite `engine` queue its writes on the file's gate."""
    if engine.dialect.name != "sqlite":
        return

    @sa.event.listens_for(engine, "do_connect")
    def _gated(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        cparams.setdefault("factory", GatedConnection)

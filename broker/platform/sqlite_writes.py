"""One writer at a time per SQLite file within a process, queued on a lock instead of polled.

SQLite has a single write lock per database file. When it is taken, other connections retry
through SQLite's busy handler, which *sleeps* between attempts (1, 2, 5, … up to 100 ms) and
serves nobody in order: under a few dozen request threads a waiter can lose again and again,
which is where the broker's multi-second p99 on SQLite came from. Threads of one process
therefore queue on an in-process lock first (woken the moment the writer finishes); only
writers of *different* processes still meet in SQLite's busy handler.

`gate_sqlite_writes(engine)` makes an engine's connections `GatedConnection`s: the gate is
taken before a connection's first data-changing statement and released when its transaction
ends (commit, rollback, close, or a statement that ended it).

Checkpoints run outside the gate. By default the commit that makes the write-ahead log pass
1000 pages copies the log back into the database file and syncs it, a few to tens of
milliseconds, all of it inside `commit()` and so with the gate still held: every queued writer
of the process waited for it. Gated connections turn SQLite's automatic checkpoint off and run
a passive one (it never waits for, nor blocks, readers or writers) every CHECKPOINT_EVERY
commits of the process, after the gate was let go.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from typing import Any

import sqlalchemy as sa

log = logging.getLogger("broker.sqlite_writes")

_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")
# A create's write transaction adds a few pages to the log: this keeps it near SQLite's default
# size (1000 pages) between two checkpoints.
CHECKPOINT_EVERY = 200


class WriteGate:
    """A lock that knows its holder, so a thread never waits for a transaction of its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner_thread: int | None = None
        self._commits = 0

    def acquire(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds; False when the caller must go on without the gate."""
        if self.owner_thread == threading.get_ident():
            # This thread already writes through another connection: waiting here would
            # deadlock; SQLite's own busy handling decides, as it would without the gate.
            return False
        if not self._lock.acquire(timeout=timeout):
            log.warning("SQLite write gate not free after %.0fs; going on without it", timeout)
            return False
        self.owner_thread = threading.get_ident()
        return True

    def release(self) -> None:
        """Let the next writer in."""
        self.owner_thread = None
        self._lock.release()

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
        return _gates.setdefault(database, WriteGate())


def _file_key(database: Any) -> str:
    """Name the file the same way whichever engine (relative or absolute path) opened it."""
    name: str | bytes = os.fspath(database)
    if isinstance(name, bytes):
        name = name.decode()
    if name == ":memory:" or name.startswith("file:"):
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
        # Wait on the gate as long as SQLite itself would wait for its lock.
        self._gate_timeout = float(kwargs.get("timeout", 5.0))
        # Checkpoints are run by `commit`, after the gate is let go.
        super().execute("PRAGMA wal_autocheckpoint=0")

    def cursor(self, factory: Any = GatedCursor) -> Any:
        """Return a cursor that gates writes."""
        return super().cursor(factory)

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        """Run `sql` on a new gated cursor."""
        return self.cursor().execute(sql, parameters)

    def _before(self, sql: str) -> None:
        if not self._holding and sql.lstrip()[:7].upper().startswith(_WRITES):
            self._holding = self._gate.acquire(self._gate_timeout)

    def _after(self) -> None:
        # A failed first write, or SQL that ended the transaction itself, must not keep it.
        if self._holding and not self.in_transaction:
            self._release()

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self._gate.release()

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

"""One unit of work per unsafe API request: commit once the view returned, or undo it all.

Offers `run` (what `broker.api.spec.endpoint` wraps every POST/PUT/PATCH/DELETE view in),
`current` (the running request's `UnitOfWork`, for domain functions that take one) and
`UnitOfWork` itself, also usable on any session (the warm-up drives the create path with one).

Rules it enforces, the API's half of the transaction rule in `broker.platform.db`:
- views and domain functions never commit or roll back; the request's work commits once, after
  the view returned, and rolls back when the view (or the commit) failed;
- work that must be committed before the request goes on (a quota reservation held while
  Cloudflare answers, an `Idempotency-Key` claim) runs as a `step`: its own transaction,
  committed at its end, rolled back if it fails. A step never throws away what the request
  had pending: on SQLite, where a write must start from the latest snapshot, the request's
  transaction so far is ended first, committed with whatever it wrote (on PostgreSQL each
  statement reads the latest committed rows, so the transaction simply goes on, without a
  round trip to end it). A step's commits keep the objects the request loaded as they were
  (its user is not read again). Core work (the create's reservation) runs as a
  `step_on_connection` instead: on a connection of its own, committed there, without the ORM
  session's commit around a few statements; what the request had begun is ended first, and
  the connection goes back to the pool before the request goes on (none is held while
  Cloudflare answers). `step_in_one_round_trip` lets such work end with statements sent with
  the step's COMMIT in one round trip (PostgreSQL), so the locks they take are held while the
  server works, never while this process turns around; the COMMIT stays the unit of work's;
- the request's later Core writes (the create's row) run on `connection`: one of the unit of
  work's own, opened when first asked for and committed with the request, without an ORM
  transaction around it. The request's session (a `RequestSession`) is joined to it, should
  the request use the session too, so a request never writes on two connections at once (on
  SQLite the second would wait for the first one's write lock). An ORM `step` after such
  writes commits them first, on both databases; a session that had already begun keeps its
  own connection, and `connection` hands that out instead;
- work done outside the database (a draft made at Cloudflare) and steps already committed
  register their undo with `on_failure`; when the request fails they run newest first after
  the rollback, each in a transaction of its own, best effort: an undo that fails is logged
  and never masks the request's own error.

A `UnitOfWork` must be ended, by `commit` or `fail` (`run` does both), even when nothing was
written: until then the connection `connection` opened stays checked out of the pool.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from flask import g, has_app_context
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session

from broker.api.round_trips import commit_in_one_round_trip, run_in_transaction
from broker.platform import outages
from broker.platform.db import JOINED_CONNECTION, Finish, RequestSession, Session, db

log = logging.getLogger("broker.api")

T = TypeVar("T")


class UnitOfWork:
    """The transaction of one request (or of one run of the create path) on `session`."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._undos: list[Callable[[], None]] = []
        # The connection `connection` opened for the request's Core writes, committed with the
        # request: no ORM transaction around them.
        self._conn: sa.Connection | None = None

    def step(self, work: Callable[[], T]) -> T:
        """Run `work` as a transaction of its own, committed before this returns."""
        session = self.session
        if self._conn is not None:
            self._leave_own_connection()
        elif session.get_bind().dialect.name == "sqlite":
            # Start from the latest snapshot: end the transaction so far, keeping its writes
            # (with only reads, the authentication's, that commit writes nothing).
            _commit_keeping_objects(session)
        try:
            result = work()
        except BaseException:
            session.rollback()
            raise
        _commit_keeping_objects(session)
        return result

    def step_on_connection(self, work: Callable[[sa.Connection], T]) -> T:
        """Run Core `work` on a connection of its own, committed before this returns (`work`
        returns plain values: they are read before the request goes on)."""
        return self.step_in_one_round_trip(lambda conn, _finish: work(conn))

    def step_in_one_round_trip(self, work: Callable[[sa.Connection, Finish], T]) -> T:
        """Run Core `work` as `step_on_connection` does, where `work` may end the step's
        transaction by `finish(statements)`: they and the COMMIT go in one round trip
        (`broker.api.round_trips`), their rows are returned. What `work` runs after that
        is a transaction of its own, committed before this returns too (rolled back when `work`
        raises: what `finish` committed stays)."""
        session = self.session
        if self._conn is not None:
            self._leave_own_connection()
        engine = session.get_bind()
        if not isinstance(engine, sa.Engine):
            # Bound to a caller's connection (the warm-up's, in a transaction it rolls back):
            # the step stays inside it, so `finish` runs the statements without committing.
            return self.step(
                lambda: work(
                    session.connection(),
                    functools.partial(run_in_transaction, session.connection()),
                )
            )
        # What the request began is ended first, keeping its writes, as `step` does: the step
        # then starts from the latest snapshot and never waits for the request's locks.
        self._end_transaction()
        # Engine-level, not through the ORM session: the session's commit (flush check, state
        # bookkeeping, a new session transaction after it) cost more than the step's statements.
        # The connection goes back at the end: the caller may talk to Cloudflare next, and a
        # connection held meanwhile would starve the pool (and fail should the database restart).
        conn = engine.connect()
        try:
            result = work(conn, functools.partial(commit_in_one_round_trip, conn))
            conn.commit()
        finally:
            _give_back(conn)  # a failure: rolled back
        outages.note_commit()  # not through the session: its commit hook does not see it
        return result

    def connection(self) -> sa.Connection:
        """Return the connection for the request's Core writes, committed with the unit of work:
        one of its own (the session joins it), or the session's when that already began."""
        if self._conn is not None:
            return self._conn
        own = _own(self.session)
        engine = own.get_bind()
        if not isinstance(own, RequestSession) or not isinstance(engine, sa.Engine):
            # Only a RequestSession can be joined to it (a plain session writing on a second
            # connection would wait for this one's SQLite write lock); a caller's connection
            # (the warm-up's) stays the one.
            return own.connection()
        if own.in_transaction():
            return own.connection()  # its transaction goes on: the writes join it
        conn = self._conn = engine.connect()
        own.info[JOINED_CONNECTION] = conn
        return conn

    def on_failure(self, undo: Callable[[], None]) -> None:
        """Register how to undo work done so far should the unit of work fail."""
        self._undos.append(undo)

    def commit(self) -> None:
        """Commit the work; on failure roll back, run the undos, and re-raise."""
        try:
            own = _own(self.session)
            if self._conn is None or own.in_transaction() or _has_changes(own):
                own.commit()
            self._end_transaction(session=False)
        except BaseException:
            self.fail()
            raise
        self._undos.clear()
        self._release()

    def fail(self) -> None:
        """Roll the work back and run the undos, newest first, each committed on its own.

        The undos run even when the rollback failed (the database went away): a draft made at
        Cloudflare is still deleted. The rollback's error is raised after them."""
        try:
            try:
                self.session.rollback()
            finally:
                self._release()  # even when the rollback failed
        finally:
            self._undo()

    def _undo(self) -> None:
        """Run the undos, newest first, best effort: one that fails is logged, never raised."""
        while self._undos:
            undo = self._undos.pop()
            try:
                undo()
                self.session.commit()
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
                # The database is away (the request failed for it too): one line, no trace.
                _rollback_quietly(self.session)
                log.warning(
                    "could not undo part of a failed request: database unavailable (%s)",
                    type(getattr(exc, "orig", exc)).__name__,
                )
            except Exception:  # best effort: never mask the request's own error
                _rollback_quietly(self.session)
                log.warning("could not undo part of a failed request", exc_info=True)

    def _end_transaction(self, *, session: bool = True) -> None:
        """Commit what the request began so far: the session's transaction (keeping its
        objects), then what is left open on the request's own connection."""
        if session and _in_transaction(self.session):
            # Joined to the request's connection when it has one, the session controls that
            # connection's transaction ("control_fully"): its commit is the real COMMIT.
            _commit_keeping_objects(self.session)
        conn = self._conn
        if conn is not None and conn.in_transaction():
            conn.commit()
            outages.note_commit()

    def _leave_own_connection(self) -> None:
        """Commit the request's Core writes (and the session's, joined to them), give their
        connection back and take the session off it: a step then runs on its own."""
        self._end_transaction()
        self._release()

    def _release(self) -> None:
        """Give the request's own connection back (rolling back what it left open) and take
        the session off it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            _own(self.session).info.pop(JOINED_CONNECTION, None)
            _give_back(conn)


def _give_back(conn: sa.Connection) -> None:
    """Close `conn`, rolling back what it left open, even after a failed COMMIT: SQLAlchemy
    then counts the transaction as ended and skips the pool's reset, so the connection would
    go back still in it (on SQLite, holding the write lock)."""
    try:
        conn.rollback()
    finally:
        conn.close()


def _rollback_quietly(session: Session) -> None:
    """Roll `session` back after a failed undo; a rollback failing too (the database is away)
    leaves the next undo to run all the same."""
    try:
        session.rollback()
    except Exception:
        log.debug("rollback after a failed undo failed too", exc_info=True)


def _own(session: Session) -> OrmSession:
    """The Session itself behind `session` (the request's, for the scoped proxy)."""
    return session() if isinstance(session, scoped_session) else session


def _in_transaction(session: Session) -> bool:
    """Tell whether `session` has begun a transaction."""
    return _own(session).in_transaction()


def _has_changes(own: OrmSession) -> bool:
    """Tell whether `own` holds changes a commit would write (an object changed after the
    transaction that loaded it ended has none to flush them in yet), counting the request's
    kept token and user that wait outside it until it begins (`broker.auth.tokens`)."""
    if own.new or own.deleted or own.identity_map.check_modified():
        return True
    token = g.get("_detached_token") if has_app_context() else None
    if token is None:
        return False
    user = token.__dict__.get("user")  # loaded with the token: no lazy load here
    return any(sa.inspect(row).modified for row in (token, user) if row is not None)


def _commit_keeping_objects(session: Session) -> None:
    """Commit without expiring the objects the request loaded (its user): the request goes on
    with them as they were, as it would had the step not committed, instead of reloading each
    on its next touch (a round trip for nothing)."""
    own = _own(session)
    expire, own.expire_on_commit = own.expire_on_commit, False
    try:
        own.commit()
    finally:
        own.expire_on_commit = expire


def current() -> UnitOfWork:
    """The unit of work of the running request (one is made when the view has none)."""
    work: UnitOfWork | None = g.get("unit_of_work")
    if work is None:
        work = g.unit_of_work = UnitOfWork(db.session)
    return work


def run(view: Callable[[], Any]) -> Any:
    """Run `view` as the request's unit of work: commit after it, or roll back and undo."""
    work = current()
    try:
        result = view()
        work.commit()
    except BaseException:
        work.fail()
        raise
    finally:
        g.pop("unit_of_work", None)
    return result

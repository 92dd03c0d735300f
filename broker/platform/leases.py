"""Leased work: the one unit that asks the outside world about database rows, and commits.

Verifying an upload with Cloudflare, expiring it, deleting its draft, delivering a webhook: each
needs an answer from outside the database between two transactions, and no transaction (nor row
lock, nor SQLite's write lock) may stay open while Cloudflare or a receiver takes its time. Every
such job goes through the same steps, written here once:

1. `claim` due rows under a lease for one `holder` (committed: a lease is worth something only
   once other workers see it). PostgreSQL: `SELECT … FOR UPDATE SKIP LOCKED`, then stamp the
   lease, in one transaction, so two workers never wait on or take the same row. SQLite (one
   writer at a time): pick candidates, then take them with a compare-and-set UPDATE that only
   succeeds while a row is still unleased. A lease that runs out (its worker was killed) makes
   the row claimable again.
2. For each claimed row (`work_through`, with a `Job` saying what to do): `read` what the outside
   call needs, and end the transaction;
3. `ask` the outside world, with no transaction open;
4. read the row again and check the lease is still ours (if it ran out and another worker took
   the row, their answer counts: ours is dropped);
5. `record` the answer and commit: one transaction per row, in which an upload's new state and
   its outgoing webhook event are written together (so `broker.uploads.completion` makes an
   upload `ready` here, in the transaction of step 5, never part-way).

When the outside world says not now (`ask` raises `Postpone`), this row and the rest are given
back with a later due time (the job's `back_off`, committed) and the walk stops. A row whose work
fails otherwise is rolled back, logged and backed off alone; the others go on. Recording a row
gives back its lease (`release` on a row, `released` in a bulk UPDATE: the one place a lease is
cleared); so does a worker told to stop (`give_back`). A question asked once for many rows (a
listing) uses `ask_for_all` and `record_all` around the same per-row walk.

This module, views, CLI commands and the worker loop are the only places that commit (the
transaction rule in `broker.platform.db`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar, cast

import sqlalchemy as sa

from broker.platform.db import Session, in_chunks

log = logging.getLogger("broker.leases")

Q = TypeVar("Q")
A = TypeVar("A")
T = TypeVar("T")


class Postpone(Exception):
    """The outside world said not now: try again in `seconds` (raised by a job's `ask`)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


def claimable(model: Any, now: datetime) -> sa.ColumnElement[bool]:
    """Return the condition 'no live lease' for rows of `model`."""
    return sa.or_(model.lease_until.is_(None), model.lease_until <= now)


def release(row: Any) -> None:
    """Give back the lease on `row`, in the caller's transaction."""
    row.lease_holder = None
    row.lease_until = None


def released(model: Any) -> dict[Any, None]:
    """Return the values of an UPDATE that gives back the leases on rows of `model`."""
    return {model.lease_holder: None, model.lease_until: None}


def backing_off(
    session: Session, model: Any, due: Any, holder: str, now: datetime
) -> Callable[[Sequence[Any], float], None]:
    """Return how `holder` gives back rows of `model` the outside world said not now for: the
    column `due` is set `seconds` (at least one) after `now`, in the caller's transaction."""

    def back_off(ids: Sequence[Any], seconds: float) -> None:
        later = now + timedelta(seconds=max(1.0, seconds))
        for chunk in in_chunks(ids):
            session.execute(
                sa.update(model)
                .where(model.id.in_(chunk), model.lease_holder == holder)
                .values({due: later, **released(model)})
                .execution_options(synchronize_session=False)
            )

    return back_off


def claim(
    session: Session,
    model: Any,
    *,
    where: Sequence[sa.ColumnElement[bool]],
    order_by: Sequence[Any],
    limit: int,
    holder: str,
    now: datetime,
    lease_seconds: float,
) -> list[Any]:
    """Lease up to `limit` rows matching `where` to `holder`; commit and return their ids."""
    cond = sa.and_(*where, claimable(model, now))
    stamp = {model.lease_holder: holder, model.lease_until: now + timedelta(seconds=lease_seconds)}
    if session.get_bind().dialect.name == "postgresql":
        ids = list(
            session.scalars(
                sa.select(model.id)
                .where(cond)
                .order_by(*order_by)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        if ids:
            session.execute(
                sa.update(model)
                .where(model.id.in_(ids))
                .values(stamp)
                .execution_options(synchronize_session=False)
            )
        session.commit()
        return ids
    candidates = list(
        session.scalars(sa.select(model.id).where(cond).order_by(*order_by).limit(limit))
    )
    # End the read transaction first: a stale SQLite snapshot cannot be upgraded to a writer.
    session.commit()
    won: set[Any] = set()
    # One UPDATE … RETURNING per chunk (not one per row): the condition is checked again under
    # the write lock, so a row another worker took meanwhile is not taken twice.
    for chunk in in_chunks(candidates):
        won.update(
            session.scalars(
                sa.update(model)
                .where(model.id.in_(chunk), cond)
                .values(stamp)
                .returning(model.id)
                .execution_options(synchronize_session=False)
            )
        )
    session.commit()
    return [row_id for row_id in candidates if row_id in won]


def give_back(session: Session, model: Any, ids: Sequence[Any], holder: str) -> None:
    """Give back the leases `holder` still holds on `ids` (a worker told to stop), and commit."""
    for chunk in in_chunks(ids):
        session.execute(
            sa.update(model)
            .where(model.id.in_(chunk), model.lease_holder == holder)
            .values(released(model))
            .execution_options(synchronize_session=False)
        )
    session.commit()


def take_turn(
    session: Session, table: sa.Table, name: str, holder: str, now: datetime, every: float
) -> bool:
    """Take the shared turn `name` (a row of `table`) at `now`, moving the next one `every`
    seconds on; commit; True if won.

    A compare-and-set on one row: of the workers trying at the same moment exactly one wins
    (PostgreSQL re-checks the condition after the winner's commit; SQLite has one writer).
    """
    session.commit()  # a fresh transaction: a stale SQLite snapshot cannot become a writer
    next_at = now + timedelta(seconds=every)
    won = session.execute(
        sa.update(table)
        .where(table.c.name == name, table.c.next_at <= now)
        .values(next_at=next_at, owner=holder)
    )
    if cast(sa.CursorResult[Any], won).rowcount == 1:
        session.commit()
        return True
    exists = session.scalar(sa.select(table.c.name).where(table.c.name == name))
    if exists is not None:
        session.commit()
        return False
    try:
        session.execute(sa.insert(table).values(name=name, next_at=next_at, owner=holder))
        session.commit()
    except sa.exc.IntegrityError:  # another worker created it first, and so took this turn
        session.rollback()
        return False
    return True


@dataclass(frozen=True)
class Job(Generic[Q, A]):
    """One kind of leased work on claimed rows of `model`, held by `holder`.

    `read(row)` returns what `ask` needs (None: nothing to ask, the lease is given back);
    `ask(question)` runs with no transaction open and may raise `Postpone`, or is None when what
    `read` returned is already the answer (a listing asked for every row at once); `record(row,
    answer)` stores the answer, releasing the lease, and returns what it counts (1 for a row
    whose state changed). `back_off(ids, seconds)` gives back the leases on `ids` and makes them
    due again in `seconds` (in the caller's transaction); `retry_broken` is that delay for a row
    whose work failed.
    """

    model: Any
    holder: str
    read: Callable[[Any], Q | None]
    ask: Callable[[Q], A] | None
    record: Callable[[Any, A], int]
    back_off: Callable[[Sequence[Any], float], None]
    retry_broken: float


def work_through(
    session: Session, job: Job[Any, Any], ids: Sequence[Any], *, stop: threading.Event | None = None
) -> int:
    """Read, ask, re-check and record each of `ids` in turn, committing each; return the sum of
    what `record` counted. On `stop`, give back the rows not started."""
    done = 0
    for index, row_id in enumerate(ids):
        if stop is not None and stop.is_set():
            give_back(session, job.model, ids[index:], job.holder)
            break
        try:
            done += _work_one(session, job, row_id)
        except Postpone as exc:
            session.rollback()
            job.back_off(ids[index:], exc.seconds)
            session.commit()
            break
        except Exception:
            session.rollback()
            log.exception(
                "%s %s could not be done; trying again in %ss",
                job.model.__tablename__,
                row_id,
                job.retry_broken,
            )
            job.back_off([row_id], job.retry_broken)
            session.commit()
    return done


def _work_one(session: Session, job: Job[Any, Any], row_id: Any) -> int:
    row = _ours(session, job, row_id)
    if row is None:
        session.rollback()
        return 0
    question = job.read(row)
    if question is None:
        release(row)
        session.commit()
        return 0
    if job.ask is None:
        answer = question
    else:
        # No transaction (and no row lock) stays open while the outside world takes its time.
        session.commit()
        answer = job.ask(question)
        row = _ours(session, job, row_id)
        if row is None:
            # Our lease ran out and another worker took the row over: their answer counts.
            session.rollback()
            return 0
    counted = job.record(row, answer)
    session.commit()
    return counted


def _ours(session: Session, job: Job[Any, Any], row_id: Any) -> Any:
    row = session.get(job.model, row_id)
    return row if row is not None and row.lease_holder == job.holder else None


def ask_for_all(
    session: Session,
    ids: Sequence[Any],
    ask: Callable[[], A],
    back_off: Callable[[Sequence[Any], float], None],
) -> A | None:
    """Ask one question about all of the claimed `ids`, with no transaction open; None when the
    outside world said not now (then they are backed off, committed)."""
    session.commit()
    try:
        return ask()
    except Postpone as exc:
        back_off(ids, exc.seconds)
        session.commit()
        return None


def record_all(session: Session, record: Callable[[], T]) -> T:
    """Record in one transaction what one question answered for many claimed rows; commit."""
    try:
        result = record()
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return result

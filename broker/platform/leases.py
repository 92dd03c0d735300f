"""Claim rows for one worker with a lease, so any number of workers can share a table of work.

PostgreSQL: `SELECT … FOR UPDATE SKIP LOCKED` then stamp the lease, in one transaction, so two
workers never wait on or take the same row. SQLite (one writer at a time): pick candidates, then
take each with a compare-and-set UPDATE that only succeeds while the row is still unleased; the
database serialises the writes, so exactly one worker wins each row. A lease that runs out (the
worker was killed) makes the row claimable again.

Both steps commit (hence their names): a lease is worth something only once other workers see it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from broker.platform.db import Session, in_chunks


def claimable(model: Any, now: datetime) -> sa.ColumnElement[bool]:
    """Return the condition 'no live lease' for rows of `model`."""
    return sa.or_(model.lease_until.is_(None), model.lease_until <= now)


def claim_and_commit(
    session: Session,
    model: Any,
    *,
    where: Sequence[sa.ColumnElement[bool]],
    order_by: Sequence[Any],
    limit: int,
    owner: str,
    now: datetime,
    lease_seconds: float,
) -> list[Any]:
    """Lease up to `limit` rows matching `where` to `owner`; commit and return their ids."""
    cond = sa.and_(*where, claimable(model, now))
    until = now + timedelta(seconds=lease_seconds)
    stamp = {"lease_owner": owner, "lease_until": until}
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
                .values(**stamp)
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
                .values(**stamp)
                .returning(model.id)
                .execution_options(synchronize_session=False)
            )
        )
    session.commit()
    return [row_id for row_id in candidates if row_id in won]


def release_and_commit(session: Session, model: Any, ids: Sequence[int], owner: str) -> None:
    """Give back leases `owner` still holds on `ids` (on shutdown), and commit."""
    if ids:
        session.execute(
            sa.update(model)
            .where(model.id.in_(list(ids)), model.lease_owner == owner)
            .values(lease_owner=None, lease_until=None)
            .execution_options(synchronize_session=False)
        )
    session.commit()

"""The shared upstream budget's state, as typed SQLAlchemy models.

Every change here needs an Alembic migration (`flask --app broker db migrate -m "…"`);
tests fail when the migrations and the models drift apart.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from broker.platform.db import Model


class UpstreamBudgetState(Model):
    """One row per budget scope: the lock every process takes, and the 429 pause."""

    __tablename__ = "upstream_budget_state"

    scope: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    # Bumped by every acquire: the write that serialises acquires across processes.
    seq: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    paused_until_ms: Mapped[int] = mapped_column(sa.BigInteger, default=0)


class UpstreamBudgetBucket(Model):
    """Calls made in one slice of the budget window (the window is a sum of slices)."""

    __tablename__ = "upstream_budget_buckets"

    scope: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    start: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    calls: Mapped[int] = mapped_column(default=0)

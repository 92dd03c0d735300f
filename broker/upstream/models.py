"""The shared upstream budget's state, as typed SQLAlchemy models.

Every change here needs an Alembic migration (`flask --app broker db migrate -m "…"`);
tests fail when the migrations and the models drift apart.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from broker.platform.db import Model, UTCDateTime
from broker.platform.encryption import EncryptedText


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
    # Of those, the background's (the two sides of the budget each keep a share).
    background: Mapped[int] = mapped_column(default=0, server_default="0")


class UpstreamBatchToken(Model):
    """The batch token every process uses, and the lease of the one process refreshing it."""

    __tablename__ = "upstream_batch_tokens"

    scope: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    # A credential for the batch host only, valid for about an hour (able to list, change and
    # delete images); never logged, stored encrypted (BatchRoute encrypts it with its keyring:
    # it runs in threads with no app context too).
    token: Mapped[str | None] = mapped_column(EncryptedText)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    fetched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(sa.String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)


class UpstreamBatchFallback(Model):
    """A batch-API endpoint sent back to the global API until `until` (103, auth, errors)."""

    __tablename__ = "upstream_batch_fallbacks"

    endpoint: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    until: Mapped[datetime] = mapped_column(UTCDateTime)
    since: Mapped[datetime] = mapped_column(UTCDateTime)
    reason: Mapped[str] = mapped_column(sa.String(255))

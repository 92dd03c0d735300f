"""Erasures, as a typed SQLAlchemy model.

Every change here needs an Alembic migration (`flask --app broker db migrate -m "…"`);
tests fail when the migrations and the models drift apart.
"""

from __future__ import annotations

import enum
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from broker.platform.columns import StrEnumText
from broker.platform.db import Model, UTCDateTime, utcnow


class ErasureStatus(enum.StrEnum):
    """Where an erasure stands: pending (images still being deleted) → done."""

    PENDING = "pending"
    DONE = "done"


class Erasure(Model):
    """The erasure of one account: asked once, worked through by the worker under a lease."""

    __tablename__ = "erasures"
    __table_args__ = (sa.Index("ix_erasures_status_next", "status", "next_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), unique=True)
    # The account's public id, kept for the event and the listings.
    public_id: Mapped[str] = mapped_column(sa.String(32))
    status: Mapped[ErasureStatus] = mapped_column(
        StrEnumText(ErasureStatus, 16), default=ErasureStatus.PENDING
    )
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    requested_by: Mapped[str] = mapped_column(sa.String(200))
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    images_deleted: Mapped[int] = mapped_column(default=0)
    # Deletions Cloudflare failed so far (each is tried again).
    failures: Mapped[int] = mapped_column(default=0)
    next_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_holder: Mapped[str | None] = mapped_column(sa.String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)

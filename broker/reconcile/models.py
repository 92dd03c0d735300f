"""Reconciliation reports and the account's usage, as typed SQLAlchemy models.

Every change here needs an Alembic migration (`flask --app broker db migrate -m "…"`);
tests fail when the migrations and the models drift apart.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from broker.platform.db import Model, UTCDateTime, utcnow

# What a report counts, in the order operators read them.
REPORT_COUNTS = (
    "listed",
    "orphans",
    "adopted",
    "orphans_deleted",
    "ready_gone",
    "drafts_gone",
    "too_recent",
)


class ReconcileReport(Model):
    """What one reconciliation found and did (a dry run finds without doing)."""

    __tablename__ = "reconcile_reports"

    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    dry_run: Mapped[bool] = mapped_column(default=False)
    # The whole listing was walked (only then can an image be missing from it).
    complete: Mapped[bool] = mapped_column(default=False)
    listed: Mapped[int] = mapped_column(default=0)
    orphans: Mapped[int] = mapped_column(default=0)
    adopted: Mapped[int] = mapped_column(default=0)
    orphans_deleted: Mapped[int] = mapped_column(default=0)
    ready_gone: Mapped[int] = mapped_column(default=0)
    drafts_gone: Mapped[int] = mapped_column(default=0)
    too_recent: Mapped[int] = mapped_column(default=0)
    problem: Mapped[str | None] = mapped_column(sa.String(500))
    # Some of the ids behind the counts (at most a few dozen of each), for the admin page.
    details: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)

    def counts(self) -> dict[str, int]:
        """Return every count by name."""
        return {name: int(getattr(self, name) or 0) for name in REPORT_COUNTS}


class CloudflareUsage(Model):
    """The account's image count and allowance as Cloudflare last said (one row)."""

    __tablename__ = "cloudflare_usage"

    id: Mapped[int] = mapped_column(primary_key=True)
    current: Mapped[int] = mapped_column()
    allowed: Mapped[int] = mapped_column()
    checked_at: Mapped[datetime] = mapped_column(UTCDateTime)

"""The account's usage: Cloudflare's image count and allowance, and each user's images."""

from __future__ import annotations

import logging
from datetime import datetime

import sqlalchemy as sa

from broker.auth.models import User
from broker.platform import health
from broker.platform.db import Session, utcnow
from broker.reconcile import check
from broker.reconcile.models import REPORT_COUNTS, CloudflareUsage
from broker.uploads.models import Upload, UploadStatus
from broker.upstream.cloudflare import CloudflareImages, Priority

log = logging.getLogger("broker.usage")
# Users shown on the admin page, most images first.
TOP_USERS = 20


def refresh(
    session: Session, client: CloudflareImages, *, warn_ratio: float, now: datetime | None = None
) -> CloudflareUsage:
    """Ask Cloudflare for the account's count and allowance (background work) and keep them."""
    stats = client.stats(priority=Priority.BACKGROUND)
    row = session.get(CloudflareUsage, 1)
    if row is None:
        row = CloudflareUsage(id=1, current=0, allowed=0, checked_at=now or utcnow())
        session.add(row)
    row.current, row.allowed, row.checked_at = stats.current, stats.allowed, now or utcnow()
    if near_allowance(row, warn_ratio):
        log.warning(
            "Cloudflare Images holds %d of %d allowed images: raise the allowance or delete some",
            row.current,
            row.allowed,
        )
    return row


def near_allowance(row: CloudflareUsage | None, warn_ratio: float) -> bool:
    """Tell whether the account holds `warn_ratio` or more of its allowance."""
    return row is not None and row.allowed > 0 and row.current >= warn_ratio * row.allowed


def per_user(session: Session, limit: int = TOP_USERS) -> list[tuple[str, str, int]]:
    """Return (username, public id, images not deleted) of the users with the most images."""
    count = sa.func.count(Upload.id)
    rows = session.execute(
        sa.select(User.username, User.public_id, count)
        .join(Upload, Upload.user_id == User.id)
        .where(Upload.status != UploadStatus.DELETED)
        .group_by(User.id, User.username, User.public_id)
        .order_by(count.desc(), User.public_id)
        .limit(limit)
    )
    return [(name, public_id, int(n)) for name, public_id, n in rows]


def metric_lines(session: Session) -> list[str]:
    """The usage and reconciliation gauges of `/metrics` (what was stored: no upstream call)."""
    from broker.platform.config import current_settings

    row = session.get(CloudflareUsage, 1)
    lines = health.gauge(
        "broker_cloudflare_images",
        "Images the Cloudflare account holds and may hold, as last asked (-1: not asked yet).",
        {
            "current": row.current if row else -1,
            "allowed": row.allowed if row else -1,
        },
        label="kind",
    )
    lines += health.gauge(
        "broker_cloudflare_images_allowance_warning",
        "1 when the account holds BROKER_USAGE_WARN_RATIO or more of its image allowance.",
        int(near_allowance(row, current_settings().usage_warn_ratio)),
    )
    users = session.scalar(
        sa.select(sa.func.count(sa.distinct(Upload.user_id))).where(
            Upload.status != UploadStatus.DELETED
        )
    )
    biggest = per_user(session, 1)
    lines += health.gauge(
        "broker_users_with_images",
        "Users holding at least one image or draft.",
        int(users or 0),
    )
    lines += health.gauge(
        "broker_user_images_max",
        "Images (and drafts) of the user holding the most.",
        biggest[0][2] if biggest else 0,
    )
    report = check.latest(session)
    counts = report.counts() if report else dict.fromkeys(REPORT_COUNTS, 0)
    lines += health.gauge(
        "broker_reconcile_last",
        "What the last reconciliation found and did, by kind (listed, orphans, adopted, …).",
        counts,
        label="kind",
    )
    lines += health.gauge(
        "broker_reconcile_last_run_timestamp_seconds",
        "When the last reconciliation started (Unix time; 0: never).",
        int(report.started_at.timestamp()) if report else 0,
    )
    return lines

"""What the broker forgets, and when: the worker's `prune` job (broker/OPERATIONS.md, "Retention").

Left alone, these tables grow with traffic for ever: webhook deliveries (with their attempts)
and events, upload rows that ended without an image, and the create reservations a killed
process left behind. `prune` deletes, in batches of at most BATCH rows per kind and pass:
- deliveries that succeeded `BROKER_RETENTION_DELIVERED_DAYS` ago (30) and deliveries that
  gave up `BROKER_RETENTION_FAILED_DAYS` ago (90; the longer, for `flask webhooks redeliver`),
  their attempts with them (the foreign key cascades);
- events older than the shorter of the two (not 0) that no delivery refers to any more;
- `expired` and `deleted` uploads whose status changed `BROKER_RETENTION_UPLOADS_DAYS` ago
  (30), unless their draft still waits to be deleted at Cloudflare or a worker holds them.
  `ready` uploads are the images themselves and stay; so do `pending` and `rejected` ones;
- reservations and remember-me tokens past their expiry;
- the hourly upload counts older than a day (the daily quota reads the last 24 hours; no fold
  of usage changes writes one: broker.uploads.quotas).
A setting of 0 keeps that kind for ever. Domain code: the caller (the worker) commits.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa

from broker.auth.models import RememberToken
from broker.platform.config import Settings
from broker.platform.db import Model, Session
from broker.uploads import quotas
from broker.uploads.models import Upload, UploadReservation, UploadStatus, UploadUsageHour
from broker.webhooks.models import DeliveryStatus, WebhookDelivery, WebhookEvent

# Rows of one kind deleted per pass: keeps each transaction short after a long pause.
BATCH = 5000


def _delete(session: Session, model: type[Model], key: Any, *where: sa.ColumnElement[bool]) -> int:
    """Delete at most BATCH rows of `model` that `where` selects; return how many went."""
    chosen = sa.select(key).where(*where).limit(BATCH).scalar_subquery()
    result = session.execute(sa.delete(model).where(key.in_(chosen)))
    return int(cast(sa.CursorResult[Any], result).rowcount or 0)


def _before(now: datetime, days: int) -> datetime | None:
    return now - timedelta(days=days) if days > 0 else None


def prune(session: Session, settings: Settings, now: datetime) -> dict[str, int]:
    """Delete what is past its retention; return how many rows of each kind went."""
    done: dict[str, int] = {}
    finished = sa.func.coalesce(WebhookDelivery.completed_at, WebhookDelivery.created_at)
    for status, days in (
        (DeliveryStatus.SUCCEEDED, settings.retention_delivered_days),
        (DeliveryStatus.FAILED, settings.retention_failed_days),
    ):
        cutoff = _before(now, days)
        done[f"deliveries_{status.value}"] = (
            0
            if cutoff is None
            else _delete(
                session,
                WebhookDelivery,
                WebhookDelivery.id,
                WebhookDelivery.status == status,
                finished < cutoff,
            )
        )
    kept = [d for d in (settings.retention_delivered_days, settings.retention_failed_days) if d]
    events_cutoff = _before(now, min(kept)) if kept else None
    done["events"] = (
        0
        if events_cutoff is None
        else _delete(
            session,
            WebhookEvent,
            WebhookEvent.id,
            WebhookEvent.created_at < events_cutoff,
            ~sa.exists().where(WebhookDelivery.event_id == WebhookEvent.id),
        )
    )
    uploads_cutoff = _before(now, settings.retention_uploads_days)
    done["uploads"] = (
        0
        if uploads_cutoff is None
        else _delete(
            session,
            Upload,
            Upload.id,
            Upload.status.in_([UploadStatus.EXPIRED, UploadStatus.DELETED]),
            Upload.status_changed_at < uploads_cutoff,
            Upload.draft_delete_at.is_(None),
            sa.or_(Upload.lease_until.is_(None), Upload.lease_until < now),
        )
    )
    done["reservations"] = _delete(
        session, UploadReservation, UploadReservation.id, UploadReservation.expires_at <= now
    )
    done["remember_tokens"] = _delete(
        session, RememberToken, RememberToken.id, RememberToken.expires_at <= now
    )
    old_hours = sa.delete(UploadUsageHour).where(
        UploadUsageHour.hour < quotas.hour_of(now - quotas.DAY)
    )
    done["usage_hours"] = int(cast(sa.CursorResult[Any], session.execute(old_hours)).rowcount or 0)
    return done

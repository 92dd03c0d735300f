"""The outbox: an event and one delivery per subscribed endpoint, written in the caller's
transaction, so the event exists exactly when the state change that caused it committed.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from broker.platform.db import Session, utcnow
from broker.platform.wakeup import notify_worker
from broker.webhooks.models import DeliveryStatus, WebhookDelivery, WebhookEndpoint, WebhookEvent

EVENT_TYPES = (
    "upload.completed",
    "upload.expired",
    "upload.rejected",
    "upload.deleted",
    "upload.replaced",
    "user.erased",
)


def iso(value: Any) -> Any:
    """Render a datetime as RFC 3339 UTC with a `Z`, as every event field is; pass others."""
    return value.isoformat().replace("+00:00", "Z") if isinstance(value, datetime) else value


def subscribed(endpoint: WebhookEndpoint, event_type: str) -> bool:
    """Tell whether `endpoint` wants events of `event_type`."""
    wanted = endpoint.events.split()
    return "*" in wanted or event_type in wanted


def emit(
    session: Session,
    event_type: str,
    data: dict[str, Any],
    *,
    subject: str | None = None,
    now: datetime | None = None,
) -> WebhookEvent:
    """Add an event and its deliveries to `session` (the caller's transaction commits them).

    `data` is the event's `data` object as receivers see it; `subject` names what it is about
    (an upload id), for operators' listings.
    """
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    now = now or utcnow()
    payload = {"type": event_type, "timestamp": iso(now), "data": data}
    event = WebhookEvent(
        type=event_type,
        payload=json.dumps(payload, separators=(",", ":"), sort_keys=True),
        subject=subject,
        created_at=now,
    )
    session.add(event)
    session.flush()
    endpoints = session.scalars(
        sa.select(WebhookEndpoint).where(WebhookEndpoint.active.is_(True))
    ).all()
    for endpoint in endpoints:
        if subscribed(endpoint, event_type):
            session.add(
                WebhookDelivery(
                    event_id=event.id,
                    endpoint_id=endpoint.id,
                    status=DeliveryStatus.PENDING,
                    next_attempt_at=now,
                    created_at=now,
                )
            )
    notify_worker()
    return event

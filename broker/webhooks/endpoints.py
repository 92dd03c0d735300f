"""Webhook endpoints: registration behind the SSRF guard, secrets and their rotation, listing
and the operator's views of deliveries (redeliver, counts).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from broker.platform import health, leases
from broker.platform.db import Session, utcnow
from broker.platform.wakeup import notify_worker
from broker.webhooks import ssrf
from broker.webhooks.models import (
    DELIVERY_STATUSES,
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
)
from broker.webhooks.outbox import EVENT_TYPES
from broker.webhooks.signing import generate_secret

LOCAL_RECEIVER_HINT = (
    "a receiver on this machine (loopback only) can be allowed in development and tests "
    "with BROKER_WEBHOOK_ALLOW_PRIVATE=true"
)


def check_target(url: str, config: dict[str, Any]) -> ssrf.Target:
    """Apply the SSRF guard for this app's configuration; raise ssrf.BlockedAddress."""
    allow_private = bool(config.get("WEBHOOK_ALLOW_PRIVATE"))
    require_https = config.get("ENV") != "development" and not allow_private
    try:
        return ssrf.check_url(url, allow_private=allow_private, require_https=require_https)
    except ssrf.BlockedAddress as exc:
        if allow_private or config.get("ENV") == "production":
            raise
        # The usual first try is a receiver on localhost: say how to allow it, and only that.
        raise ssrf.BlockedAddress(f"{exc}; {LOCAL_RECEIVER_HINT}") from None


def normalise_events(events: Sequence[str]) -> str:
    """Validate event types and return them space-separated (`*` means all)."""
    wanted = []
    for raw in events:
        for name in raw.replace(",", " ").split():
            if name != "*" and name not in EVENT_TYPES:
                raise ValueError(f"unknown event type {name!r}; known: {', '.join(EVENT_TYPES)}")
            if name not in wanted:
                wanted.append(name)
    if not wanted:
        raise ValueError("give at least one event type")
    return " ".join(wanted)


def find_endpoint(session: Session, public_id: str) -> WebhookEndpoint | None:
    """Return the endpoint with this public id, if any."""
    return session.scalar(sa.select(WebhookEndpoint).where(WebhookEndpoint.public_id == public_id))


def list_endpoints(session: Session) -> list[WebhookEndpoint]:
    """Return every endpoint, oldest first."""
    return list(session.scalars(sa.select(WebhookEndpoint).order_by(WebhookEndpoint.id)))


def delivery_counts(session: Session) -> dict[str, int]:
    """Count deliveries by status (for operators)."""
    rows = session.execute(
        sa.select(WebhookDelivery.status, sa.func.count()).group_by(WebhookDelivery.status)
    )
    return {status: count for status, count in rows}


def metric_lines(session: Session) -> list[str]:
    """The webhook deliveries gauge of `/metrics`: every status, zero included (an alert on
    `failed` must find its series before the first failure)."""
    counts = delivery_counts(session)
    by_status = {status: counts.get(status, 0) for status in DELIVERY_STATUSES}
    return health.gauge(
        "broker_webhook_deliveries", "Outgoing webhook deliveries by status.", by_status
    )


def attempt_log(session: Session, delivery_id: int) -> list[WebhookAttempt]:
    """Return every logged attempt of a delivery, first to last (redeliveries included)."""
    return list(
        session.scalars(
            sa.select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id == delivery_id)
            .order_by(WebhookAttempt.number)
        )
    )


def attempts_made(session: Session, delivery_ids: Sequence[int]) -> dict[int, int]:
    """Count the logged attempts of each delivery, across redeliveries (what the log lists;
    `WebhookDelivery.attempts` counts only those since the last (re)queue, for the schedule)."""
    if not delivery_ids:
        return {}
    rows = session.execute(
        sa.select(WebhookAttempt.delivery_id, sa.func.count())
        .where(WebhookAttempt.delivery_id.in_(list(delivery_ids)))
        .group_by(WebhookAttempt.delivery_id)
    )
    counts = {delivery_id: count for delivery_id, count in rows}
    return {delivery_id: counts.get(delivery_id, 0) for delivery_id in delivery_ids}


def recent_deliveries(
    session: Session,
    *,
    endpoint: WebhookEndpoint | None = None,
    status: str | None = None,
    limit: int = 50,
) -> list[tuple[WebhookDelivery, WebhookEvent, WebhookEndpoint]]:
    """Return deliveries newest first, each with its event and endpoint (one query)."""
    stmt = (
        sa.select(WebhookDelivery, WebhookEvent, WebhookEndpoint)
        .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .order_by(WebhookDelivery.id.desc())
        .limit(limit)
    )
    if endpoint is not None:
        stmt = stmt.where(WebhookDelivery.endpoint_id == endpoint.id)
    if status:
        stmt = stmt.where(WebhookDelivery.status == status)
    return [(d, ev, e) for d, ev, e in session.execute(stmt)]


# What the audit log keeps of an endpoint and of a delivery (never a secret).
AUDITED = ("url", "events", "description", "active", "disabled_reason", "previous_secret_until")
AUDITED_DELIVERY = ("status", "attempts", "next_attempt_at")


def add_endpoint(
    session: Session,
    url: str,
    events: Sequence[str],
    config: dict[str, Any],
    *,
    description: str = "",
    now: datetime | None = None,
) -> tuple[WebhookEndpoint, str]:
    """Register an endpoint after the SSRF check; return it and its secret (shown only once)."""
    check_target(url, config)
    secret = generate_secret()
    now = now or utcnow()
    endpoint = WebhookEndpoint(
        url=url,
        events=normalise_events(events),
        description=description,
        secret=secret,
        created_at=now,
        updated_at=now,
    )
    session.add(endpoint)
    session.flush()
    return endpoint, secret


def rotate_secret(
    endpoint: WebhookEndpoint, *, window: float = 86400, now: datetime | None = None
) -> str:
    """Give `endpoint` a new secret; the old one keeps signing for `window` seconds."""
    now = now or utcnow()
    new = generate_secret()
    endpoint.previous_secret = endpoint.secret
    endpoint.previous_secret_until = now + timedelta(seconds=window)
    endpoint.secret = new
    endpoint.updated_at = now
    return new


def set_active(
    endpoint: WebhookEndpoint, active: bool, reason: str | None, *, now: datetime | None = None
) -> None:
    """Enable or disable `endpoint` (disabled endpoints keep their pending deliveries)."""
    endpoint.active = active
    endpoint.disabled_reason = None if active else (reason or "disabled by an admin")
    endpoint.updated_at = now or utcnow()


def redeliver(delivery: WebhookDelivery, *, now: datetime | None = None) -> None:
    """Queue `delivery` again now, with a fresh retry schedule and the same `webhook-id`."""
    delivery.status = DeliveryStatus.PENDING
    delivery.attempts = 0
    delivery.next_attempt_at = now or utcnow()
    delivery.completed_at = None
    leases.release(delivery)
    notify_worker()

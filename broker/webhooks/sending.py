"""Sending deliveries: leased work (`broker.platform.leases`). Claim due ones under a lease,
read and sign the message, POST it with no transaction open to the SSRF-checked pinned address
with a deadline, then log the attempt and schedule the retry or give up, in one transaction per
attempt that the leased-work unit commits. Nothing here commits itself.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa

from broker.platform import leases
from broker.platform.db import Session, utcnow
from broker.upstream.cloudflare import parse_retry_after
from broker.webhooks import ssrf
from broker.webhooks.endpoints import check_target, set_active
from broker.webhooks.models import (
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
)
from broker.webhooks.schedule import retry_delay
from broker.webhooks.signing import signature_header, signing_secrets

log = logging.getLogger("broker.webhooks")

LEASE_SECONDS = 120  # longer than one attempt (15 s timeout) with a wide margin
USER_AGENT = "upload-broker-webhooks/1"


@dataclass(frozen=True)
class Outcome:
    """What one attempt produced."""

    ok: bool
    status_code: int | None
    error: str | None
    retry_after: float | None
    gone: bool
    duration_ms: int


def attempt(
    endpoint_url: str,
    msg_id: str,
    body: bytes,
    signing: Sequence[str],
    config: dict[str, Any],
    *,
    timestamp: int | None = None,
) -> Outcome:
    """POST one signed message (SSRF-checked again now, pinned to the checked address)."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    started = time.monotonic()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(signing, msg_id, timestamp, body),
    }

    def elapsed() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        target = check_target(endpoint_url, config)
    except ssrf.BlockedAddress as exc:
        # An endpoint that became unsafe (DNS now points inside) needs an operator's eyes.
        # Log the host only: a webhook URL's path or query may carry the receiver's own secret.
        log.warning(
            "webhook to %s refused by the SSRF guard: %s", urlsplit(endpoint_url).hostname, exc
        )
        return Outcome(False, None, f"blocked: {exc}"[:500], None, False, elapsed())
    try:
        resp = ssrf.post_pinned(target, body, headers, timeout=float(config["WEBHOOK_TIMEOUT"]))
    except Exception as exc:  # any transport failure is one failed attempt, never a crash
        return Outcome(False, None, f"{type(exc).__name__}: {exc}"[:500], None, False, elapsed())
    status = resp.status
    ok = 200 <= status < 300
    retry_after = None
    if status in (429, 503):
        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
    error = None if ok else f"HTTP {status}"
    return Outcome(ok, status, error, retry_after, status == 410, elapsed())


def claim_due(session: Session, holder: str, now: datetime, limit: int = 20) -> list[int]:
    """Lease up to `limit` due deliveries of active endpoints to `holder` (committed)."""
    active = sa.select(WebhookEndpoint.id).where(WebhookEndpoint.active.is_(True))
    return leases.claim(
        session,
        WebhookDelivery,
        where=[
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.next_attempt_at <= now,
            WebhookDelivery.endpoint_id.in_(active),
        ],
        order_by=[WebhookDelivery.next_attempt_at, WebhookDelivery.id],
        limit=limit,
        holder=holder,
        now=now,
        lease_seconds=LEASE_SECONDS,
    )


@dataclass(frozen=True)
class Message:
    """What one attempt sends, read from the database before the receiver is called."""

    url: str
    msg_id: str
    body: bytes
    signing: list[str]


def message(session: Session, delivery: WebhookDelivery, now: datetime) -> Message | None:
    """Return what to send for `delivery`; None when it is no longer to be sent now."""
    endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
    if delivery.status != DeliveryStatus.PENDING or endpoint is None or not endpoint.active:
        # Done meanwhile, or its endpoint disabled since the claim (e.g. a 410 earlier in this
        # batch): left as it is.
        return None
    event = session.get(WebhookEvent, delivery.event_id)
    assert event is not None
    return Message(
        endpoint.url, event.msg_id, event.payload.encode(), signing_secrets(endpoint, now)
    )


def record_attempt(
    session: Session,
    delivery: WebhookDelivery,
    outcome: Outcome,
    now: datetime,
    rng: random.Random | None = None,
) -> str:
    """Log one attempt of `delivery`, give back its lease and schedule the retry or give up;
    return its new status."""
    endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
    event = session.get(WebhookEvent, delivery.event_id)
    assert endpoint is not None and event is not None
    delivery.attempts += 1
    session.add(
        WebhookAttempt(
            delivery_id=delivery.id,
            number=_attempt_number(session, delivery.id),
            started_at=now,
            duration_ms=outcome.duration_ms,
            status_code=outcome.status_code,
            error=outcome.error,
        )
    )
    delivery.last_status_code = outcome.status_code
    delivery.last_error = outcome.error
    leases.release(delivery)
    delay = None
    if outcome.gone:
        set_active(endpoint, False, "receiver answered 410 Gone", now=now)
        log.warning("webhook endpoint %s answered 410: disabled", endpoint.public_id)
    elif not outcome.ok:
        delay = retry_delay(delivery.attempts, retry_after=outcome.retry_after, rng=rng)
    if delay is not None:
        delivery.next_attempt_at = now + timedelta(seconds=delay)
    else:  # delivered, or given up
        delivery.status = DeliveryStatus.SUCCEEDED if outcome.ok else DeliveryStatus.FAILED
        delivery.completed_at = now
        delivery.next_attempt_at = None
    log.info(
        "webhook %s %s -> %s attempt=%d status=%s duration_ms=%d",
        event.type,
        event.msg_id,
        endpoint.public_id,
        delivery.attempts,
        outcome.status_code if outcome.status_code is not None else outcome.error,
        outcome.duration_ms,
    )
    return delivery.status


def _attempt_number(session: Session, delivery_id: int) -> int:
    count = session.scalar(
        sa.select(sa.func.count())
        .select_from(WebhookAttempt)
        .where(WebhookAttempt.delivery_id == delivery_id)
    )
    return int(count or 0) + 1


def deliver_due(
    session: Session,
    holder: str,
    config: dict[str, Any],
    *,
    now: datetime | None = None,
    limit: int = 20,
    stop: threading.Event | None = None,
) -> int:
    """Worker job: claim due deliveries and attempt each (leased work: an attempt's record
    commits before the next starts); on `stop`, give back what was not tried. Return how many
    were attempted."""
    now = now or utcnow()

    def send(msg: Message) -> Outcome:
        return attempt(
            msg.url, msg.msg_id, msg.body, msg.signing, config, timestamp=int(now.timestamp())
        )

    def record(delivery: WebhookDelivery, outcome: Outcome) -> int:
        record_attempt(session, delivery, outcome, now)
        return 1

    # A delivery whose attempt could not be recorded is retried when its lease would run out.
    read = functools.partial(message, session, now=now)
    back_off = leases.backing_off(
        session, WebhookDelivery, WebhookDelivery.next_attempt_at, holder, now
    )
    job = leases.Job(WebhookDelivery, holder, read, send, record, back_off, LEASE_SECONDS)
    return leases.work_through(session, job, claim_due(session, holder, now, limit), stop=stop)

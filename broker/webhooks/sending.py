"""Sending deliveries: claim due ones under a lease, sign, POST to the SSRF-checked pinned
address with a deadline, log every attempt, schedule the retry or give up.
"""

from __future__ import annotations

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


def claim_due(session: Session, owner: str, now: datetime, limit: int = 20) -> list[int]:
    """Lease up to `limit` due deliveries of active endpoints to `owner`."""
    active = sa.select(WebhookEndpoint.id).where(WebhookEndpoint.active.is_(True))
    return leases.claim_and_commit(
        session,
        WebhookDelivery,
        where=[
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= now,
            WebhookDelivery.endpoint_id.in_(active),
        ],
        order_by=[WebhookDelivery.next_attempt_at, WebhookDelivery.id],
        limit=limit,
        owner=owner,
        now=now,
        lease_seconds=LEASE_SECONDS,
    )


def deliver_one(
    session: Session,
    delivery_id: int,
    owner: str,
    config: dict[str, Any],
    *,
    now: datetime | None = None,
    rng: random.Random | None = None,
) -> str | None:
    """Make one attempt of a delivery `owner` holds; record and commit it; return the new status.

    Part of the `deliver_due` job: the attempt's record commits before the next one starts.
    """
    now = now or utcnow()
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.lease_owner != owner or delivery.status != "pending":
        session.rollback()
        return None
    event = session.get(WebhookEvent, delivery.event_id)
    endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
    assert event is not None and endpoint is not None
    if not endpoint.active:
        # Disabled since the claim (e.g. a 410 earlier in this batch): leave it pending.
        delivery.lease_owner = None
        delivery.lease_until = None
        session.commit()
        return None
    url, msg_id, body = endpoint.url, event.msg_id, event.payload.encode()
    signing = signing_secrets(endpoint, now)
    # No transaction (and no row lock) stays open while the receiver takes its time.
    session.commit()
    outcome = attempt(url, msg_id, body, signing, config, timestamp=int(now.timestamp()))

    delivery = session.get(WebhookDelivery, delivery_id)
    endpoint = session.get(WebhookEndpoint, delivery.endpoint_id) if delivery else None
    if delivery is None or endpoint is None or delivery.lease_owner != owner:
        # Our lease ran out and someone else took over; their attempt is the one that counts.
        session.rollback()
        return None
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
    delivery.lease_owner = None
    delivery.lease_until = None
    if outcome.ok:
        delivery.status = DeliveryStatus.SUCCEEDED
        delivery.completed_at = now
        delivery.next_attempt_at = None
    elif outcome.gone:
        delivery.status = DeliveryStatus.FAILED
        delivery.completed_at = now
        delivery.next_attempt_at = None
        set_active(endpoint, False, "receiver answered 410 Gone", now=now)
        log.warning("webhook endpoint %s answered 410: disabled", endpoint.public_id)
    else:
        delay = retry_delay(delivery.attempts, retry_after=outcome.retry_after, rng=rng)
        if delay is None:
            delivery.status = DeliveryStatus.FAILED
            delivery.completed_at = now
            delivery.next_attempt_at = None
        else:
            delivery.next_attempt_at = now + timedelta(seconds=delay)
    log.info(
        "webhook %s %s -> %s attempt=%d status=%s duration_ms=%d",
        event.type,
        msg_id,
        endpoint.public_id,
        delivery.attempts,
        outcome.status_code if outcome.status_code is not None else outcome.error,
        outcome.duration_ms,
    )
    status = delivery.status
    session.commit()
    return status


def _attempt_number(session: Session, delivery_id: int) -> int:
    count = session.scalar(
        sa.select(sa.func.count())
        .select_from(WebhookAttempt)
        .where(WebhookAttempt.delivery_id == delivery_id)
    )
    return int(count or 0) + 1


def deliver_due(
    session: Session,
    owner: str,
    config: dict[str, Any],
    *,
    now: datetime | None = None,
    limit: int = 20,
    stop: threading.Event | None = None,
) -> int:
    """Worker job: claim and attempt due deliveries, each in its own transaction; on `stop`,
    give back what was not tried. Return how many were attempted."""
    now = now or utcnow()
    ids = claim_due(session, owner, now, limit)
    done = 0
    for index, delivery_id in enumerate(ids):
        if stop is not None and stop.is_set():
            leases.release_and_commit(session, WebhookDelivery, ids[index:], owner)
            break
        try:
            deliver_one(session, delivery_id, owner, config, now=now)
        except Exception:
            session.rollback()
            log.exception("webhook delivery %s crashed", delivery_id)
        done += 1
    return done

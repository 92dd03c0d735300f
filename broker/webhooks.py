"""Outgoing webhooks: outbox events, Standard Webhooks signing, delivery with retries and leases.

- `emit(session, type, upload)` writes the event and one delivery per subscribed endpoint in the
  caller's transaction (outbox): the event exists exactly when the state change committed.
- The worker calls `deliver_due(...)`: claim due deliveries with a lease, sign, POST to the
  SSRF-checked, pinned address, log the attempt, schedule the retry.
- Signing follows https://www.standardwebhooks.com/: `webhook-id`, `webhook-timestamp`,
  `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import secrets as _secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.orm import Session

from broker import leases, ssrf
from broker.cloudflare import parse_retry_after
from broker.db import utcnow
from broker.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent

log = logging.getLogger("broker.webhooks")

EVENT_TYPES = ("upload.completed", "upload.expired", "upload.rejected", "upload.deleted")
SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
SECRET_BYTES = 32
# Seconds after the first attempt fails: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, then failed.
RETRY_DELAYS: tuple[int, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
JITTER = 0.1
MAX_RETRY_AFTER = 86400
LEASE_SECONDS = 120  # longer than one attempt (15 s timeout) with a wide margin
USER_AGENT = "upload-broker-webhooks/1"


# -- secrets and signatures (pure) ------------------------------------------------------------


def generate_secret() -> str:
    """Return a fresh endpoint secret: `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(SECRET_BYTES)).decode()


def _secret_key(secret: str) -> bytes:
    raw = secret.removeprefix(SECRET_PREFIX)
    return base64.b64decode(raw)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """Return the Standard Webhooks signature `v1,<base64>` of one message."""
    if isinstance(body, str):
        body = body.encode()
    signed = f"{msg_id}.{int(timestamp)}.".encode() + body
    digest = hmac.new(_secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets: Iterable[str], msg_id: str, timestamp: int, body: bytes | str) -> str:
    """Return the `webhook-signature` value: one signature per secret, space-separated."""
    return " ".join(sign(s, msg_id, timestamp, body) for s in secrets)


def verify(
    secret: str,
    msg_id: str,
    timestamp: int,
    body: bytes | str,
    header: str,
    *,
    now: float | None = None,
    tolerance: int = 300,
) -> bool:
    """Tell whether `header` holds a valid signature by `secret` of a fresh message."""
    now = time.time() if now is None else now
    if abs(now - int(timestamp)) > tolerance:
        return False
    expected = sign(secret, msg_id, timestamp, body).encode()
    return any(hmac.compare_digest(expected, part.encode()) for part in header.split())


def signing_secrets(endpoint: WebhookEndpoint, now: datetime) -> list[str]:
    """Return the secrets that sign now: the current one, plus the previous during its window."""
    found = [endpoint.secret]
    if (
        endpoint.previous_secret
        and endpoint.previous_secret_until is not None
        and endpoint.previous_secret_until > now
    ):
        found.append(endpoint.previous_secret)
    return found


# -- retry schedule (pure) --------------------------------------------------------------------


def retry_delay(
    failed_attempts: int,
    *,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float | None:
    """Return seconds to wait after the `failed_attempts`-th failure, or None to give up.

    Each delay gets ±10 % jitter so a recovering receiver is not hit by a synchronized wave.
    A `Retry-After` from a 429/503 is honoured as a minimum (capped at a day).
    """
    if failed_attempts < 1 or failed_attempts > len(RETRY_DELAYS):
        return None
    base = RETRY_DELAYS[failed_attempts - 1]
    rng = rng or random.Random()
    delay = base * (1 + rng.uniform(-JITTER, JITTER))
    if retry_after is not None:
        delay = max(delay, min(float(retry_after), MAX_RETRY_AFTER))
    return delay


def max_attempts() -> int:
    """Return how many attempts a delivery gets before it is marked failed."""
    return len(RETRY_DELAYS) + 1


# -- the outbox --------------------------------------------------------------------------------


def _iso(value: Any) -> Any:
    return value.isoformat().replace("+00:00", "Z") if isinstance(value, datetime) else value


def upload_data(upload: Any) -> dict[str, Any]:
    """Return the `data.upload` object of an event (the API's upload shape, plus variants)."""
    from broker.uploads import public_metadata

    user = getattr(upload, "user", None)
    fields = {
        "id": upload.id,
        "image_id": upload.image_id,
        "owner": getattr(user, "public_id", None),
        "status": upload.status,
        "require_signed_urls": getattr(upload, "require_signed_urls", None),
        "metadata": public_metadata(getattr(upload, "meta", None)),
        "created_at": getattr(upload, "created_at", None),
        "expires_at": getattr(upload, "expires_at", None),
        "status_changed_at": getattr(upload, "status_changed_at", None),
        "completed_at": getattr(upload, "completed_at", None),
        "filename": getattr(upload, "filename", None),
        "uploaded_at": getattr(upload, "uploaded_at", None),
        "variants": getattr(upload, "variants", None) or [],
        "reject_reason": getattr(upload, "reject_reason", None),
    }
    return {k: _iso(v) for k, v in fields.items()}


def subscribed(endpoint: WebhookEndpoint, event_type: str) -> bool:
    """Tell whether `endpoint` wants events of `event_type`."""
    wanted = endpoint.events.split()
    return "*" in wanted or event_type in wanted


def emit(
    session: Session,
    event_type: str,
    upload: Any,
    *,
    now: datetime | None = None,
    data: dict[str, Any] | None = None,
) -> WebhookEvent:
    """Add an event and its deliveries to `session` (the caller's transaction commits them)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    now = now or utcnow()
    payload = {
        "type": event_type,
        "timestamp": _iso(now),
        "data": data if data is not None else {"upload": upload_data(upload)},
    }
    subject = payload["data"].get("upload", {}).get("id") if data is None else None
    event = WebhookEvent(
        type=event_type,
        payload=json.dumps(payload, separators=(",", ":"), sort_keys=True),
        subject=str(subject) if subject is not None else None,
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
                    status="pending",
                    next_attempt_at=now,
                    created_at=now,
                )
            )
    notify_worker()
    return event


# The inline worker (and tests) wait on this; emitting an event wakes them early.
wake = threading.Event()


def notify_worker() -> None:
    """Wake an in-process worker so fresh work is not left waiting for the next poll."""
    wake.set()


# -- endpoints ---------------------------------------------------------------------------------


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
    delivery.status = "pending"
    delivery.attempts = 0
    delivery.next_attempt_at = now or utcnow()
    delivery.completed_at = None
    delivery.lease_owner = None
    delivery.lease_until = None
    notify_worker()


# -- delivery ----------------------------------------------------------------------------------


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
    return leases.claim(
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
    """Make one attempt of a delivery `owner` holds; record it; return the new status."""
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
        delivery.status = "succeeded"
        delivery.completed_at = now
        delivery.next_attempt_at = None
    elif outcome.gone:
        delivery.status = "failed"
        delivery.completed_at = now
        delivery.next_attempt_at = None
        set_active(endpoint, False, "receiver answered 410 Gone", now=now)
        log.warning("webhook endpoint %s answered 410: disabled", endpoint.public_id)
    else:
        delay = retry_delay(delivery.attempts, retry_after=outcome.retry_after, rng=rng)
        if delay is None:
            delivery.status = "failed"
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
    """Claim and attempt due deliveries; on `stop`, give back what was not tried. Return count."""
    now = now or utcnow()
    ids = claim_due(session, owner, now, limit)
    done = 0
    for index, delivery_id in enumerate(ids):
        if stop is not None and stop.is_set():
            leases.release(session, WebhookDelivery, ids[index:], owner)
            break
        try:
            deliver_one(session, delivery_id, owner, config, now=now)
        except Exception:
            session.rollback()
            log.exception("webhook delivery %s crashed", delivery_id)
        done += 1
    return done

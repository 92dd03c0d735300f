"""Sending deliveries: leased work (`broker.platform.leases`). Claim due ones under a lease,
read and sign the message, POST it with no transaction open to the SSRF-checked pinned address
with a deadline, then log the attempt and schedule the retry or give up, in one transaction per
attempt that the leased-work unit commits. Nothing here commits itself.

Endpoints are isolated from each other (`Lanes`): each claim is split into lanes, a lane being a
few deliveries of one endpoint sent one after another in a thread of its own, with at most
WEBHOOK_ENDPOINT_CONCURRENCY lanes per endpoint and WEBHOOK_CONCURRENCY per worker process. A
receiver that is slow or hangs to the timeout holds only its own lanes; the others keep going.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from flask import Flask, current_app

from broker.platform import leases, wakeup
from broker.platform.config import settings_of
from broker.platform.db import Session, db, utcnow
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
# What one pass driven step by step (`flask worker --once` from cron, tests) sends at most per
# lane slot: as many as a single claim took before deliveries went out in lanes.
PASS_SHARE = 20
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


def _due(now: datetime) -> list[sa.ColumnElement[bool]]:
    active = sa.select(WebhookEndpoint.id).where(WebhookEndpoint.active.is_(True))
    return [
        WebhookDelivery.status == DeliveryStatus.PENDING,
        WebhookDelivery.next_attempt_at <= now,
        WebhookDelivery.endpoint_id.in_(active),
    ]


def claim_due(
    session: Session,
    holder: str,
    now: datetime,
    limit: int = 20,
    *,
    endpoint_id: int | None = None,
) -> list[int]:
    """Lease up to `limit` due deliveries of active endpoints (or of one) to `holder`
    (committed)."""
    mine = [] if endpoint_id is None else [WebhookDelivery.endpoint_id == endpoint_id]
    return leases.claim(
        session,
        WebhookDelivery,
        where=[*_due(now), *mine],
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


def deliver_claimed(
    session: Session,
    holder: str,
    config: Mapping[str, Any],
    ids: Sequence[int],
    *,
    now: datetime,
    stop: threading.Event | None = None,
) -> int:
    """Attempt each of the claimed deliveries `ids` in turn (leased work: an attempt's record
    commits before the next starts); on `stop`, give back what was not tried. Return how many
    were attempted."""

    def send(msg: Message) -> Outcome:
        return attempt(
            msg.url, msg.msg_id, msg.body, msg.signing, dict(config), timestamp=int(now.timestamp())
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
    return leases.work_through(session, job, ids, stop=stop)


def lane_length(timeout: float) -> int:
    """Return how many deliveries one lane takes: all of them must fit in one lease even when
    every attempt runs to the timeout (with a margin of half the lease)."""
    return max(1, min(10, math.floor(LEASE_SECONDS / 2 / max(timeout, 0.001))))


def claim_lanes(
    session: Session,
    holder: str,
    now: datetime,
    *,
    lanes: int,
    per_endpoint: int,
    busy: Mapping[int, int],
    length: int,
) -> list[tuple[int, list[int]]]:
    """Lease due deliveries for up to `lanes` new lanes to `holder` (committed): endpoints with
    the oldest due delivery first, none past `per_endpoint` lanes counting the `busy` ones, at
    most `length` deliveries a lane. Return (endpoint id, delivery ids) per lane."""
    first_due = sa.func.min(WebhookDelivery.next_attempt_at)
    waiting = session.execute(
        sa.select(WebhookDelivery.endpoint_id)
        .where(*_due(now), leases.claimable(WebhookDelivery, now))
        .group_by(WebhookDelivery.endpoint_id)
        .order_by(first_due, WebhookDelivery.endpoint_id)
        .limit(lanes + len(busy))
    ).scalars()
    wanted: list[tuple[int, int]] = []
    for endpoint_id in list(waiting):
        room = min(per_endpoint - busy.get(endpoint_id, 0), lanes - sum(n for _, n in wanted))
        if room > 0:
            wanted.append((endpoint_id, room))
    found: list[tuple[int, list[int]]] = []
    for endpoint_id, room in wanted:
        ids = claim_due(session, holder, now, room * length, endpoint_id=endpoint_id)
        if not ids:
            continue  # another worker took them meanwhile
        size = math.ceil(len(ids) / room)
        found.extend((endpoint_id, ids[i : i + size]) for i in range(0, len(ids), size))
    return found


class Lanes:
    """One worker's webhook senders: claimed deliveries go out in lanes, a thread each, at most
    WEBHOOK_CONCURRENCY at once and WEBHOOK_ENDPOINT_CONCURRENCY per endpoint.

    `dispatch` claims what free lanes can take and starts them without waiting (the worker
    loop); `wait` waits for the lanes running (a pass driven step by step, `deliver_due`);
    `close` waits and stops the threads. A lane that ends wakes the worker for the next claim.
    """

    def __init__(
        self,
        app: Flask,
        holder: str,
        *,
        config: Mapping[str, Any] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        settings = settings_of(app)
        self.app = app
        self.holder = holder
        self.config = app.config if config is None else config
        self.stop = stop
        self.per_worker = max(1, settings.webhook_concurrency)
        self.per_endpoint = max(1, settings.webhook_endpoint_concurrency)
        self.length = lane_length(float(self.config["WEBHOOK_TIMEOUT"]))
        self._pool = ThreadPoolExecutor(self.per_worker, thread_name_prefix="broker-webhooks")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._busy: Counter[int] = Counter()  # lanes running per endpoint
        self._running = 0
        self._attempted = 0

    def dispatch(self, session: Session, now: datetime) -> int:
        """Claim deliveries for the free lanes and start sending them; return how many."""
        if self.stop is not None and self.stop.is_set():
            return 0
        with self._lock:
            free = self.per_worker - self._running
            busy = {endpoint: n for endpoint, n in self._busy.items() if n > 0}
        if free <= 0:
            return 0
        claimed = claim_lanes(
            session,
            self.holder,
            now,
            lanes=free,
            per_endpoint=self.per_endpoint,
            busy=busy,
            length=self.length,
        )
        for endpoint_id, ids in claimed:
            with self._lock:
                self._busy[endpoint_id] += 1
                self._running += 1
            self._pool.submit(self._run, endpoint_id, ids, now)
        return sum(len(ids) for _, ids in claimed)

    def _run(self, endpoint_id: int, ids: list[int], now: datetime) -> None:
        attempted = 0
        try:
            # A thread of its own: its own app context, so its own session (and connection).
            with self.app.app_context():
                try:
                    attempted = deliver_claimed(
                        db.session, self.holder, self.config, ids, now=now, stop=self.stop
                    )
                finally:
                    db.session.remove()
        except Exception:
            # Its deliveries come back when their leases run out.
            log.exception("a webhook lane failed")
        finally:
            with self._changed:
                self._busy[endpoint_id] -= 1
                self._running -= 1
                self._attempted += attempted
                self._changed.notify_all()
            wakeup.notify_worker()  # room for the next claim

    def wait(self) -> int:
        """Wait for the running lanes; return how many attempts lanes made since the last
        wait."""
        with self._changed:
            while self._running:
                self._changed.wait()
            attempted, self._attempted = self._attempted, 0
        return attempted

    def run_pass(self, session: Session, now: datetime) -> int:
        """Claim and send, waiting for every lane, until nothing due is left or each lane slot
        has sent a pass's share (a pass driven step by step); return the attempts made."""
        attempted = 0
        for _ in range(max(1, PASS_SHARE // self.length)):
            if not self.dispatch(session, now):
                break
            # As the looping worker claims again when a lane ends: a pass is not one lane long.
            attempted += self.wait()
            # Lanes may have run to their timeouts: the next claim's leases, signatures and
            # retry times start from the clock, not from the pass's start.
            now = max(now, utcnow())
        return attempted

    def close(self) -> None:
        """Wait for the running lanes (told to stop, they give back what they have not
        started) and end their threads."""
        self.wait()
        self._pool.shutdown(wait=True)


def deliver_due(
    session: Session,
    holder: str,
    config: Mapping[str, Any],
    *,
    now: datetime | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Claim due deliveries and attempt them, each endpoint in its own lanes, and wait for them
    (a pass driven step by step: tests, `flask worker --once`); return how many were
    attempted."""
    now = now or utcnow()
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    lanes = Lanes(app, holder, config=config, stop=stop)
    try:
        return lanes.run_pass(session, now)
    finally:
        lanes.close()

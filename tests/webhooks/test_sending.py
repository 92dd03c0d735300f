"""Sending: deliveries over real HTTP to a receiver that verifies them, retries on schedule,
Retry-After, 410, redirects, leases, redelivery, a stopping worker."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
import time_machine

from broker import worker
from broker.platform import wakeup
from broker.platform.db import db, utcnow
from broker.webhooks import endpoints, outbox, sending
from broker.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent
from tests.factories import add_webhook_endpoint, queue_events
from tests.support.webhook_receiver import serve_receiver

START = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)


def _upload_data():
    """The `data` of an upload event as the uploads feature writes it (the outbox stores it)."""
    upload = {"id": "up_test1", "image_id": "img-1", "status": "ready", "filename": "cat.png"}
    return {"upload": {**upload, "variants": ["https://x/thumb"], "metadata": {"k": "v"}}}


@pytest.fixture
def wh_app(make_app):
    return make_app(WEBHOOK_ALLOW_PRIVATE=True)


def _emit(app, event_type="upload.completed"):
    with app.app_context():
        event = outbox.emit(db.session, event_type, _upload_data(), subject="up_test1", now=START)
        db.session.commit()
        return event.msg_id


def _deliver(app, owner="w1", now=START):
    with app.app_context():
        return sending.deliver_due(db.session, owner, app.config, now=now)


def _delivery(app):
    with app.app_context():
        return db.session.scalars(sa.select(WebhookDelivery)).one()


def test_delivery_is_signed_and_verified_by_the_receiver(wh_app, receiver):
    _, secret = add_webhook_endpoint(wh_app, receiver.url, now=START)
    receiver.secret = secret
    with time_machine.travel(START, tick=False):
        msg_id = _emit(wh_app)
        assert _deliver(wh_app) == 1
    [got] = receiver.requests
    assert got.verified is True, got.error
    assert got.msg_id == msg_id
    assert got.json["type"] == "upload.completed"
    assert got.json["data"]["upload"]["id"] == "up_test1"
    assert got.json["timestamp"] == "2030-05-01T12:00:00Z"
    assert got.headers["webhook-timestamp"] == str(int(START.timestamp()))
    d = _delivery(wh_app)
    assert (d.status, d.attempts, d.last_status_code) == ("succeeded", 1, 204)
    with wh_app.app_context():
        [a] = db.session.scalars(sa.select(WebhookAttempt)).all()
        assert (a.number, a.status_code, a.error) == (1, 204, None)


def test_only_subscribed_active_endpoints_get_events(wh_app, receiver):
    add_webhook_endpoint(wh_app, receiver.url, ["upload.expired"], now=START)
    _emit(wh_app, "upload.completed")
    with wh_app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(WebhookDelivery)) == 0
        assert db.session.scalar(sa.select(sa.func.count()).select_from(WebhookEvent)) == 1


def test_retry_schedule_under_frozen_time(wh_app, receiver):
    """Every failure is retried on schedule (5 s … 10 h), then the delivery fails."""
    _, secret = add_webhook_endpoint(wh_app, receiver.url, now=START)
    receiver.secret = secret
    receiver.default = (500, {})
    with time_machine.travel(START, tick=False) as traveller:
        msg_id = _emit(wh_app)
        now = START
        for n, base in enumerate([5, 300, 1800, 7200, 18000, 36000, 36000], start=1):
            assert _deliver(wh_app, now=now) == 1
            d = _delivery(wh_app)
            assert d.status == "pending" and d.attempts == n
            wait = (d.next_attempt_at - now).total_seconds()
            assert base * 0.9 <= wait <= base * 1.1
            # Not due a moment before.
            assert _deliver(wh_app, now=d.next_attempt_at - timedelta(seconds=1)) == 0
            now = d.next_attempt_at
            traveller.move_to(now)
        assert _deliver(wh_app, now=now) == 1
        assert _deliver(wh_app, now=now + timedelta(days=2)) == 0
    d = _delivery(wh_app)
    assert (d.status, d.attempts, d.last_status_code) == ("failed", 8, 500)
    assert len(receiver.requests) == 8
    assert {r.msg_id for r in receiver.requests} == {msg_id}
    assert all(r.verified for r in receiver.requests)
    # webhook-timestamp is per attempt.
    assert len({r.headers["webhook-timestamp"] for r in receiver.requests}) == 8
    with wh_app.app_context():
        numbers = db.session.scalars(sa.select(WebhookAttempt.number)).all()
        assert sorted(numbers) == list(range(1, 9))


def test_410_disables_the_endpoint(wh_app, receiver):
    endpoint_id, _ = add_webhook_endpoint(wh_app, receiver.url, now=START)
    receiver.respond(410)
    _emit(wh_app)
    _emit(wh_app, "upload.expired")
    _deliver(wh_app)
    with wh_app.app_context():
        endpoint = db.session.get(WebhookEndpoint, endpoint_id)
        assert endpoint.active is False and "410" in endpoint.disabled_reason
        statuses = sorted(db.session.scalars(sa.select(WebhookDelivery.status)))
    # The second delivery is not attempted while the endpoint is disabled.
    assert statuses == ["failed", "pending"]
    assert len(receiver.requests) == 1


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(wh_app, receiver, status):
    add_webhook_endpoint(wh_app, receiver.url, now=START)
    receiver.respond((status, {"Retry-After": "900"}))
    _emit(wh_app)
    _deliver(wh_app)
    d = _delivery(wh_app)
    assert d.status == "pending"
    assert (d.next_attempt_at - START).total_seconds() == 900


def test_redirects_are_not_followed(wh_app, receiver):
    add_webhook_endpoint(wh_app, receiver.url, now=START)
    receiver.respond((307, {"Location": receiver.url + "/elsewhere"}))
    _emit(wh_app)
    _deliver(wh_app)
    d = _delivery(wh_app)
    assert (d.status, d.last_status_code, d.attempts) == ("pending", 307, 1)
    assert [r.path for r in receiver.requests] == ["/hook"]


def test_unreachable_receiver_is_a_logged_failed_attempt(wh_app):
    add_webhook_endpoint(wh_app, "http://127.0.0.1:9/hook", now=START)
    _emit(wh_app)
    _deliver(wh_app)
    d = _delivery(wh_app)
    assert d.status == "pending" and d.last_status_code is None and d.last_error


def test_ssrf_is_checked_at_delivery_too(make_app, receiver):
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    add_webhook_endpoint(app, receiver.url, now=START)
    _emit(app)
    strict = make_app(WEBHOOK_ALLOW_PRIVATE=False)
    _deliver(strict)
    d = _delivery(strict)
    assert d.status == "pending" and d.last_error.startswith("blocked")
    assert receiver.requests == []


def test_redeliver_keeps_the_webhook_id(wh_app, receiver):
    add_webhook_endpoint(wh_app, receiver.url, now=START)
    msg_id = _emit(wh_app)
    _deliver(wh_app)
    with wh_app.app_context():
        d = db.session.scalars(sa.select(WebhookDelivery)).one()
        endpoints.redeliver(d, now=START + timedelta(hours=1))
        db.session.commit()
    _deliver(wh_app, now=START + timedelta(hours=1))
    assert [r.msg_id for r in receiver.requests] == [msg_id, msg_id]
    with wh_app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(WebhookAttempt)) == 2


def test_a_lost_lease_is_reclaimed_with_the_same_webhook_id(wh_app, receiver):
    """A worker that claimed and died: after the lease the next worker delivers the event."""
    add_webhook_endpoint(wh_app, receiver.url, now=START)
    msg_id = _emit(wh_app)
    with wh_app.app_context():
        assert sending.claim_due(db.session, "dead-worker", START) != []
    assert _deliver(wh_app, owner="w2", now=START + timedelta(seconds=10)) == 0
    later = START + timedelta(seconds=sending.LEASE_SECONDS + 1)
    assert _deliver(wh_app, owner="w2", now=later) == 1
    assert [r.msg_id for r in receiver.requests] == [msg_id]


def test_payload_is_the_exact_signed_body(wh_app, receiver):
    add_webhook_endpoint(wh_app, receiver.url, now=START)
    _emit(wh_app)
    _deliver(wh_app)
    with wh_app.app_context():
        event = db.session.scalars(sa.select(WebhookEvent)).one()
    assert receiver.requests[0].body == event.payload.encode()
    assert set(json.loads(event.payload)) == {"type", "timestamp", "data"}


def test_stop_releases_unstarted_deliveries(make_app, receiver):
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    add_webhook_endpoint(app, receiver.url)
    queue_events(app, 3)
    stop = threading.Event()
    stop.set()
    with app.app_context():
        sending.deliver_due(db.session, "w1", app.config, stop=stop)
        rows = db.session.scalars(sa.select(WebhookDelivery)).all()
        assert all(d.lease_holder is None and d.status == "pending" for d in rows)


def test_a_hanging_receiver_does_not_delay_another(make_app, receiver):
    """One receiver hangs past the timeout, the other answers at once; 8 events: the healthy
    receiver has all of its deliveries before the hanging one's first attempt timed out (one
    after another they came a timeout apart)."""
    timeout = 5.0
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True, WEBHOOK_TIMEOUT=timeout, WORKER_POLL_INTERVAL=30)
    receiver.block = threading.Event()
    receiver.block.set()  # every request waits on `release`, set only at the end
    with serve_receiver() as healthy:
        hanging_id, _ = add_webhook_endpoint(app, receiver.url, now=START)  # claimed first
        healthy_id, _ = add_webhook_endpoint(app, healthy.url, now=START)
        thread, stop = worker.start_inline(app)
        try:
            queue_events(app, 8, "upload.completed")
            wakeup.notify_worker()  # the events are committed now
            got = healthy.wait_for(8, timeout=timeout)
            assert receiver.arrived.is_set()  # the hanging one is being tried meanwhile
        finally:
            receiver.release.set()
            stop.set()
            wakeup.notify_worker()
            thread.join(30)
        assert not thread.is_alive()
    assert len({r.msg_id for r in got}) == 8
    with app.app_context():
        statuses = db.session.execute(
            sa.select(WebhookDelivery.endpoint_id, WebhookDelivery.status)
        ).all()
    assert sorted(s for e, s in statuses if e == healthy_id) == ["succeeded"] * 8
    # One attempt at a time to the hanging endpoint (its lane); the rest given back at the stop.
    assert len(receiver.requests) == 1
    assert sorted(s for e, s in statuses if e == hanging_id).count("pending") == 7


def test_lanes_are_bounded_per_endpoint_and_per_worker(make_app):
    """A claim takes the endpoints with the oldest due delivery first, none past its lanes."""
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    ids = [add_webhook_endpoint(app, f"http://127.0.0.1:9/{n}", now=START)[0] for n in range(3)]
    queue_events(app, 4)
    with app.app_context():
        now = utcnow()
        # Two lanes free, the first endpoint busy with its one lane: the other two get one each.
        lanes = sending.claim_lanes(
            db.session, "w1", now, lanes=2, per_endpoint=1, busy={ids[0]: 1}, length=3
        )
        assert sorted(e for e, _ in lanes) == ids[1:]
        assert [len(batch) for _, batch in lanes] == [3, 3]
        # Two lanes an endpoint: the first endpoint's 4 deliveries split in two lanes.
        lanes = sending.claim_lanes(
            db.session, "w2", now, lanes=8, per_endpoint=2, busy={}, length=3
        )
        expected = [(ids[0], 2), (ids[0], 2), (ids[1], 1), (ids[2], 1)]
        assert [(e, len(batch)) for e, batch in lanes] == expected


def test_a_pass_driven_step_by_step_sends_past_one_lane(wh_app, receiver):
    """One endpoint with more deliveries due than a lane takes: a pass (`flask worker --once`
    from cron, the worker driven by tests) claims again as its lanes end, as the looping worker
    does, up to a pass's share; the next pass sends the rest, in order."""
    add_webhook_endpoint(wh_app, receiver.url, now=START)
    length = sending.lane_length(float(wh_app.config["WEBHOOK_TIMEOUT"]))
    assert length < sending.PASS_SHARE  # else one lane is a pass and this shows nothing
    queue_events(wh_app, sending.PASS_SHARE + 3)
    with time_machine.travel(START, tick=False):
        assert worker.run_once(wh_app, now=START)["deliver_webhooks"] == sending.PASS_SHARE
        assert _deliver(wh_app) == 3
        assert _deliver(wh_app) == 0
    sent = [json.loads(r.body)["data"]["n"] for r in receiver.requests]
    assert sent == list(range(sending.PASS_SHARE + 3))


def test_each_claim_of_a_pass_leases_from_the_clock(wh_app, receiver, monkeypatch):
    """A pass whose lanes take long (receivers at their timeout) claims its next lane with a
    lease from the time of that claim, not from the pass's start: another worker must not
    find those deliveries claimable (and send them twice) while this pass still holds them."""
    add_webhook_endpoint(wh_app, receiver.url, now=START)
    length = sending.lane_length(float(wh_app.config["WEBHOOK_TIMEOUT"]))
    queue_events(wh_app, 2 * length)
    leased: list[datetime] = []
    original = sending.deliver_claimed
    with time_machine.travel(START, tick=False) as clock:

        def slow_lane(session, holder, config, ids, **kwargs):
            rows = session.scalars(sa.select(WebhookDelivery).where(WebhookDelivery.id.in_(ids)))
            leased.extend(_utc(r.lease_until) for r in rows)
            done = original(session, holder, config, ids, **kwargs)
            clock.shift(timedelta(seconds=sending.LEASE_SECONDS))  # the lane took a lease's time
            return done

        monkeypatch.setattr(sending, "deliver_claimed", slow_lane)
        assert _deliver(wh_app) == 2 * length
    lease = timedelta(seconds=sending.LEASE_SECONDS)
    assert leased == [START + lease] * length + [START + 2 * lease] * length


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

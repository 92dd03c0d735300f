"""Leases: concurrent workers never claim the same row (PostgreSQL SKIP LOCKED, SQLite
compare-and-set)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from broker.platform import leases
from broker.platform.db import db, utcnow
from broker.webhooks.models import WebhookDelivery
from tests.factories import add_webhook_endpoint, queue_events


def _double_claim(first, second, receiver):
    """Two workers with their own connections race for 200 rows: each row goes to one."""
    add_webhook_endpoint(first, receiver.url)
    queue_events(first, 200)
    now = utcnow()
    claimed: dict[str, list[int]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def run(app, name):
        with app.app_context():
            barrier.wait()
            while True:
                got = leases.claim(
                    db.session,
                    WebhookDelivery,
                    where=[WebhookDelivery.status == "pending"],
                    order_by=[WebhookDelivery.id],
                    limit=7,
                    holder=name,
                    now=now,
                    lease_seconds=60,
                )
                if not got:
                    break
                claimed[name] += got
            db.session.remove()

    pairs = ((first, "a"), (second, "b"))
    threads = [threading.Thread(target=run, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    both = claimed["a"] + claimed["b"]
    assert len(both) == len(set(both)) == 200
    with first.app_context():
        rows = db.session.execute(sa.select(WebhookDelivery.id, WebhookDelivery.lease_holder))
        owners = {row_id: owner for row_id, owner in rows}
    assert all(owners[i] == "a" for i in claimed["a"])
    assert all(owners[i] == "b" for i in claimed["b"])


def test_two_workers_never_double_claim(make_app, receiver):
    """On the suite's database (SQLite by default: compare-and-set claims)."""
    first = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    _double_claim(first, make_app(WEBHOOK_ALLOW_PRIVATE=True), receiver)


@pytest.mark.postgres
def test_two_workers_never_double_claim_on_postgresql(
    postgres_url, database_url, make_app, receiver
):
    """FOR UPDATE SKIP LOCKED: concurrent claims on PostgreSQL never overlap."""
    if database_url != postgres_url:
        pytest.skip("runs in the PostgreSQL pass of the suite (BROKER_TEST_DATABASE_URL)")
    first = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    with first.app_context():
        assert db.engine.dialect.name == "postgresql"
    _double_claim(first, make_app(WEBHOOK_ALLOW_PRIVATE=True), receiver)


# -- the leased-work unit: read, ask with no transaction open, re-check, record, commit --------


def _leased_deliveries(app, receiver, count: int, holder: str = "w1") -> list[int]:
    """`count` deliveries claimed by `holder`; return their ids in claim order."""
    add_webhook_endpoint(app, receiver.url)
    queue_events(app, count)
    with app.app_context():
        return leases.claim(
            db.session,
            WebhookDelivery,
            where=[WebhookDelivery.status == "pending"],
            order_by=[WebhookDelivery.id],
            limit=count,
            holder=holder,
            now=NOW,
            lease_seconds=60,
        )


NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def _job(asked: list, ask, record=None) -> leases.Job:
    """A job on deliveries: reads the row's id, `ask`s about it, records 'succeeded'."""

    def read(delivery: WebhookDelivery) -> int:
        return delivery.id

    def asking(delivery_id: int):
        # Nothing of the database is held while the outside world is asked.
        asked.append((delivery_id, db.session().in_transaction()))
        return ask(delivery_id)

    def recorded(delivery: WebhookDelivery, answer) -> int:
        delivery.status = "succeeded"
        leases.release(delivery)
        return 1

    back_off = leases.backing_off(
        db.session, WebhookDelivery, WebhookDelivery.next_attempt_at, "w1", NOW
    )
    return leases.Job(WebhookDelivery, "w1", read, asking, record or recorded, back_off, 90)


def _rows(ids: list[int]) -> list[tuple[str, str | None, datetime | None]]:
    rows = {d.id: d for d in db.session.scalars(sa.select(WebhookDelivery))}
    return [(rows[i].status, rows[i].lease_holder, rows[i].next_attempt_at) for i in ids]


def test_each_row_is_asked_about_with_no_transaction_open_and_recorded(make_app, receiver):
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    ids = _leased_deliveries(app, receiver, 3)
    asked: list = []
    with app.app_context():
        assert leases.work_through(db.session, _job(asked, lambda e: e), ids) == 3
        assert [in_transaction for _, in_transaction in asked] == [False] * 3
        assert [(s, holder) for s, holder, _ in _rows(ids)] == [("succeeded", None)] * 3


def test_an_answer_is_dropped_when_the_lease_was_lost_meanwhile(make_app, receiver):
    """While the outside world took its time, the lease ran out and another worker took the
    row: its answer counts, ours is not recorded."""
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    ids = _leased_deliveries(app, receiver, 3)

    def slow(delivery_id: int) -> int:
        if delivery_id == ids[1]:
            with db.engine.begin() as other:
                other.execute(
                    sa.update(WebhookDelivery.__table__)
                    .where(WebhookDelivery.__table__.c.id == ids[1])
                    .values(lease_owner="w2")
                )
        return delivery_id

    with app.app_context():
        assert leases.work_through(db.session, _job([], slow), ids) == 2
        assert [(s, holder) for s, holder, _ in _rows(ids)] == [
            ("succeeded", None),
            ("pending", "w2"),
            ("succeeded", None),
        ]


def test_not_now_backs_off_this_row_and_the_rest(make_app, receiver):
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    ids = _leased_deliveries(app, receiver, 3)

    def busy(delivery_id: int) -> int:
        if delivery_id != ids[0]:
            raise leases.Postpone(30)
        return delivery_id

    asked: list = []
    with app.app_context():
        assert leases.work_through(db.session, _job(asked, busy), ids) == 1
        assert len(asked) == 2  # the third is not asked: the outside world said not now
        later = NOW + timedelta(seconds=30)
        assert _rows(ids)[1:] == [("pending", None, later)] * 2


def test_a_row_that_cannot_be_recorded_waits_alone(make_app, receiver):
    """A record the database refuses is rolled back and backed off; the next rows go on."""
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    ids = _leased_deliveries(app, receiver, 3)

    def record(delivery: WebhookDelivery, answer: int) -> int:
        delivery.status = "succeeded"
        leases.release(delivery)
        if delivery.id == ids[1]:
            delivery.attempts = None  # NOT NULL: the commit fails
        return 1

    with app.app_context():
        assert leases.work_through(db.session, _job([], lambda e: e, record), ids) == 2
        rows = _rows(ids)
        assert rows[1] == ("pending", None, NOW + timedelta(seconds=90))
        assert [rows[0][0], rows[2][0]] == ["succeeded", "succeeded"]

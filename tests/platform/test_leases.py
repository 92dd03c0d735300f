"""Leases: concurrent workers never claim the same row (PostgreSQL SKIP LOCKED, SQLite
compare-and-set)."""

from __future__ import annotations

import threading

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

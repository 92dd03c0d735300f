"""Retention: the worker's `prune` pass, at an injected time, deletes exactly what is past its
retention — webhook deliveries (attempts with them) and events, expired and deleted uploads,
stale reservations — and keeps everything else; a setting of 0 keeps that kind for ever."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import sqlalchemy as sa
import time_machine
from flask import Flask

from broker import worker
from broker.platform.db import db, utcnow
from broker.uploads.models import Upload, UploadReservation
from broker.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEvent
from tests.factories import add_webhook_endpoint, create_user, queue_events, record_upload

DAY = timedelta(days=1)


def _history(app: Flask) -> dict[str, object]:
    """Rows of every kind, some just past their retention and some just within it."""
    now = utcnow()
    queue_events(app, 1)  # no endpoint yet: an event nobody was sent, 31 days old below
    add_webhook_endpoint(app, "http://127.0.0.1:9/hooks")
    queue_events(app, 4)
    user = create_user(app, "alice")
    uploads = {
        name: record_upload(app, user.id, f"img-{name}", status=status)
        for name, status in (
            ("expired_old", "expired"),
            ("expired_draft_waits", "expired"),
            ("deleted_old", "deleted"),
            ("deleted_recent", "deleted"),
            ("ready_old", "ready"),
            ("rejected_old", "rejected"),
        )
    }
    with app.app_context():
        (lonely,) = db.session.scalars(
            sa.select(WebhookEvent).where(
                ~sa.exists().where(WebhookDelivery.event_id == WebhookEvent.id)
            )
        )
        lonely.created_at = now - 31 * DAY
        deliveries = db.session.scalars(sa.select(WebhookDelivery).order_by(WebhookDelivery.id))
        for delivery, (status, age) in zip(
            deliveries,
            (("succeeded", 31), ("succeeded", 29), ("failed", 91), ("failed", 89)),
            strict=True,
        ):
            delivery.status = status  # type: ignore[assignment]
            delivery.next_attempt_at = None
            delivery.completed_at = now - age * DAY
            event = db.session.get(WebhookEvent, delivery.event_id)
            assert event is not None
            event.created_at = now - age * DAY
            db.session.add(
                WebhookAttempt(delivery_id=delivery.id, number=1, started_at=now - age * DAY)
            )
        for name, upload_id in uploads.items():
            upload = db.session.get(Upload, upload_id)
            assert upload is not None
            upload.status_changed_at = now - (29 if name == "deleted_recent" else 400) * DAY
            if name == "expired_draft_waits":
                upload.draft_delete_at = now + timedelta(minutes=5)
        for name, expires in (("r-old", now - timedelta(hours=1)), ("r-live", now + DAY)):
            db.session.add(
                UploadReservation(id=name, user_id=user.id, created_at=now, expires_at=expires)
            )
        lonely_id = lonely.id
        db.session.commit()
    return {"now": now, "uploads": uploads, "lonely": lonely_id}


def _left(app: Flask) -> dict[str, list[object]]:
    with app.app_context():
        return {
            "deliveries": sorted(
                (d.status.value, round((utcnow() - d.completed_at) / DAY))  # type: ignore[operator]
                for d in db.session.scalars(sa.select(WebhookDelivery))
            ),
            "attempts": [db.session.scalar(sa.select(sa.func.count(WebhookAttempt.id)))],
            "events": sorted(db.session.scalars(sa.select(WebhookEvent.id))),
            "uploads": sorted(db.session.scalars(sa.select(Upload.image_id))),
            "reservations": sorted(db.session.scalars(sa.select(UploadReservation.id))),
        }


def test_prune_deletes_what_is_past_its_retention(make_app: Callable[..., Flask]) -> None:
    """Defaults: delivered 30 days, failed 90, expired and deleted uploads 30 days."""
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    history = _history(app)
    with app.app_context():
        events_before = sorted(db.session.scalars(sa.select(WebhookEvent.id)))
    with time_machine.travel(history["now"], tick=False):
        done = worker.Worker(app).run_once()
        left = _left(app)
    assert left["deliveries"] == [("failed", 89), ("succeeded", 29)]
    assert left["attempts"] == [2]  # the pruned deliveries' attempts went with them
    # The lonely old event and the two events whose deliveries went; two remain.
    assert len(left["events"]) == len(events_before) - 3
    assert history["lonely"] not in left["events"]
    assert left["uploads"] == [
        "img-deleted_recent",
        "img-expired_draft_waits",
        "img-ready_old",
        "img-rejected_old",
    ]
    assert left["reservations"] == ["r-live"]
    assert done["prune"] == 2 + 3 + 2 + 1


def test_prune_runs_every_five_minutes_and_zero_keeps_for_ever(
    make_app: Callable[..., Flask],
) -> None:
    """With every retention 0 only expired reservations go; a pass 4 minutes later does not
    prune, one 5 minutes later does."""
    app = make_app(
        WEBHOOK_ALLOW_PRIVATE=True,
        RETENTION_DELIVERED_DAYS=0,
        RETENTION_FAILED_DAYS="0",
        RETENTION_UPLOADS_DAYS=0,
    )
    history = _history(app)
    before = _left(app)
    runner = worker.Worker(app)
    now = history["now"]
    assert isinstance(now, type(utcnow()))
    with time_machine.travel(now, tick=False):
        assert runner.run_once()["prune"] == 1
    assert _left(app) == {**before, "reservations": ["r-live"]}
    with app.app_context():
        db.session.add(
            UploadReservation(
                id="r-next",
                user_id=db.session.scalars(sa.select(Upload.user_id)).first(),
                created_at=now,
                expires_at=now + timedelta(minutes=2),
            )
        )
        db.session.commit()
    assert "prune" not in runner.run_once(now=now + timedelta(minutes=4))
    assert runner.run_once(now=now + timedelta(minutes=5))["prune"] == 1

"""/metrics: the overdue-work gauge, and every series it serves is explained in the README."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
import time_machine
from flask import Flask

from broker.platform.db import db, utcnow
from broker.uploads.models import Upload
from broker.webhooks.models import WebhookDelivery
from tests.factories import add_webhook_endpoint, create_user, queue_events, record_upload

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "scrape-me-0123456789"


def scrape(app: Flask) -> str:
    """GET /metrics with the scrape token, as Prometheus does."""
    page = app.test_client().get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert page.status_code == 200
    return page.get_data(as_text=True)


def test_overdue_work_is_the_oldest_due_item_of_each_queue(make_app: Callable[..., Flask]) -> None:
    """Nothing due: 0. A completion check due 90 s ago and a delivery due 30 s ago (no worker
    ran them): 90 and 30; items not yet due and finished ones do not count."""
    app = make_app(METRICS_TOKEN=TOKEN, WEBHOOK_ALLOW_PRIVATE=True)
    assert 'broker_work_overdue_seconds{queue="completion"} 0.0' in scrape(app)
    user = create_user(app, "alice")
    overdue = record_upload(app, user.id, "img-overdue", status="pending")
    later = record_upload(app, user.id, "img-later", status="pending")
    done = record_upload(app, user.id, "img-done", status="ready")
    add_webhook_endpoint(app, "http://127.0.0.1:9/hooks")
    queue_events(app, 1)
    now = utcnow()
    with app.app_context():
        for upload_id, due in ((overdue, -90), (later, 60), (done, -900)):
            db.session.get(Upload, upload_id).next_check_at = now + timedelta(seconds=due)  # type: ignore[union-attr]
        db.session.execute(
            sa.update(WebhookDelivery).values(next_attempt_at=now - timedelta(seconds=30))
        )
        db.session.commit()
    with time_machine.travel(now, tick=False):
        text = scrape(app)
    assert 'broker_work_overdue_seconds{queue="completion"} 90.0' in text
    assert 'broker_work_overdue_seconds{queue="webhook_delivery"} 30.0' in text


def test_the_guide_explains_every_series(make_app: Callable[..., Flask]) -> None:
    """Each metric /metrics serves has a row in the README's metrics table."""
    names = re.findall(
        r"^# HELP (\w+) ", scrape(make_app(METRICS_TOKEN=TOKEN, CLOUDFLARE_BATCH="auto")), re.M
    )
    assert len(names) == 7
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in names if f"| `{name}" not in readme]
    assert missing == []

"""`flask webhooks …`: add, list, rotate-secret, deliveries, redeliver, disable."""

from __future__ import annotations

import sqlalchemy as sa

from broker import worker
from broker.platform.db import db
from broker.webhooks import outbox
from broker.webhooks.models import WebhookEndpoint


def test_cli_add_list_rotate_disable_deliveries_redeliver(make_app, receiver):
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    runner = app.test_cli_runner()
    result = runner.invoke(args=["webhooks", "add", receiver.url, "--events", "upload.completed"])
    assert result.exit_code == 0, result.output
    assert "whsec_" in result.output
    endpoint_id = result.output.split()[1]
    assert endpoint_id in runner.invoke(args=["webhooks", "list"]).output
    result = runner.invoke(args=["webhooks", "rotate-secret", endpoint_id, "--window", "60"])
    assert result.exit_code == 0 and "whsec_" in result.output
    with app.app_context():
        e = db.session.scalars(sa.select(WebhookEndpoint)).one()
        assert e.previous_secret and e.previous_secret_until
        outbox.emit(db.session, "upload.completed", {"x": 1})
        db.session.commit()
    worker.run_once(app)
    out = runner.invoke(args=["webhooks", "deliveries", "--attempts"]).output
    assert "succeeded" in out and "#1" in out
    delivery_id = out.split()[0]
    result = runner.invoke(args=["webhooks", "redeliver", delivery_id])
    assert result.exit_code == 0
    worker.run_once(app)
    assert len(receiver.requests) == 2
    assert runner.invoke(args=["webhooks", "disable", endpoint_id]).exit_code == 0
    assert "disabled" in runner.invoke(args=["webhooks", "list"]).output
    strict = make_app().test_cli_runner()
    refused = strict.invoke(args=["webhooks", "add", "https://10.0.0.1/x", "--events", "*"])
    assert refused.exit_code != 0 and "non-public" in refused.output
    bad = runner.invoke(args=["webhooks", "add", receiver.url, "--events", "nope"])
    assert bad.exit_code != 0

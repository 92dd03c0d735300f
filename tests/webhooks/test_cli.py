"""`flask webhooks …`: add, list, rotate-secret, deliveries, redeliver, disable."""

from __future__ import annotations

import re

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


def test_deliveries_attempt_counts_match_the_attempts_listed_after_redelivers(
    make_app, receiver, make_user, bearer
):
    """`deliveries --attempts` (and the API) count every attempt they list, redeliveries too."""
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    runner = app.test_cli_runner()
    assert runner.invoke(args=["webhooks", "add", receiver.url, "--events", "*"]).exit_code == 0
    with app.app_context():
        outbox.emit(db.session, "upload.completed", {"x": 1})
        db.session.commit()
    receiver.respond(500)
    worker.run_once(app)  # attempt 1 fails; the retry is scheduled 5 s later
    delivery_id = runner.invoke(args=["webhooks", "deliveries"]).output.split()[0]
    for _ in range(2):  # two redeliveries: attempts 2 and 3 succeed
        assert runner.invoke(args=["webhooks", "redeliver", delivery_id]).exit_code == 0
        worker.run_once(app)

    out = runner.invoke(args=["webhooks", "deliveries", "--attempts"]).output
    summary, *listed = out.splitlines()
    assert "succeeded" in summary
    assert "attempts=3 (1 since redeliver)" in summary
    assert [line.split()[0] for line in listed] == ["#1", "#2", "#3"]
    assert " 500 " in listed[0] and " 204 " in listed[1] and " 204 " in listed[2]
    assert len(receiver.requests) == 3

    admin = make_user("root", is_admin=True)
    shown = app.test_client().get(
        f"/api/v1/webhooks/deliveries/{delivery_id}", headers=bearer(app, admin)
    )
    assert shown.status_code == 200
    assert shown.get_json()["attempts"] == len(shown.get_json()["attempt_log"]) == 3
    listed_api = app.test_client().get("/api/v1/webhooks/deliveries", headers=bearer(app, admin))
    assert [d["attempts"] for d in listed_api.get_json()["items"]] == [3]


def test_metrics_export_every_delivery_status_even_at_zero(make_app, receiver):
    """An alert on `failed` finds its series before the first failure."""
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True, METRICS_TOKEN="scrape-me-0123456789")
    scrape = {"Authorization": "Bearer scrape-me-0123456789"}

    def gauges() -> dict[str, str]:
        text = app.test_client().get("/metrics", headers=scrape).get_data(as_text=True)
        return dict(re.findall(r'^broker_webhook_deliveries\{status="(\w+)"\} (\d+)$', text, re.M))

    assert gauges() == {"pending": "0", "succeeded": "0", "failed": "0"}
    runner = app.test_cli_runner()
    assert runner.invoke(args=["webhooks", "add", receiver.url, "--events", "*"]).exit_code == 0
    with app.app_context():
        for n in range(3):
            outbox.emit(db.session, "upload.completed", {"n": n})
        db.session.commit()
    receiver.respond(410)  # the first attempt is told Gone: failed, endpoint disabled
    worker.run_once(app)
    assert gauges() == {"pending": "2", "succeeded": "0", "failed": "1"}

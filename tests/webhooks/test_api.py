"""The admin API under /api/v1/webhooks: endpoints, secret rotation, deliveries, redelivery."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from flask import Flask

from broker import worker
from broker.platform.db import db
from broker.webhooks import outbox
from broker.webhooks.models import WebhookAttempt, WebhookEvent
from tests.factories import PASSWORD


def test_admin_api(make_app, make_user, bearer, receiver):
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    client = app.test_client()
    admin = bearer(app, make_user("root", is_admin=True))
    alice = bearer(app, make_user("alice"))
    base = "/api/v1/webhooks/endpoints"
    assert client.get(base, headers=alice).status_code == 403
    assert client.get(base).status_code == 401
    created = client.post(
        base, json={"url": receiver.url, "events": ["upload.completed"]}, headers=admin
    )
    assert created.status_code == 201
    body = created.get_json()
    assert body["secret"].startswith("whsec_")
    receiver.secret = body["secret"]
    listed = client.get(base, headers=admin).get_json()["items"]
    assert [e["id"] for e in listed] == [body["id"]] and "secret" not in listed[0]
    refused = client.post(
        base, json={"url": "https://169.254.169.254/", "events": ["*"]}, headers=admin
    )
    assert refused.status_code == 422
    assert (
        client.post(base, json={"url": receiver.url, "events": ["x"]}, headers=admin).status_code
        == 422
    )
    one = f"{base}/{body['id']}"
    assert client.get(one, headers=admin).get_json()["events"] == ["upload.completed"]
    assert client.get(f"{base}/nope", headers=admin).status_code == 404
    rotated = client.post(f"{one}/rotate-secret", json={"window_seconds": 600}, headers=admin)
    assert rotated.status_code == 200
    new_secret = rotated.get_json()["secret"]
    assert new_secret != body["secret"]

    with app.app_context():
        outbox.emit(db.session, "upload.completed", {"x": 1})
        db.session.commit()
    worker.run_once(app)
    # Both old and new secret verify during the window.
    from standardwebhooks.webhooks import Webhook

    got = receiver.requests[0]
    Webhook(new_secret).verify(got.body, got.headers)
    assert got.verified  # with the old one

    deliveries = client.get("/api/v1/webhooks/deliveries", headers=admin).get_json()["items"]
    assert deliveries[0]["status"] == "succeeded"
    did = deliveries[0]["id"]
    detail = client.get(f"/api/v1/webhooks/deliveries/{did}", headers=admin).get_json()
    assert detail["attempt_log"][0]["status_code"] == 204
    again = client.post(f"/api/v1/webhooks/deliveries/{did}/redeliver", headers=admin)
    assert again.status_code == 202 and again.get_json()["status"] == "pending"
    assert client.get("/api/v1/webhooks/deliveries/999999", headers=admin).status_code == 404
    q = client.get(
        f"/api/v1/webhooks/deliveries?status=pending&endpoint={body['id']}", headers=admin
    )
    assert [d["id"] for d in q.get_json()["items"]] == [did]
    off = client.patch(one, json={"active": False}, headers=admin)
    assert off.status_code == 200 and off.get_json()["active"] is False
    assert client.patch(one, json={"url": "https://10.1.1.1/"}, headers=admin).status_code == 422
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(WebhookAttempt)) == 1
        assert db.session.scalar(sa.select(sa.func.count()).select_from(WebhookEvent)) == 1


def test_admin_api_refuses_a_bad_idna_webhook_url_with_422(
    make_app: Callable[..., Flask], make_user: Callable[..., Any], bearer: Callable[..., Any]
) -> None:
    """The API's SSRF check turns an unencodable host into 422 url_not_allowed, not a 500."""
    app = make_app()
    root = make_user("root", PASSWORD, is_admin=True)
    headers = bearer(app, root)
    client = app.test_client()
    for url in ("https://ä..example.com/hook", "https://" + "ä" * 70 + ".example.com/"):
        response = client.post(
            "/api/v1/webhooks/endpoints", json={"url": url, "events": ["*"]}, headers=headers
        )
        assert response.status_code == 422, response.get_data(as_text=True)
        assert response.get_json()["error"]["code"] == "url_not_allowed"


def test_the_documented_statuses_are_the_stored_ones() -> None:
    """The API's status values and the model's enum name the same states, in the same order."""
    from typing import get_args

    from broker.webhooks.api import Status
    from broker.webhooks.models import DELIVERY_STATUSES, DeliveryStatus

    assert get_args(Status) == DELIVERY_STATUSES == tuple(DeliveryStatus)

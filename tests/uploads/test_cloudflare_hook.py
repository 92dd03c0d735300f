"""Cloudflare's notification at `/hooks/cloudflare`: only a hint that makes an upload due (the
worker verifies), refused without the shared secret, junk ignored, end to end over real HTTP."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from broker import worker
from broker.platform.db import db, utcnow
from broker.uploads.models import Upload
from tests.factories import (
    create_upload,
    later,
    live_server,
    load_upload,
    send_file,
    webhook_events,
)
from tests.uploads.conftest import CF_SECRET


def test_cloudflare_hook_with_wrong_secret_changes_nothing(setup):
    app, client, auth = setup
    up = create_upload(client, auth)
    before = load_upload(app, up["id"]).next_check_at
    body = {"imageId": up["image_id"], "success": True}
    for headers in ({}, {"cf-webhook-auth": "wrong"}, {"cf-webhook-auth": CF_SECRET + "x"}):
        response = client.post("/hooks/cloudflare", json=body, headers=headers)
        assert response.status_code == 401
        assert response.get_json()["error"]["code"] == "unauthorized"
    row = load_upload(app, up["id"])
    assert row.next_check_at == before and row.status == "pending"
    assert webhook_events(app) == []


def test_cloudflare_hook_is_only_a_hint(setup, emulator):
    """A valid notification for an upload with no file changes no state: it is verified."""
    app, client, auth = setup
    up = create_upload(client, auth)
    response = client.post(
        "/hooks/cloudflare",
        json={"imageId": up["image_id"], "success": True},
        headers={"cf-webhook-auth": CF_SECRET},
    )
    assert response.status_code == 202
    assert load_upload(app, up["id"]).next_check_at <= utcnow()
    worker.run_once(app, now=later())
    assert load_upload(app, up["id"]).status == "pending"
    assert webhook_events(app) == []
    # Unknown images and junk are ignored without error.
    for payload in ({"imageId": "nope"}, {"x": 1}):
        response = client.post(
            "/hooks/cloudflare", json=payload, headers={"cf-webhook-auth": CF_SECRET}
        )
        assert response.status_code == 202


@pytest.mark.parametrize("image", ["x", ["id"], 7, True])
def test_cloudflare_hook_ignores_a_non_object_image_field(
    make_app: Callable[..., Flask], image: Any
) -> None:
    """`{"image": "x"}` with the right secret is no 500: with no image id to match it only
    brings every pending upload's check forward (202), as any unmatched notification does."""
    app = make_app(CLOUDFLARE_WEBHOOK_SECRET="hook-secret-for-tests")
    response = app.test_client().post(
        "/hooks/cloudflare",
        json={"image": image},
        headers={"cf-webhook-auth": "hook-secret-for-tests"},
    )
    assert response.status_code == 202
    assert response.get_json() == {"status": "accepted"}


@pytest.mark.parametrize("sent", [None, "", "anything"])
def test_cloudflare_hook_refuses_everything_when_no_secret_is_configured(
    make_app: Callable[..., Flask], sent: str | None
) -> None:
    """No BROKER_CLOUDFLARE_WEBHOOK_SECRET: every call is 401 (an empty header matches nothing)."""
    app = make_app(CLOUDFLARE_WEBHOOK_SECRET=None)
    headers = {} if sent is None else {"cf-webhook-auth": sent}
    response = app.test_client().post("/hooks/cloudflare", json={"imageId": "x"}, headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"


def test_emulator_notification_over_http_leads_to_completion(setup, emulator, receiver):
    """Cloudflare (the emulator) notifies the broker over real HTTP; the worker verifies."""
    app, client, auth = setup
    notifier = emulator.emulator.notifier
    old = notifier.url, notifier.secret
    with live_server(app) as url:
        notifier.url = f"{url}/hooks/cloudflare"
        notifier.secret = CF_SECRET
        try:
            up = create_upload(client, auth)
            with app.app_context():
                db.session.execute(
                    sa.update(Upload).values(next_check_at=utcnow() + timedelta(hours=1))
                )
                db.session.commit()
            send_file(up)
            notifier.join(10)
        finally:
            notifier.url, notifier.secret = old
    assert load_upload(app, up["id"]).next_check_at <= utcnow()
    worker.run_once(app, now=later())
    assert load_upload(app, up["id"]).status == "ready"
    assert [r.json["type"] for r in receiver.requests] == ["upload.completed"]


def test_unmatched_notification_makes_every_pending_upload_due(setup, make_user, bearer, emulator):
    """An authenticated notification without a known image id brings every check forward."""
    app, client, auth = setup
    bob = bearer(app, make_user("bob"))
    ups = [create_upload(client, auth), create_upload(client, bob), create_upload(client, auth)]
    for up in ups[:2]:
        send_file(up)
    assert all(load_upload(app, u["id"]).next_check_at > utcnow() for u in ups)
    odd = {"name": "Images", "text": "upload done", "data": {"something": "else"}}
    response = client.post("/hooks/cloudflare", json=odd, headers={"cf-webhook-auth": CF_SECRET})
    assert response.status_code == 202
    assert all(load_upload(app, u["id"]).next_check_at <= utcnow() for u in ups)
    emulator.reset_counters()
    worker.run_once(app, now=later())
    assert [load_upload(app, u["id"]).status for u in ups] == ["ready", "ready", "pending"]
    calls = {k: v for k, v in emulator.counters().items() if k not in {"upload_url", "keys_list"}}
    assert calls == {"list_v2": 1}  # one listing for all three
    # Without the secret it still changes nothing.
    fresh = create_upload(client, auth)
    before = load_upload(app, fresh["id"]).next_check_at
    assert client.post("/hooks/cloudflare", json=odd).status_code == 401
    assert load_upload(app, fresh["id"]).next_check_at == before

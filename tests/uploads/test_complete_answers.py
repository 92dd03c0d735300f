"""What `/complete` and `GET /uploads/{id}` tell a client about its file: no file yet (with a
`Retry-After` that grows), refused by Cloudflare and why, and the URL's expiry, answered as a
final state as soon as it passes (not after the worker's grace). Time is injected, the
emulator is real HTTP."""

from __future__ import annotations

from datetime import timedelta

import pytest
import requests
import time_machine

from tests.factories import create_upload, load_upload, send_file, webhook_events
from tests.uploads.conftest import CF_SECRET


@pytest.fixture
def inline(make_app, make_user, bearer):
    """An app verifying `/complete` inline (the budget has headroom), taking notifications."""
    app = make_app(CLOUDFLARE_WEBHOOK_SECRET=CF_SECRET)
    return app, app.test_client(), bearer(app, make_user("alice"))


def _complete(client, auth, upload):
    return client.post(f"/api/v1/uploads/{upload['id']}/complete", headers=auth)


def test_a_client_that_never_sends_its_file_gets_the_final_answer_at_expiry(inline, emulator):
    """Waits grow 1, 2, 4 … while no file arrives; right after the URL's expiry `/complete`
    answers 200 `expired` (the draft deleted upstream), not 202 for the grace period."""
    app, client, auth = inline
    up = create_upload(client, auth, expires_in=600)
    assert up["file_state"] == "awaiting_file"
    waits = []
    for _ in range(4):
        answer = _complete(client, auth, up)
        assert answer.status_code == 202
        body = answer.get_json()
        assert body["status"] == "pending" and body["file_state"] == "awaiting_file"
        assert "Cloudflare had no file" in body["file_message"]
        waits.append(int(answer.headers["Retry-After"]))
    assert waits == [1, 2, 4, 8]
    shown = client.get(f"/api/v1/uploads/{up['id']}", headers=auth).get_json()
    assert shown["file_state"] == "awaiting_file" and shown["last_checked_at"] is not None

    expires_at = load_upload(app, up["id"]).expires_at
    # Close to the expiry the wait never reaches past it.
    with time_machine.travel(expires_at - timedelta(seconds=3), tick=False):
        answer = _complete(client, auth, up)
        assert answer.status_code == 202 and int(answer.headers["Retry-After"]) <= 3
    with time_machine.travel(expires_at + timedelta(seconds=1), tick=False):
        shown = client.get(f"/api/v1/uploads/{up['id']}", headers=auth).get_json()
        assert shown["file_state"] == "url_expired"
        assert "create a new upload" in shown["file_message"]
        answer = _complete(client, auth, up)
        assert answer.status_code == 200 and "Retry-After" not in answer.headers
        body = answer.get_json()
        assert body["status"] == "expired" and body["file_state"] == "url_expired"
        # The URL is dead at Cloudflare too: the emulator answers 410 (or 404 once deleted).
        late = requests.post(up["upload_url"], files={"file": ("a.png", b"x")}, timeout=10)
        assert late.status_code in (404, 410)
    assert len(webhook_events(app, "upload.expired")) == 1
    assert emulator.emulator.store.get_image(up["image_id"]) is None
    again = _complete(client, auth, up)
    assert again.status_code == 200 and again.get_json()["status"] == "expired"


def test_a_file_sent_just_before_expiry_is_ready_not_expired(inline):
    app, client, auth = inline
    up = create_upload(client, auth, expires_in=120)
    send_file(up)
    expires_at = load_upload(app, up["id"]).expires_at
    with time_machine.travel(expires_at + timedelta(seconds=1), tick=False):
        answer = _complete(client, auth, up)
    assert answer.status_code == 200
    assert answer.get_json()["status"] == "ready"
    assert answer.get_json()["file_state"] == "received"


def test_a_refused_file_is_reported_with_cloudflares_reason(inline):
    """The app's file is refused by Cloudflare (here: not an image, 415); Cloudflare's
    notification says so and the next `/complete` and `GET` tell the client why."""
    app, client, auth = inline
    up = create_upload(client, auth)
    sent = requests.post(up["upload_url"], files={"file": ("a.png", b"not an image")}, timeout=10)
    assert sent.status_code == 415
    [error] = sent.json()["errors"]
    notified = client.post(
        "/hooks/cloudflare",
        json={"imageId": up["image_id"], "success": False, "errors": [error]},
        headers={"cf-webhook-auth": CF_SECRET},
    )
    assert notified.status_code == 202
    answer = _complete(client, auth, up)
    assert answer.status_code == 202
    body = answer.get_json()
    assert body["file_state"] == "refused"
    assert body["upstream_refusal"] == {"code": error["code"], "message": error["message"]}
    assert str(error["code"]) in body["file_message"]
    shown = client.get(f"/api/v1/uploads/{up['id']}", headers=auth).get_json()
    assert shown["file_state"] == "refused"
    # The URL still takes a good file; Cloudflare's success notification clears the refusal.
    send_file(up)
    notified = client.post(
        "/hooks/cloudflare",
        json={"imageId": up["image_id"], "success": True, "errors": []},
        headers={"cf-webhook-auth": CF_SECRET},
    )
    assert notified.status_code == 202
    assert load_upload(app, up["id"]).upstream_refusal is None
    answer = _complete(client, auth, up)
    assert answer.status_code == 200
    body = answer.get_json()
    assert body["file_state"] == "received" and body["upstream_refusal"] is None


def test_a_forged_notification_cannot_record_a_refusal(inline):
    app, client, auth = inline
    up = create_upload(client, auth)
    body = {"imageId": up["image_id"], "success": False, "errors": [{"code": 5413}]}
    assert client.post("/hooks/cloudflare", json=body).status_code == 401
    assert load_upload(app, up["id"]).upstream_refusal is None

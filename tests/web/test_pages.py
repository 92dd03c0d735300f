"""The server-rendered pages: access rules, the gallery's scope and paging, the admin page."""

from __future__ import annotations

import re

import pytest

from broker.platform.db import db
from broker.webhooks.models import WebhookDelivery
from tests.factories import add_webhook_endpoint, create_upload, csrf_token, send_file


@pytest.fixture
def two_users(make_user):
    return make_user("alice"), make_user("mallory")


@pytest.mark.parametrize("path", ["/upload", "/gallery", "/gallery/abc", "/admin"])
def test_pages_need_login(client, path):
    response = client.get(path)
    assert response.status_code == 302
    assert "/auth/login" in response.headers["Location"]


def test_landing_redirects_signed_in_users_to_upload(client, make_user, login):
    make_user("alice")
    assert client.get("/").status_code == 200
    login(client, "alice")
    assert client.get("/").headers["Location"].endswith("/upload")


def test_upload_page_has_csrf_meta_and_module_script_only(client, make_user, login):
    make_user("alice")
    login(client, "alice")
    page = client.get("/upload").get_data(as_text=True)
    assert re.search(r'<meta name="csrf-token" content="[^"]+">', page)
    assert '<script type="module" src="/static/js/upload.js">' in page
    assert re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page) is None  # no inline script


def test_gallery_lists_only_own_pending_and_ready_uploads(app, client, two_users, login, bearer):
    alice, mallory = two_users
    mine = create_upload(client, bearer(app, alice))["id"]
    gone = create_upload(client, bearer(app, alice))["id"]
    theirs = create_upload(client, bearer(app, mallory))["id"]
    assert client.delete(f"/api/v1/uploads/{gone}", headers=bearer(app, alice)).status_code == 200

    login(client, "alice")
    # Drafts waiting for a file are kept apart from the images, and counted.
    images = client.get("/gallery").get_data(as_text=True)
    assert f'data-upload-id="{mine}"' not in images
    assert re.search(r"Waiting for a file <span class=\"count\">1</span>", images)
    page = client.get("/gallery?show=drafts").get_data(as_text=True)
    assert f'data-upload-id="{mine}"' in page
    assert f'data-upload-id="{gone}"' not in page
    assert f'data-upload-id="{theirs}"' not in page
    assert client.get("/gallery?show=everything").status_code == 400
    assert client.get(f"/gallery/{mine}").status_code == 200
    assert client.get(f"/gallery/{theirs}").status_code == 404


def test_gallery_pages_with_a_cursor_and_refuses_a_forged_one(make_app, make_user, login, bearer):
    from broker.web import GALLERY_PAGE_SIZE

    app = make_app(MAX_PENDING_UPLOADS=GALLERY_PAGE_SIZE + 5)
    client = app.test_client()
    user = make_user("alice")
    headers = bearer(app, user)
    ids = [create_upload(client, headers)["id"] for _ in range(GALLERY_PAGE_SIZE + 1)]
    login(client, "alice")
    first = client.get("/gallery?show=drafts").get_data(as_text=True)
    assert first.count("data-upload-id=") == GALLERY_PAGE_SIZE
    assert f'data-upload-id="{ids[-1]}"' in first  # newest first
    older = re.search(r'href="(/gallery\?show=drafts&amp;before=[^"]+)" rel="next"', first)
    assert older
    second = client.get(older.group(1).replace("&amp;", "&")).get_data(as_text=True)
    assert second.count("data-upload-id=") == 1
    assert f'data-upload-id="{ids[0]}"' in second
    assert client.get("/gallery?before=not-a-cursor").status_code == 400


def test_admin_page_is_for_admins_only(client, make_user, login):
    make_user("alice")
    login(client, "alice")
    refused = client.get("/admin")
    assert refused.status_code == 403
    # The page says how an administrator is made (the command of broker/auth/cli.py).
    assert "flask --app broker users create NAME --admin" in refused.get_data(as_text=True)


def test_drafts_are_discarded_in_one_action(app, client, make_user, login, bearer):
    alice, mallory = make_user("alice"), make_user("mallory")
    drafts = [create_upload(client, bearer(app, alice))["id"] for _ in range(3)]
    theirs = create_upload(client, bearer(app, mallory))["id"]
    login(client, "alice")
    page = client.get("/gallery?show=drafts").get_data(as_text=True)
    assert "Discard all 3 drafts" in page
    # A page still sending a file keeps its draft (`keep`); the rest go, with the CSRF token.
    assert client.post("/gallery/drafts/discard", json={"keep": [drafts[0]]}).status_code == 403
    answer = client.post(
        "/gallery/drafts/discard",
        json={"keep": [drafts[0]]},
        headers={"X-CSRFToken": csrf_token(client)},
    )
    assert answer.status_code == 200 and answer.get_json() == {"discarded": 2}
    statuses = {
        i: client.get(f"/api/v1/uploads/{i}", headers=bearer(app, alice)).get_json()["status"]
        for i in drafts
    }
    assert statuses == {drafts[0]: "pending", drafts[1]: "deleted", drafts[2]: "deleted"}
    form = client.post("/gallery/drafts/discard", data={"csrf_token": csrf_token(client)})
    assert form.status_code == 302 and "show=drafts" in form.headers["Location"]
    after = client.get("/gallery?show=drafts").get_data(as_text=True)
    assert "No drafts are waiting for a file." in after
    assert (
        client.get(f"/api/v1/uploads/{theirs}", headers=bearer(app, mallory)).get_json()["status"]
        == "pending"
    )


def test_detail_page_shows_facts_variants_and_a_draft_is_not_uploaded(
    app, client, make_user, login, bearer
):
    user = make_user("alice")
    headers = bearer(app, user)
    facts = {
        "name": "harbour.png",
        "type": "PNG",
        "bytes": 123456,
        "width": 640,
        "height": 480,
        "animated": False,
    }
    draft = create_upload(client, headers, metadata={"file": facts})["id"]
    login(client, "alice")
    page = client.get(f"/gallery/{draft}").get_data(as_text=True)
    assert "Uploaded" not in page and "waiting for a file" in page
    assert "<h1>harbour.png" in page
    assert "640 \u00d7 480 px" in page and "123.5 kB" in page and ">PNG<" in page
    assert re.search(r"Link expires</dt><dd>\d{4}-\d\d-\d\d \d\d:\d\d UTC", page)
    # An animated GIF is said to be shown as a still where the image service (the emulator) does.
    gif = {"type": "GIF", "animated": True}
    animated = create_upload(client, headers, metadata={"file": gif})
    send_file(animated, "GIF")
    assert (
        client.post(f"/api/v1/uploads/{animated['id']}/complete", headers=headers).get_json()[
            "status"
        ]
        == "ready"
    )
    assert "first frame only" in client.get(f"/gallery/{animated['id']}").get_data(as_text=True)
    # Whatever an app put under `file` is shown only when it has the right types.
    bad = create_upload(client, headers, metadata={"file": {"width": "<b>", "bytes": True}})
    shown = client.get(f"/gallery/{bad['id']}").get_data(as_text=True)
    assert "Dimensions" not in shown and "<b>" not in shown


def test_admin_sees_deliveries_and_redelivers_with_csrf(make_app, make_user, login, bearer):
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    client = app.test_client()
    make_user("root", is_admin=True)
    alice = make_user("alice")
    add_webhook_endpoint(app, "http://127.0.0.1:9/hook")
    upload_id = create_upload(client, bearer(app, alice))["id"]
    assert (
        client.delete(f"/api/v1/uploads/{upload_id}", headers=bearer(app, alice)).status_code == 200
    )
    with app.app_context():
        delivery = db.session.scalars(db.select(WebhookDelivery)).one()
        delivery.status, delivery.attempts = "failed", 8
        db.session.commit()
        delivery_id = delivery.id

    login(client, "root")
    page = client.get("/admin").get_data(as_text=True)
    assert "http://127.0.0.1:9/hook" in page
    assert f'data-delivery-id="{delivery_id}"' in page and "upload.deleted" in page

    refused = client.post(f"/admin/deliveries/{delivery_id}/redeliver")
    assert refused.status_code in (400, 403)
    token = csrf_token(client)
    done = client.post(f"/admin/deliveries/{delivery_id}/redeliver", data={"csrf_token": token})
    assert done.status_code == 302
    with app.app_context():
        again = db.session.get(WebhookDelivery, delivery_id)
        assert (again.status, again.attempts) == ("pending", 0)
    assert (
        client.post("/admin/deliveries/999999/redeliver", data={"csrf_token": token}).status_code
        == 404
    )


def test_discarding_drafts_while_the_image_service_fails_says_so(
    app, client, make_user, login, bearer, emulator
):
    """Cloudflare failing mid-discard is a 502 in the API's error shape (a flash for the form),
    never a 500; the drafts not yet deleted stay waiting, and a later try discards them."""
    alice = make_user("alice")
    drafts = [create_upload(client, bearer(app, alice))["id"] for _ in range(2)]
    login(client, "alice")
    emulator.inject_fault("image_delete", status=500)
    # What the page's fetch sends (static/js/links.js).
    headers = {"X-CSRFToken": csrf_token(client), "Accept": "application/json"}
    answer = client.post("/gallery/drafts/discard", json={}, headers=headers)
    assert answer.status_code == 502 and answer.headers["Retry-After"] == "5"
    error = answer.get_json()["error"]
    assert error["code"] == "upstream_unavailable" and "0 drafts discarded" in error["message"]
    form = client.post("/gallery/drafts/discard", data={"csrf_token": csrf_token(client)})
    assert form.status_code == 302 and "show=drafts" in form.headers["Location"]
    page = client.get("/gallery?show=drafts").get_data(as_text=True)
    assert "the image service is not answering" in page and "Discard all 2 drafts" in page
    emulator.clear_faults()
    again = client.post("/gallery/drafts/discard", json={}, headers=headers)
    assert again.status_code == 200 and again.get_json() == {"discarded": 2}
    statuses = {
        client.get(f"/api/v1/uploads/{i}", headers=bearer(app, alice)).get_json()["status"]
        for i in drafts
    }
    assert statuses == {"deleted"}


def test_refused_and_expired_uploads_have_their_own_tabs(app, client, two_users, login, bearer):
    from broker.uploads.models import Upload, UploadStatus

    alice, _ = two_users
    ids = [create_upload(client, bearer(app, alice))["id"] for _ in range(3)]
    with app.app_context():
        refused, expired = db.session.get(Upload, ids[0]), db.session.get(Upload, ids[1])
        refused.status, refused.reject_reason = UploadStatus.REJECTED, "image is 4000x3000"
        expired.status = UploadStatus.EXPIRED
        db.session.commit()

    login(client, "alice")
    images = client.get("/gallery").get_data(as_text=True)
    assert re.search(r'show=refused">Refused <span class="count">1</span>', images)
    assert re.search(r'show=expired">Expired <span class="count">1</span>', images)
    page = client.get("/gallery?show=refused").get_data(as_text=True)
    assert f'data-upload-id="{ids[0]}"' in page and "Refused: image is 4000x3000" in page
    assert f'data-upload-id="{ids[1]}"' not in page and f'data-upload-id="{ids[2]}"' not in page
    page = client.get("/gallery?show=expired").get_data(as_text=True)
    assert f'data-upload-id="{ids[1]}"' in page and "Link expired" in page
    assert f'data-upload-id="{ids[0]}"' not in page
    # With none of them, the tabs stay out of the way.
    with app.app_context():
        for upload_id in ids[:2]:
            db.session.get(Upload, upload_id).status = UploadStatus.DELETED
        db.session.commit()
    assert "show=refused" not in client.get("/gallery").get_data(as_text=True)

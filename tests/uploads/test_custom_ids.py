"""Custom image ids: free again once their upload is deleted, expired or rejected, as they are
at Cloudflare; and probing another user's ids tells no more than Cloudflare's own answer."""

from __future__ import annotations

from datetime import timedelta

from broker import worker
from broker.platform.db import utcnow
from tests.factories import create_upload, load_upload, post_upload, send_file, upload_rows

URL = "/api/v1/uploads"


def _custom(client, auth, image_id: str, **body):
    return post_upload(client, auth, id=image_id, require_signed_urls=False, **body)


def test_a_deleted_uploads_custom_id_can_be_used_again(app, client, alice, emulator):
    _, auth = alice
    first = _custom(client, auth, "reuse/deleted").get_json()
    send_file(first)
    assert client.delete(f"{URL}/{first['id']}", headers=auth).status_code == 200
    again = _custom(client, auth, "reuse/deleted")
    assert again.status_code == 201, again.get_json()
    second = again.get_json()
    assert second["image_id"] == "reuse/deleted" and second["id"] != first["id"]
    assert load_upload(app, first["id"]).status == "deleted"
    assert emulator.emulator.store.get_image("reuse/deleted").draft
    # While the new one is live the id is taken, as at Cloudflare.
    taken = _custom(client, auth, "reuse/deleted")
    assert (taken.status_code, taken.get_json()["error"]["code"]) == (409, "image_id_taken")


def test_an_expired_uploads_custom_id_can_be_used_again(app, client, alice, emulator):
    _, auth = alice
    first = _custom(client, auth, "reuse/expired", expires_in=120).get_json()
    worker.run_once(app, now=utcnow() + timedelta(hours=1))
    assert load_upload(app, first["id"]).status == "expired"
    assert emulator.emulator.store.get_image("reuse/expired") is None
    again = _custom(client, auth, "reuse/expired")
    assert again.status_code == 201, again.get_json()
    assert {row.status for row in upload_rows(app)} == {"expired", "pending"}


def test_a_rejected_uploads_custom_id_can_be_used_again(
    make_app, make_user, bearer, tmp_path, emulator
):
    profiles = tmp_path / "profiles.toml"
    profiles.write_text("[profiles.avatar]\nmax_width = 512\n", encoding="utf-8")
    app = make_app(UPLOAD_PROFILES=str(profiles))
    client = app.test_client()
    auth = bearer(app, make_user("alice"))
    first = _custom(client, auth, "reuse/rejected", profile="avatar").get_json()
    send_file(first, size=(1024, 64))
    client.post(f"{URL}/{first['id']}/complete", headers=auth)
    worker.run_once(app, now=utcnow() + timedelta(seconds=3))
    assert load_upload(app, first["id"]).status == "rejected"
    again = _custom(client, auth, "reuse/rejected", profile="avatar")
    assert again.status_code == 201, again.get_json()


def test_probing_another_users_custom_id_tells_no_more_than_cloudflare(
    app, client, make_user, bearer, emulator
):
    alice = bearer(app, make_user("alice"))
    bob = bearer(app, make_user("bob"))
    create_upload(client, bob, id="reuse/theirs", require_signed_urls=False)
    create_upload(client, bob, id="reuse/stale", require_signed_urls=False)
    # Bob's banner vanishes upstream without the broker seeing it: Cloudflare would give the
    # id out again, but the broker's row still holds it.
    with emulator.client() as cf:
        assert cf.request("DELETE", "/v1/reuse/stale").status_code == 200
    held_upstream = _custom(client, alice, "reuse/theirs")
    held_here = _custom(client, alice, "reuse/stale")
    assert held_upstream.status_code == held_here.status_code == 409
    assert held_upstream.get_json() == held_here.get_json()
    assert held_here.get_json()["error"]["code"] == "image_id_taken"
    with emulator.client() as cf:
        assert cf.get("/v1/reuse/stale").status_code == 404  # Alice's draft was discarded
    assert len(upload_rows(app)) == 2

"""Minting signed delivery URLs (`/api/v1/images/…`) end to end against the emulator: each
variant's size, tampering and expiry refused, who may see what, bad requests, the batch form,
unsigned URLs for public images and never-signed variants."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import requests
from flask import Flask
from PIL import Image as PILImage

from broker.emulator.testing import EmulatorServer
from broker.images import keys, variants
from broker.platform.db import db, utcnow
from broker.uploads.api import retry_after
from broker.uploads.models import Upload
from tests.factories import (
    create_user,
    fetch,
    issue_token,
    mint_url,
    upload_image,
)


def test_private_image_is_served_through_minted_urls_at_each_variants_size(
    broker: Flask, http: requests.Session, emulator: EmulatorServer
) -> None:
    user_id = create_user(broker, "alice").id
    auth = issue_token(broker, "alice")
    upload_id = upload_image(broker, user_id)
    sizes = {}
    for variant in ("thumb", "medium"):
        response = mint_url(broker, auth, upload_id, variant)
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        url = body["url"]
        assert url.startswith(f"{emulator.url}/{emulator.account_hash}/")
        assert re.search(rf"/{variant}\?exp=\d+&sig=[0-9a-f]{{64}}$", url)
        exp = int(parse_qs(urlsplit(url).query)["exp"][0])
        assert exp % 300 == 0
        assert body["expires_at"].startswith(str(utcnow().year))
        served = fetch(http, url)
        assert served.status_code == 200
        sizes[variant] = PILImage.open(io.BytesIO(served.content)).size
    assert sizes == {"thumb": (256, 256), "medium": (1024, 512)}
    # Without a signature the emulator refuses the private image.
    unsigned = url.split("?")[0]
    assert fetch(http, unsigned).status_code == 403


def test_tampered_expired_and_foreign_key_urls_are_refused(
    broker: Flask, http: requests.Session, emulator: EmulatorServer
) -> None:
    user_id = create_user(broker, "alice").id
    auth = issue_token(broker, "alice")
    upload_id = upload_image(broker, user_id)
    url = mint_url(broker, auth, upload_id, "thumb", ttl=60).get_json()["url"]
    assert fetch(http, url).status_code == 200
    path, query = url.split("?")
    exp, sig = (part.split("=")[1] for part in query.split("&"))
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    other_id = upload_image(broker, user_id)
    with broker.app_context():
        image_id = db.session.get(Upload, upload_id).image_id
        other_image = db.session.get(Upload, other_id).image_id
    tampered = [
        f"{path}?exp={exp}&sig={flipped}",
        f"{path}?exp={int(exp) + 300}&sig={sig}",
        f"{path.rsplit('/', 1)[0]}/medium?exp={exp}&sig={sig}",
        url.replace(image_id, other_image),
        f"{path}?exp={exp}",
    ]
    for bad in tampered:
        refused = fetch(http, bad)
        assert refused.status_code == 403, bad
        assert refused.headers["Cf-Resized"] == "err=9425"
    # A URL signed with a key the account does not hold.
    with broker.app_context():
        forged = keys.Signer("default", "x").signature(f"{urlsplit(path).path}?exp={exp}")
    assert fetch(http, f"{path}?exp={exp}&sig={forged}").status_code == 403
    # Expired: move the emulator's clock past exp.
    emulator.advance(int(exp) - utcnow().timestamp() + 1)
    assert fetch(http, url).status_code == 403


def test_another_users_image_is_404_on_every_route(broker: Flask) -> None:
    owner_id = create_user(broker, "alice").id
    mallory = issue_token(broker, create_user(broker, "mallory"))
    admin = issue_token(broker, create_user(broker, "root", is_admin=True))
    upload_id = upload_image(broker, owner_id)
    client = broker.test_client()

    assert mint_url(broker, mallory, upload_id, "thumb").status_code == 404
    batch = client.post(
        "/api/v1/images/urls",
        json={"items": [{"id": upload_id, "variant": "thumb"}]},
        headers=mallory,
    )
    assert batch.status_code == 200
    assert batch.get_json()["items"] == [
        {
            "id": upload_id,
            "variant": "thumb",
            "url": None,
            "expires_at": None,
            "error": {"code": "not_found", "message": "No such image.", "details": None},
        }
    ]
    assert client.get(f"/i/{upload_id}/thumb", headers=mallory).status_code == 404
    # An admin may see it.
    assert mint_url(broker, admin, upload_id, "thumb").status_code == 200
    assert client.get(f"/i/{upload_id}/thumb", headers=admin).status_code == 302
    # Unknown ids look the same as other people's.
    assert mint_url(broker, mallory, "nope", "thumb").status_code == 404


def test_bad_requests(broker: Flask) -> None:
    user_id = create_user(broker, "alice").id
    auth = issue_token(broker, "alice")
    ready = upload_image(broker, user_id)
    pending = upload_image(broker, user_id, status="pending")
    deleted = upload_image(broker, user_id, status="deleted")
    client = broker.test_client()

    unknown = mint_url(broker, auth, ready, "huge")
    assert unknown.status_code == 422
    assert unknown.get_json()["error"]["code"] == "unknown_variant"
    # The answer lists the variants that do exist, so the client can pick one.
    with broker.app_context():
        valid = sorted(variants.known_variants())
    assert (
        len(valid) > 1
        and f"use one of: {', '.join(valid)}." in unknown.get_json()["error"]["message"]
    )
    assert mint_url(broker, auth, ready, "").status_code == 422
    missing = client.get(f"/api/v1/images/{ready}/url", headers=auth)
    assert missing.status_code == 422
    not_ready = mint_url(broker, auth, pending, "thumb")
    assert not_ready.status_code == 409
    assert not_ready.get_json()["error"]["details"] == {"status": "pending"}
    assert mint_url(broker, auth, deleted, "thumb").status_code == 404
    for ttl in (0, -1, 604801, "abc"):
        assert mint_url(broker, auth, ready, "thumb", ttl=ttl).status_code == 422, ttl
    assert client.get(f"/api/v1/images/{ready}/url?variant=thumb").status_code == 401

    too_many = [{"id": ready, "variant": "thumb"}] * 1001
    for body in ({"items": too_many}, {"items": []}, {"items": [{"id": ready}]}):
        response = client.post("/api/v1/images/urls", json=body, headers=auth)
        assert response.status_code == 422
    bad_variant = client.post(
        "/api/v1/images/urls",
        json={"items": [{"id": ready, "variant": "thumb"}, {"id": ready, "variant": "x"}]},
        headers=auth,
    )
    assert bad_variant.status_code == 422
    assert bad_variant.get_json()["error"]["details"][0]["field"] == "items.1.variant"
    mixed = client.post(
        "/api/v1/images/urls",
        json={
            "items": [
                {"id": ready, "variant": "thumb"},
                {"id": pending, "variant": "thumb"},
                {"id": deleted, "variant": "medium"},
            ],
            "ttl": 7 * 86400,
        },
        headers=auth,
    )
    assert mixed.status_code == 200
    items = mixed.get_json()["items"]
    assert items[0]["url"] and items[0]["error"] is None
    assert [i["error"]["code"] for i in items[1:]] == ["not_ready", "not_found"]
    assert client.get(f"/i/{pending}/thumb", headers=auth).status_code == 409
    assert client.get(f"/i/{ready}/nope", headers=auth).status_code == 404
    assert client.get(f"/i/{ready}/thumb").status_code == 401


def test_batch_mints_every_pair_in_order_with_one_expiry(
    broker: Flask, http: requests.Session
) -> None:
    user_id = create_user(broker, "alice").id
    auth = issue_token(broker, "alice")
    ids = [upload_image(broker, user_id, size=(300, 200)) for _ in range(3)]
    items = [{"id": i, "variant": v} for i in ids for v in ("thumb", "medium")]
    response = broker.test_client().post(
        "/api/v1/images/urls", json={"items": items, "ttl": 120}, headers=auth
    )
    assert response.status_code == 200
    results = response.get_json()["items"]
    assert [(r["id"], r["variant"]) for r in results] == [(i["id"], i["variant"]) for i in items]
    assert len({r["expires_at"] for r in results}) == 1
    for r in results:
        assert fetch(http, r["url"]).status_code == 200
    single = mint_url(broker, auth, ids[0], "thumb", ttl=120).get_json()
    assert single["url"] == results[0]["url"]  # same bucket, same URL


def test_public_image_and_never_signed_variant_get_plain_urls(
    broker: Flask, http: requests.Session
) -> None:
    user_id = create_user(broker, "alice").id
    auth = issue_token(broker, "alice")
    public = upload_image(broker, user_id, private=False, size=(100, 100))
    private = upload_image(broker, user_id, size=(100, 100))
    for upload_id, variant in ((public, "thumb"), (private, "avatar")):
        body = mint_url(broker, auth, upload_id, variant).get_json()
        assert "?" not in body["url"] and body["expires_at"] is None
        served = fetch(http, body["url"])
        assert served.status_code == 200
    assert PILImage.open(io.BytesIO(served.content)).size == (64, 64)


def test_images_without_stored_variants_use_the_configured_delivery_base(
    broker: Flask, http: requests.Session, emulator: EmulatorServer
) -> None:
    user_id = create_user(broker, "alice").id
    auth = issue_token(broker, "alice")
    upload_id = upload_image(broker, user_id, stored_variants=False)
    url = mint_url(broker, auth, upload_id, "thumb").get_json()["url"]
    assert url.startswith(f"{emulator.url}/{emulator.account_hash}/")
    assert fetch(http, url).status_code == 200


def test_no_signing_key_answers_503(make_app: Callable[..., Flask]) -> None:
    app = make_app()  # on this test's emulator, keys never synced: the broker holds none
    user_id = create_user(app, "alice").id
    auth = issue_token(app, "alice")
    upload_id = upload_image(app, user_id)
    response = mint_url(app, auth, upload_id, "thumb")
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "no_signing_key"


def test_a_pending_image_says_when_to_ask_again_like_complete(broker: Flask) -> None:
    """409 `not_ready` for a pending image carries `/complete`'s growing Retry-After, on the
    API and on `/i/`; an expired or rejected image's answer, which will not change, has none."""
    user_id = create_user(broker, "alice").id
    auth = issue_token(broker, "alice")
    pending = upload_image(broker, user_id, status="pending")
    client = broker.test_client()

    def waits() -> list[str | None]:
        answers = [
            mint_url(broker, auth, pending, "thumb"),
            client.get(f"/i/{pending}/thumb", headers=auth),
        ]
        assert [a.status_code for a in answers] == [409, 409]
        assert answers[0].get_json()["error"]["code"] == "not_ready"
        return [a.headers.get("Retry-After") for a in answers]

    assert waits() == ["1", "1"]
    with broker.app_context():
        upload = db.session.get(Upload, pending)
        assert upload is not None
        upload.check_attempts = 4  # Cloudflare said "no file yet" four times
        db.session.commit()
        expected = str(retry_after(upload, utcnow()))
    assert expected == "8" and waits() == [expected, expected]

    for final in ("expired", "rejected"):
        upload_id = upload_image(broker, user_id, status=final)
        refused = mint_url(broker, auth, upload_id, "thumb")
        assert refused.status_code == 409 and "Retry-After" not in refused.headers

"""Signed delivery URLs end to end: keys, variants, minting API, `/i/` redirect, the emulator."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import sqlalchemy as sa
from flask import Flask
from PIL import Image as PILImage

from broker.auth import tokens
from broker.auth.models import User
from broker.emulator.testing import EmulatorServer
from broker.images import keys
from broker.images.models import SigningKey
from broker.platform.db import db, utcnow
from broker.uploads.models import Upload
from broker.upstream.cloudflare import get_client

VARIANTS = "thumb:256x256:cover,medium:1024x1024:scale-down,avatar:64x64:cover:never-signed"


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[EmulatorServer]:
    """A fresh emulator over real HTTP."""
    with EmulatorServer(tmp_path / "emulator") as server:
        yield server


@pytest.fixture
def http() -> Iterator[requests.Session]:
    """A plain HTTP session, as a browser fetching images."""
    with requests.Session() as session:
        yield session


@pytest.fixture
def broker(make_app: Callable[..., Flask], emulator: EmulatorServer) -> Flask:
    """The broker pointed at the emulator, with its variants and keys synced."""
    app = make_app(
        CLOUDFLARE_API_BASE=emulator.api_base,
        CLOUDFLARE_ACCOUNT_ID=emulator.account_id,
        CLOUDFLARE_API_TOKEN=emulator.api_token,
        CLOUDFLARE_ACCOUNT_HASH=emulator.account_hash,
        CLOUDFLARE_DELIVERY_BASE=emulator.url,
        VARIANTS=VARIANTS,
    )
    runner = app.test_cli_runner()
    for args in (["variants", "sync"], ["keys", "sync"]):
        result = runner.invoke(args=args)
        assert result.exit_code == 0, result.output
    return app


def make_user(app: Flask, name: str, *, admin: bool = False) -> tuple[int, str]:
    """Create a user and a bearer token; return (user id, token secret)."""
    with app.app_context():
        user = User(username=name, username_key=name, password_hash="x", is_admin=admin)
        db.session.add(user)
        db.session.flush()
        secret = tokens.issue(db.session, user, "test").secret
        db.session.commit()
        return user.id, secret


def png(width: int, height: int) -> bytes:
    """Return a PNG of the given size."""
    out = io.BytesIO()
    PILImage.new("RGB", (width, height), (200, 30, 90)).save(out, "PNG")
    return out.getvalue()


def make_image(
    app: Flask,
    user_id: int,
    *,
    private: bool = True,
    size: tuple[int, int] = (2000, 1000),
    status: str = "ready",
    stored_variants: bool = True,
) -> str:
    """Upload an image to the emulator and record it as the user's upload; return its id."""
    with app.app_context():
        image = get_client().upload_image(file=png(*size), require_signed_urls=private)
        upload = Upload(
            user_id=user_id,
            image_id=image.id,
            status=status,
            require_signed_urls=private,
            expires_at=utcnow() + timedelta(minutes=30),
            variants=image.variants if stored_variants else None,
        )
        db.session.add(upload)
        db.session.commit()
        return upload.id


def auth(secret: str) -> dict[str, str]:
    """Return the bearer header of a token."""
    return {"Authorization": f"Bearer {secret}"}


def mint(app: Flask, secret: str, upload_id: str, variant: str, **params: Any) -> Any:
    """Ask the API for one URL; return the test response."""
    return app.test_client().get(
        f"/api/v1/images/{upload_id}/url",
        query_string={"variant": variant, **params},
        headers=auth(secret),
    )


def fetch(http: requests.Session, url: str) -> requests.Response:
    """Fetch a delivery URL like a browser would."""
    return http.get(url, timeout=10)


def test_private_image_is_served_through_minted_urls_at_each_variants_size(
    broker: Flask, http: requests.Session, emulator: EmulatorServer
) -> None:
    user_id, secret = make_user(broker, "alice")
    upload_id = make_image(broker, user_id)
    sizes = {}
    for variant in ("thumb", "medium"):
        response = mint(broker, secret, upload_id, variant)
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
    user_id, secret = make_user(broker, "alice")
    upload_id = make_image(broker, user_id)
    url = mint(broker, secret, upload_id, "thumb", ttl=60).get_json()["url"]
    assert fetch(http, url).status_code == 200
    path, query = url.split("?")
    exp, sig = (part.split("=")[1] for part in query.split("&"))
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    other_id = make_image(broker, user_id)
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


def test_rotation_signs_with_the_new_key_and_old_urls_work_until_the_old_key_is_deleted(
    broker: Flask, http: requests.Session, emulator: EmulatorServer
) -> None:
    user_id, secret = make_user(broker, "alice")
    upload_id = make_image(broker, user_id)
    old_url = mint(broker, secret, upload_id, "thumb").get_json()["url"]
    with broker.app_context():
        old_key = keys.active_key(db.session)
        assert old_key is not None
        old_name = old_key.name
    result = broker.test_cli_runner().invoke(args=["keys", "rotate", "--grace", "600"])
    assert result.exit_code == 0, result.output
    with broker.app_context():
        new_key = keys.active_key(db.session)
        assert new_key is not None and new_key.name != old_name
        assert new_key.value not in result.output
        new_signer = keys.Signer(new_key.name, new_key.value)
        old = db.session.scalars(sa.select(SigningKey).where(SigningKey.name == old_name)).one()
        assert old.retired_at is not None
    upstream = {name for name, _ in emulator.emulator.store.list_keys()}
    assert {old_name, new_key.name} <= upstream

    new_url = mint(broker, secret, upload_id, "thumb").get_json()["url"]
    parts = urlsplit(new_url)
    exp = parts.query.split("&")[0]
    assert new_url.endswith("sig=" + new_signer.signature(f"{parts.path}?{exp}"))
    assert new_url != old_url
    assert fetch(http, old_url).status_code == 200
    assert fetch(http, new_url).status_code == 200

    listed = broker.test_cli_runner().invoke(args=["keys", "list"])
    assert "signing" in listed.output and "retired, deleted in" in listed.output
    assert old.value not in listed.output and new_key.value not in listed.output

    # Within the grace period a sync keeps the old key; after it, the key is deleted.
    with broker.app_context():
        assert keys.sync_keys(db.session, get_client()).purged == []
        later = utcnow() + timedelta(seconds=601)
        assert keys.sync_keys(db.session, get_client(), now=later).purged == [old_name]
        db.session.commit()
    assert old_name not in {name for name, _ in emulator.emulator.store.list_keys()}
    assert fetch(http, old_url).status_code == 403
    assert fetch(http, new_url).status_code == 200


def test_sync_mirrors_keys_changed_upstream(broker: Flask, emulator: EmulatorServer) -> None:
    store = emulator.emulator.store
    store.put_key("extra1")
    with broker.app_context():
        result = keys.sync_keys(db.session, get_client())
        db.session.commit()
        assert result.added == ["extra1"]
        assert keys.active_key(db.session).name == "extra1"
    store.delete_key("extra1")
    with broker.app_context():
        assert keys.sync_keys(db.session, get_client()).removed == ["extra1"]
        db.session.commit()
        assert keys.active_key(db.session).name == "default"
        assert keys.sync_keys(db.session, get_client()).changed is False


def test_another_users_image_is_404_on_every_route(broker: Flask) -> None:
    owner_id, _ = make_user(broker, "alice")
    _, mallory = make_user(broker, "mallory")
    _, admin = make_user(broker, "root", admin=True)
    upload_id = make_image(broker, owner_id)
    client = broker.test_client()

    assert mint(broker, mallory, upload_id, "thumb").status_code == 404
    batch = client.post(
        "/api/v1/images/urls",
        json={"items": [{"id": upload_id, "variant": "thumb"}]},
        headers=auth(mallory),
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
    assert client.get(f"/i/{upload_id}/thumb", headers=auth(mallory)).status_code == 404
    # An admin may see it.
    assert mint(broker, admin, upload_id, "thumb").status_code == 200
    assert client.get(f"/i/{upload_id}/thumb", headers=auth(admin)).status_code == 302
    # Unknown ids look the same as other people's.
    assert mint(broker, mallory, "nope", "thumb").status_code == 404


def test_bad_requests(broker: Flask) -> None:
    user_id, secret = make_user(broker, "alice")
    ready = make_image(broker, user_id)
    pending = make_image(broker, user_id, status="pending")
    deleted = make_image(broker, user_id, status="deleted")
    client = broker.test_client()

    unknown = mint(broker, secret, ready, "huge")
    assert unknown.status_code == 422
    assert unknown.get_json()["error"]["code"] == "unknown_variant"
    assert mint(broker, secret, ready, "").status_code == 422
    missing = client.get(f"/api/v1/images/{ready}/url", headers=auth(secret))
    assert missing.status_code == 422
    not_ready = mint(broker, secret, pending, "thumb")
    assert not_ready.status_code == 409
    assert not_ready.get_json()["error"]["details"] == {"status": "pending"}
    assert mint(broker, secret, deleted, "thumb").status_code == 404
    for ttl in (0, -1, 604801, "abc"):
        assert mint(broker, secret, ready, "thumb", ttl=ttl).status_code == 422, ttl
    assert client.get(f"/api/v1/images/{ready}/url?variant=thumb").status_code == 401

    too_many = [{"id": ready, "variant": "thumb"}] * 1001
    for body in ({"items": too_many}, {"items": []}, {"items": [{"id": ready}]}):
        response = client.post("/api/v1/images/urls", json=body, headers=auth(secret))
        assert response.status_code == 422
    bad_variant = client.post(
        "/api/v1/images/urls",
        json={"items": [{"id": ready, "variant": "thumb"}, {"id": ready, "variant": "x"}]},
        headers=auth(secret),
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
        headers=auth(secret),
    )
    assert mixed.status_code == 200
    items = mixed.get_json()["items"]
    assert items[0]["url"] and items[0]["error"] is None
    assert [i["error"]["code"] for i in items[1:]] == ["not_ready", "not_found"]
    assert client.get(f"/i/{pending}/thumb", headers=auth(secret)).status_code == 409
    assert client.get(f"/i/{ready}/nope", headers=auth(secret)).status_code == 404
    assert client.get(f"/i/{ready}/thumb").status_code == 401


def test_batch_mints_every_pair_in_order_with_one_expiry(
    broker: Flask, http: requests.Session
) -> None:
    user_id, secret = make_user(broker, "alice")
    ids = [make_image(broker, user_id, size=(300, 200)) for _ in range(3)]
    items = [{"id": i, "variant": v} for i in ids for v in ("thumb", "medium")]
    response = broker.test_client().post(
        "/api/v1/images/urls", json={"items": items, "ttl": 120}, headers=auth(secret)
    )
    assert response.status_code == 200
    results = response.get_json()["items"]
    assert [(r["id"], r["variant"]) for r in results] == [(i["id"], i["variant"]) for i in items]
    assert len({r["expires_at"] for r in results}) == 1
    for r in results:
        assert fetch(http, r["url"]).status_code == 200
    single = mint(broker, secret, ids[0], "thumb", ttl=120).get_json()
    assert single["url"] == results[0]["url"]  # same bucket, same URL


def test_public_image_and_never_signed_variant_get_plain_urls(
    broker: Flask, http: requests.Session
) -> None:
    user_id, secret = make_user(broker, "alice")
    public = make_image(broker, user_id, private=False, size=(100, 100))
    private = make_image(broker, user_id, size=(100, 100))
    for upload_id, variant in ((public, "thumb"), (private, "avatar")):
        body = mint(broker, secret, upload_id, variant).get_json()
        assert "?" not in body["url"] and body["expires_at"] is None
        served = fetch(http, body["url"])
        assert served.status_code == 200
    assert PILImage.open(io.BytesIO(served.content)).size == (64, 64)


def test_images_without_stored_variants_use_the_configured_delivery_base(
    broker: Flask, http: requests.Session, emulator: EmulatorServer
) -> None:
    user_id, secret = make_user(broker, "alice")
    upload_id = make_image(broker, user_id, stored_variants=False)
    url = mint(broker, secret, upload_id, "thumb").get_json()["url"]
    assert url.startswith(f"{emulator.url}/{emulator.account_hash}/")
    assert fetch(http, url).status_code == 200


def test_redirect_endpoint_for_session_and_bearer(broker: Flask, http: requests.Session) -> None:
    user_id, secret = make_user(broker, "alice")
    upload_id = make_image(broker, user_id, size=(500, 500))
    client = broker.test_client()
    with broker.app_context():
        session_token = db.session.get(User, user_id).session_token
    with client.session_transaction() as session:
        session["_user_id"] = session_token
        session["_fresh"] = True
    for response in (
        client.get(f"/i/{upload_id}/thumb"),
        broker.test_client().get(f"/i/{upload_id}/thumb", headers=auth(secret)),
    ):
        assert response.status_code == 302
        location = response.headers["Location"]
        exp = int(parse_qs(urlsplit(location).query)["exp"][0])
        match = re.fullmatch(r"private, max-age=(\d+)", response.headers["Cache-Control"])
        assert match
        remaining = exp - utcnow().timestamp()
        assert 0 < int(match[1]) < remaining - 60
        assert "Cookie" in response.headers["Vary"]
        served = fetch(http, location)
        assert served.status_code == 200
        assert PILImage.open(io.BytesIO(served.content)).size == (256, 256)


def test_variants_cli_syncs_and_lists(broker: Flask, emulator: EmulatorServer) -> None:
    runner = broker.test_cli_runner()
    again = runner.invoke(args=["variants", "sync"])
    assert again.exit_code == 0
    assert "thumb" in again.output and "created" not in again.output
    with broker.app_context():
        get_client().update_variant("thumb", "contain", 100, 100)
    fixed = runner.invoke(args=["variants", "sync"])
    assert "thumb                updated" in fixed.output
    listed = runner.invoke(args=["variants", "list"])
    assert "avatar" in listed.output and "never-signed" in listed.output
    upstream = runner.invoke(args=["variants", "list", "--upstream"])
    assert "public" in upstream.output and "thumb                256x256 cover" in upstream.output


def test_bad_variant_declaration_stops_start_up(make_app: Callable[..., Flask]) -> None:
    from broker.platform.config import ConfigError

    with pytest.raises(ConfigError, match="BROKER_VARIANTS"):
        make_app(VARIANTS="thumb:big")


def test_no_signing_key_answers_503(
    make_app: Callable[..., Flask], emulator: EmulatorServer
) -> None:
    app = make_app(
        CLOUDFLARE_API_BASE=emulator.api_base,
        CLOUDFLARE_ACCOUNT_ID=emulator.account_id,
        CLOUDFLARE_API_TOKEN=emulator.api_token,
        CLOUDFLARE_ACCOUNT_HASH=emulator.account_hash,
        CLOUDFLARE_DELIVERY_BASE=emulator.url,
    )
    user_id, secret = make_user(app, "alice")
    upload_id = make_image(app, user_id)
    response = mint(app, secret, upload_id, "thumb")
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "no_signing_key"


def test_dev_server_start_up_syncs_variants_and_keys(
    make_app: Callable[..., Flask], emulator: EmulatorServer
) -> None:
    from broker.devserver import prepare_upstream

    settings = {
        "CLOUDFLARE_API_BASE": emulator.api_base,
        "CLOUDFLARE_ACCOUNT_ID": emulator.account_id,
        "CLOUDFLARE_API_TOKEN": emulator.api_token,
        "CLOUDFLARE_ACCOUNT_HASH": emulator.account_hash,
    }
    app = make_app(**settings)
    with app.app_context():
        assert prepare_upstream() == ["Variants: thumb, medium; signing key default (1 new)."]
        assert keys.current_signer() is not None
    assert {"thumb", "medium"} <= {v.id for v in emulator.emulator.store.list_variants()}
    broken = make_app(**{**settings, "CLOUDFLARE_API_TOKEN": "wrong"})
    with broken.app_context():
        (line,) = prepare_upstream()
        assert "not synced" in line and "wrong" not in line


def test_redirect_session_fast_path_follows_the_login_rules(broker: Flask) -> None:
    owner_id, owner_secret = make_user(broker, "alice")
    admin_id, _ = make_user(broker, "root", admin=True)
    upload_id = make_image(broker, owner_id, size=(100, 100))

    def session_client(user_id: int) -> Any:
        client = broker.test_client()
        with broker.app_context():
            token = db.session.get(User, user_id).session_token
        with client.session_transaction() as session:
            session["_user_id"] = token
        return client

    owner = session_client(owner_id)
    assert owner.get(f"/i/{upload_id}/thumb").status_code == 302
    assert session_client(admin_id).get(f"/i/{upload_id}/thumb").status_code == 302
    assert owner.get("/i/nope/thumb").status_code == 404
    # An Authorization header is the only credential considered, even beside a good cookie.
    assert owner.get(f"/i/{upload_id}/thumb", headers=auth("brk_wrong")).status_code == 401
    assert owner.get(f"/i/{upload_id}/thumb", headers=auth(owner_secret)).status_code == 302
    with broker.app_context():
        user = db.session.get(User, owner_id)
        user.end_sessions()
        db.session.commit()
    assert owner.get(f"/i/{upload_id}/thumb").status_code == 401
    owner = session_client(owner_id)
    with broker.app_context():
        db.session.get(User, owner_id).active = False
        db.session.commit()
    assert owner.get(f"/i/{upload_id}/thumb").status_code == 401

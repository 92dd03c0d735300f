"""The official `cloudflare` SDK runs every Images method of the seed docs against the emulator."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import timedelta

import pytest
import requests
from cloudflare import Cloudflare, NotFoundError
from PIL import Image

from broker.emulator.testing import EmulatorServer, make_image


@pytest.fixture
def client(emulator: EmulatorServer) -> Iterator[Cloudflare]:
    with Cloudflare(
        api_token=emulator.api_token, base_url=f"{emulator.url}/client/v4", max_retries=0
    ) as sdk:
        yield sdk


def test_v1_images(client: Cloudflare, emulator: EmulatorServer) -> None:
    account = emulator.account_id
    png = make_image(32, 16)
    image = client.images.v1.create(
        account_id=account,
        file=("sdk.png", png, "image/png"),
        creator="user-1",
        metadata={"order": "42", "nested": {"a": "b"}},
        require_signed_urls=False,
    )
    assert image.id and image.filename == "sdk.png" and image.creator == "user-1"
    assert image.meta == {"order": "42", "nested": {"a": "b"}}
    assert image.require_signed_urls is False and image.uploaded is not None
    assert image.variants == [f"{emulator.url}/{emulator.account_hash}/{image.id}/public"]

    custom = client.images.v1.create(account_id=account, file=png, id="sdk/custom")
    assert custom.id == "sdk/custom"

    fetched = client.images.v1.get(image.id, account_id=account)
    assert fetched.id == image.id and fetched.meta == image.meta
    assert client.images.v1.get("sdk/custom", account_id=account).id == "sdk/custom"

    edited = client.images.v1.edit(
        image.id, account_id=account, metadata={"only": "this"}, require_signed_urls=True
    )
    assert edited.meta == {"only": "this"} and edited.require_signed_urls is True

    blob = client.images.v1.blobs.get(image.id, account_id=account)
    assert blob.read() == png

    with pytest.warns(DeprecationWarning):
        page = client.images.v1.list(account_id=account, per_page=10, creator="user-1")
    listed = page.result.model_extra["images"] if page.result else []  # type: ignore[index]
    assert [i["id"] for i in listed] == [image.id]
    assert page.result_info is not None and page.result_info.page == 1

    client.images.v1.delete(image.id, account_id=account)
    with pytest.raises(NotFoundError):
        client.images.v1.get(image.id, account_id=account)


def test_keys_and_stats(client: Cloudflare, emulator: EmulatorServer) -> None:
    account = emulator.account_id
    keys = client.images.v1.keys.list(account_id=account).keys
    assert keys is not None and [k.name for k in keys] == ["default"]
    updated = client.images.v1.keys.update("extra", account_id=account).keys
    assert updated is not None and [k.name for k in updated] == ["default", "extra"]
    after = client.images.v1.keys.delete("default", account_id=account).keys
    assert after is not None and [k.name for k in after] == ["extra"]
    stats = client.images.v1.stats.get(account_id=account)
    assert stats.count is not None
    assert stats.count.allowed == 100000 and stats.count.current == 0


def test_variants(client: Cloudflare, emulator: EmulatorServer) -> None:
    account = emulator.account_id
    options = {"fit": "cover", "width": 64, "height": 64, "metadata": "none"}
    created = client.images.v1.variants.create(
        account_id=account, id="hero", options=options, never_require_signed_urls=True
    )
    assert created.variant is not None and created.variant.id == "hero"
    assert created.variant.never_require_signed_urls is True

    listed = client.images.v1.variants.list(account_id=account)
    assert listed.variants is not None and listed.variants.hero is not None
    assert listed.variants.hero.options.fit == "cover"

    got = client.images.v1.variants.get("hero", account_id=account)
    assert got.variant is not None and got.variant.options.width == 64

    edited = client.images.v1.variants.edit(
        "hero",
        account_id=account,
        options={"fit": "pad", "width": 80, "height": 40, "metadata": "keep"},
    )
    assert edited.variant is not None and edited.variant.options.fit == "pad"

    client.images.v1.variants.delete("hero", account_id=account)
    with pytest.raises(NotFoundError):
        client.images.v1.variants.get("hero", account_id=account)


def test_v2_direct_upload_and_list(client: Cloudflare, emulator: EmulatorServer) -> None:
    account = emulator.account_id
    expiry = emulator.emulator.now() + timedelta(minutes=10)
    draft = client.images.v2.direct_uploads.create(
        account_id=account,
        creator="user-9",
        expiry=expiry,
        metadata={"purpose": "avatar"},
        require_signed_urls=False,
    )
    assert draft.id and draft.upload_url
    pending = client.images.v1.get(draft.id, account_id=account)
    assert (pending.model_extra or {}).get("draft") is True

    with requests.post(
        draft.upload_url, files={"file": ("a.png", make_image(300, 200))}, timeout=10
    ) as resp:
        assert resp.status_code == 200

    done = client.images.v1.get(draft.id, account_id=account)
    assert "draft" not in (done.model_extra or {}) and done.meta == {"purpose": "avatar"}

    listed = client.images.v2.list(account_id=account, creator="user-9", per_page=10)
    assert [i.id for i in listed.images or []] == [draft.id]
    assert listed.continuation_token is None
    filtered = client.images.v2.list(
        account_id=account, extra_query={"meta.purpose[eq]": "avatar"}, sort_order="asc"
    )
    assert [i.id for i in filtered.images or []] == [draft.id]

    assert done.variants is not None
    with requests.get(done.variants[0], timeout=10) as delivered:
        content = delivered.content
    with Image.open(io.BytesIO(content)) as img:
        assert img.size == (300, 200)

"""HEIC/HEIF, what iPhones take: accepted by upload URLs and the v1 upload, its limits checked,
variants delivered as JPEG; AVIF (the same container) and broken HEIC refused."""

from __future__ import annotations

import io

import requests
from PIL import Image

from broker.emulator.imaging import ftyp_brands, is_heic
from broker.emulator.testing import EmulatorServer, ImagesClient, make_image


def _heic(width: int, height: int, color: tuple[int, int, int] = (30, 140, 60)) -> bytes:
    data = make_image(width, height, "HEIF", color=color)
    assert data[4:12] == b"ftypheic", data[:16]
    return data


def _post(url: str, data: bytes, name: str = "IMG_0001.HEIC") -> requests.Response:
    with requests.post(url, files={"file": (name, data)}, timeout=10) as resp:
        resp.content  # noqa: B018
        return resp


def test_heic_through_an_upload_url_is_stored_and_delivered_as_jpeg(
    api: ImagesClient, emulator: EmulatorServer, http: requests.Session
) -> None:
    draft = api.direct_upload()
    sent = _post(draft["uploadURL"], _heic(800, 600))
    assert sent.status_code == 200, sent.text
    image = sent.json()["result"]
    assert image["filename"] == "IMG_0001.HEIC" and "draft" not in image
    stored = emulator.emulator.store.get_image(image["id"])
    assert stored is not None
    assert (stored.content_type, stored.width, stored.height) == ("image/heic", 800, 600)
    # Every variant renders like any other image, as JPEG (browsers cannot show HEIC);
    # the second fetch comes from the cache with the same type.
    for attempt in ("miss", "hit"):
        with http.get(image["variants"][0], timeout=10) as resp:
            assert resp.status_code == 200
            assert resp.headers["Content-Type"] == "image/jpeg"
            assert resp.headers["X-Emulator-Cache"] == attempt
            with Image.open(io.BytesIO(resp.content)) as out:
                assert out.format == "JPEG" and out.size == (800, 600)
                # The pixels survived decoding (a green picture, not a blank one).
                r, g, b = out.convert("RGB").getpixel((400, 300))
                assert g > 100 and r < 80 and b < 100
    # The original stays HEIC.
    blob = api.get(f"/v1/{image['id']}/blob")
    assert blob.status_code == 200 and blob.content[4:12] == b"ftypheic"


def test_heic_through_the_v1_upload(api: ImagesClient) -> None:
    image = api.upload(_heic(64, 48), "photo.heic")
    assert image["filename"] == "photo.heic"


def test_avif_and_broken_heic_are_refused(api: ImagesClient) -> None:
    heic = _heic(64, 48)
    draft = api.direct_upload()
    # AVIF shares the container: same bytes with AVIF brands only → unsupported (5455).
    avif = heic[:8] + b"avif" + heic[12:16] + b"avifmif1miaf" + heic[28:]
    assert ftyp_brands(avif)[:2] == [b"avif", b"avif"] and not is_heic(avif)
    refused = _post(draft["uploadURL"], avif, "photo.avif")
    assert refused.status_code == 415 and refused.json()["errors"][0]["code"] == 5455
    # HEIC brands on a truncated body: recognised, but not decodable.
    broken = _post(draft["uploadURL"], heic[: len(heic) // 2])
    assert broken.status_code == 415 and broken.json()["errors"][0]["code"] == 5455
    # The link is still usable for a good file.
    assert _post(draft["uploadURL"], heic).status_code == 200


def test_brands_are_read_from_the_ftyp_box() -> None:
    heic = _heic(16, 16)
    assert ftyp_brands(heic)[0] == b"heic" and b"mif1" in ftyp_brands(heic)
    assert is_heic(heic)
    # A generic HEIF (mif1) that is not AVIF counts; AVIF with mif1 does not.
    mif1 = b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1miaf"
    assert is_heic(mif1)
    assert not is_heic(b"\x00\x00\x00\x18ftypavif\x00\x00\x00\x00avifmif1")
    assert ftyp_brands(make_image(8, 8)) == [] and not is_heic(make_image(8, 8))

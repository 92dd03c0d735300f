"""Delivery: variant transforms, EXIF handling, caching, signed URLs and `Cf-Resized` errors."""

from __future__ import annotations

import io
import time
from typing import Any

import pytest
import requests
from PIL import Image

from broker.emulator.imaging import COPYRIGHT_TAG, _geometry
from broker.emulator.signing import sign
from broker.emulator.testing import EmulatorServer, ImagesClient, make_image

ARTIST_TAG = 0x013B


def _variant(api: ImagesClient, name: str, fit: str, w: int, h: int, **extra: Any) -> None:
    options = {"fit": fit, "width": w, "height": h, "metadata": extra.pop("metadata", "none")}
    resp = api.post("/v1/variants", json={"id": name, "options": options, **extra})
    assert resp.status_code == 200, resp.text


def _fetch(http: requests.Session, url: str, **kwargs: Any) -> requests.Response:
    with http.get(url, timeout=10, **kwargs) as resp:
        resp.content  # noqa: B018
        return resp


def _size(resp: requests.Response) -> tuple[int, int]:
    with Image.open(io.BytesIO(resp.content)) as img:
        return img.size


def _path(url: str) -> str:
    return "/" + url.split("/", 3)[3]


@pytest.mark.parametrize(
    ("fit", "box", "source", "expected"),
    [
        ("scale-down", (100, 100), (400, 200), (100, 50)),
        ("scale-down", (1000, 1000), (400, 200), (400, 200)),
        ("contain", (1000, 1000), (400, 200), (1000, 500)),
        ("contain", (100, 100), (400, 200), (100, 50)),
        ("cover", (100, 100), (400, 200), (100, 100)),
        ("cover", (1000, 800), (400, 200), (1000, 800)),
        ("crop", (100, 100), (400, 200), (100, 100)),
        ("crop", (1000, 1000), (400, 200), (400, 200)),
        ("crop", (300, 100), (200, 400), (200, 100)),
        ("pad", (100, 100), (400, 200), (100, 100)),
        ("pad", (1000, 1000), (400, 200), (1000, 1000)),
    ],
)
def test_fit_geometry(
    fit: str, box: tuple[int, int], source: tuple[int, int], expected: tuple[int, int]
) -> None:
    _, _, out_w, out_h = _geometry(*source, fit, *box)
    assert (out_w, out_h) == expected


def test_variants_render_with_their_fit(api: ImagesClient, http: requests.Session) -> None:
    _variant(api, "wide", "contain", 200, 100)
    _variant(api, "square", "cover", 50, 50)
    _variant(api, "padded", "pad", 120, 120)
    image = api.upload(make_image(400, 300, "JPEG"), "p.jpg")
    urls = dict(zip(["public", "wide", "square", "padded"], image["variants"], strict=True))
    public = _fetch(http, urls["public"])
    assert public.status_code == 200 and public.headers["Content-Type"] == "image/jpeg"
    assert _size(public) == (400, 300)  # scale-down never enlarges
    assert _size(_fetch(http, urls["wide"])) == (133, 100)
    assert _size(_fetch(http, urls["square"])) == (50, 50)
    padded = _fetch(http, urls["padded"])
    assert _size(padded) == (120, 120)
    with Image.open(io.BytesIO(padded.content)) as img:
        corner = img.convert("RGB").getpixel((0, 0))
    assert all(c > 240 for c in corner)  # white padding


def test_png_with_alpha_and_gif_and_webp(api: ImagesClient, http: requests.Session) -> None:
    _variant(api, "small", "scale-down", 10, 10)
    out = io.BytesIO()
    Image.new("RGBA", (40, 20), (0, 0, 255, 128)).save(out, "PNG")
    for data, ctype in (
        (out.getvalue(), "image/png"),
        (make_image(40, 20, "GIF"), "image/gif"),
        (make_image(40, 20, "WEBP"), "image/webp"),
    ):
        image = api.upload(data)
        resp = _fetch(http, image["variants"][1])
        assert resp.status_code == 200 and resp.headers["Content-Type"] == ctype
        assert _size(resp) == (10, 5)


def test_metadata_modes(api: ImagesClient, http: requests.Session) -> None:
    for mode in ("none", "copyright", "keep"):
        _variant(api, mode, "scale-down", 50, 50, metadata=mode)
    exif = {COPYRIGHT_TAG: "(c) Someone", ARTIST_TAG: "Someone"}
    image = api.upload(make_image(80, 80, "JPEG", exif=exif), "e.jpg")
    by_name = {url.rsplit("/", 1)[1]: url for url in image["variants"]}

    def tags(name: str) -> dict[int, Any]:
        with Image.open(io.BytesIO(_fetch(http, by_name[name]).content)) as img:
            return dict(img.getexif())

    assert tags("none") == {}
    assert tags("copyright") == {COPYRIGHT_TAG: "(c) Someone"}
    assert tags("keep") == {COPYRIGHT_TAG: "(c) Someone", ARTIST_TAG: "Someone"}


def test_outputs_are_cached_and_conditional(
    api: ImagesClient, emulator: EmulatorServer, http: requests.Session
) -> None:
    image = api.upload(make_image(30, 30))
    first = _fetch(http, image["variants"][0])
    assert first.headers["X-Emulator-Cache"] == "miss"
    assert first.headers["Cache-Control"] == "public, max-age=172800"
    assert first.headers["Access-Control-Allow-Origin"] == "*"
    second = _fetch(http, image["variants"][0])
    assert second.headers["X-Emulator-Cache"] == "hit" and second.content == first.content
    assert list((emulator.emulator.store.cache_dir).rglob("public-*.png"))
    not_modified = _fetch(
        http, image["variants"][0], headers={"If-None-Match": first.headers["ETag"]}
    )
    assert not_modified.status_code == 304
    # Editing the variant changes its cache key.
    api.request(
        "PATCH",
        "/v1/variants/public",
        json={"options": {"fit": "cover", "width": 10, "height": 10, "metadata": "none"}},
    )
    edited = _fetch(http, image["variants"][0])
    assert edited.headers["X-Emulator-Cache"] == "miss" and _size(edited) == (10, 10)


def test_not_found_cases_carry_cf_resized(
    api: ImagesClient, emulator: EmulatorServer, http: requests.Session
) -> None:
    image = api.upload(make_image())
    draft = api.direct_upload()
    base = f"{emulator.url}/{emulator.account_hash}"
    for url in (
        f"{base}/missing/public",
        f"{base}/{draft['id']}/public",
        f"{base}/{image['id']}/novariant",
        f"{emulator.url}/otherhash/{image['id']}/public",
        f"{emulator.url}/just-one-segment",
    ):
        resp = _fetch(http, url)
        assert resp.status_code == 404, url
        assert resp.headers["Cf-Resized"] == "err=9431", url
    api.request("DELETE", f"/v1/{image['id']}")
    assert _fetch(http, image["variants"][0]).status_code == 404


def test_private_images_need_a_valid_signature(
    api: ImagesClient, emulator: EmulatorServer, http: requests.Session
) -> None:
    _variant(api, "open", "scale-down", 20, 20, neverRequireSignedURLs=True)
    draft = api.direct_upload(requireSignedURLs="true")
    with requests.post(
        draft["uploadURL"], files={"file": ("p.png", make_image(60, 40))}, timeout=10
    ) as resp:
        image = resp.json()["result"]
    assert image["requireSignedURLs"] is True
    public_url, open_url = image["variants"]
    key = api.get("/v1/keys").json()["result"]["keys"][0]["value"]
    exp = int(time.time()) + 600

    unsigned = _fetch(http, public_url)
    assert unsigned.status_code == 403 and unsigned.headers["Cf-Resized"] == "err=9425"
    signed_path = sign(_path(public_url), exp, key)
    good = _fetch(http, emulator.url + signed_path)
    assert good.status_code == 200 and _size(good) == (60, 40)
    assert good.headers["Cache-Control"].startswith("private, max-age=")
    tampered = emulator.url + signed_path.replace(f"exp={exp}", f"exp={exp + 1}")
    assert _fetch(http, tampered).status_code == 403
    other_variant = emulator.url + signed_path.replace("/public?", "/open?")
    assert _fetch(http, other_variant).status_code == 200  # never requires a signature
    wrong_key = emulator.url + sign(_path(public_url), exp, "not-the-key")
    assert _fetch(http, wrong_key).status_code == 403
    expired = emulator.url + sign(_path(public_url), exp, key)
    emulator.advance(601)
    assert _fetch(http, expired).status_code == 403
    assert _fetch(http, open_url).status_code == 200

    # A rolled key keeps working, a deleted one stops.
    emulator.advance(-601)
    keys = api.request("PUT", "/v1/keys/second").json()["result"]["keys"]
    second = next(k["value"] for k in keys if k["name"] == "second")
    assert _fetch(http, emulator.url + sign(_path(public_url), exp, second)).status_code == 200
    api.request("DELETE", "/v1/keys/default")
    assert _fetch(http, emulator.url + signed_path).status_code == 403


def test_custom_id_needing_percent_encoding_is_delivered(
    api: ImagesClient, http: requests.Session
) -> None:
    image = api.upload(make_image(), id="dir/ünï cødé")
    assert "%20" in image["variants"][0]
    resp = _fetch(http, image["variants"][0])
    assert resp.status_code == 200

"""The whole direct-upload story in one scenario, as the broker and a browser would play it."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import requests
from PIL import Image

from broker.emulator.signing import sign, signature
from broker.emulator.testing import EmulatorServer, ImagesClient, make_image


def _get(url: str) -> requests.Response:
    with requests.get(url, timeout=10) as resp:
        resp.content  # noqa: B018
        return resp


def _pixels(resp: requests.Response) -> tuple[int, int]:
    with Image.open(io.BytesIO(resp.content)) as img:
        assert img.format == "PNG"
        return img.size


def test_direct_upload_round_trip(api: ImagesClient, emulator: EmulatorServer) -> None:
    # The documented vector first: the same routine signs the URLs below.
    assert (
        signature(
            "/cheeW4oKsx5ljh8e8BoL2A/bc27a117-9509-446b-8c69-c81bfeac0a01/mobile?exp=1631289275",
            "YOUR_KEY_FROM_IMAGES_DASHBOARD",
        )
        == "f5dbc282189c443accb7b86a95a66b29d42ea4ced234cdbe3c2db71fd61a88a0"
    )
    for name, fit, w, h in (("thumb", "cover", 64, 64), ("banner", "scale-down", 200, 50)):
        options = {"fit": fit, "width": w, "height": h, "metadata": "none"}
        assert api.post("/v1/variants", json={"id": name, "options": options}).ok

    # Public image: create, send, verify, deliver.
    draft = api.direct_upload(creator="user-1")
    assert api.get(f"/v1/{draft['id']}").json()["result"]["draft"] is True
    png = make_image(400, 300, "PNG")
    with requests.post(draft["uploadURL"], files={"file": ("p.png", png)}, timeout=10) as resp:
        assert resp.status_code == 200
    image = api.get(f"/v1/{draft['id']}").json()["result"]
    assert "draft" not in image and image["filename"] == "p.png"
    by_name = {url.rsplit("/", 1)[1]: url for url in image["variants"]}
    assert _pixels(_get(by_name["thumb"])) == (64, 64)
    assert _pixels(_get(by_name["banner"])) == (67, 50)
    assert _pixels(_get(by_name["public"])) == (400, 300)

    # Private image: unsigned and tampered URLs are refused, a signed one is served.
    private = api.direct_upload(requireSignedURLs="true")
    with requests.post(private["uploadURL"], files={"file": ("q.png", png)}, timeout=10) as resp:
        assert resp.status_code == 200
        url = resp.json()["result"]["variants"][0]
    key = api.get("/v1/keys").json()["result"]["keys"][0]["value"]
    path = "/" + url.split("/", 3)[3]
    exp = int(emulator.emulator.now().timestamp()) + 300
    signed = emulator.url + sign(path, exp, key)
    unsigned = _get(url)
    assert unsigned.status_code == 403 and unsigned.headers["Cf-Resized"] == "err=9425"
    tampered = _get(signed[:-1] + ("0" if signed[-1] != "0" else "1"))
    assert tampered.status_code == 403
    assert path.endswith("/public")
    assert _pixels(_get(signed)) == (400, 300)


def test_injected_clock_stamps_uploads(tmp_path: Path) -> None:
    frozen = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    with EmulatorServer(tmp_path, {"CLOCK": lambda: frozen}) as emulator, emulator.client() as api:
        image = api.upload(make_image())
        assert image["uploaded"] == "2030-01-02T03:04:05.678Z"
        emulator.advance(60)
        assert api.upload(make_image())["uploaded"] == "2030-01-02T03:05:05.678Z"

"""Direct creator upload: the v2 draft, the one-time upload URL, its errors, CORS, notifications."""

from __future__ import annotations

import json
import struct
import threading
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests

from broker.emulator.testing import EmulatorServer, ImagesClient, make_image
from tests.support.webhook_receiver import Receiver


def _code(resp: requests.Response) -> int:
    body = resp.json()
    assert body["success"] is False and body["result"] is None
    return body["errors"][0]["code"]


def _send(
    url: str, data: bytes | None, name: str = "photo.png", **kwargs: Any
) -> requests.Response:
    files = {"file": (name, data)} if data is not None else {"other": (None, "x")}
    with requests.post(url, files=files, timeout=10, **kwargs) as resp:
        resp.content  # noqa: B018
        return resp


def _iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def _png_claiming(width: int, height: int) -> bytes:
    """Return a valid 1x1 PNG whose header claims other dimensions (cheap limit tests)."""
    png = bytearray(make_image(1, 1))
    ihdr = png[12:29]
    ihdr[4:12] = struct.pack(">II", width, height)
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(png)


def test_create_returns_id_and_upload_url_and_a_draft(
    api: ImagesClient, emulator: EmulatorServer
) -> None:
    result = api.direct_upload(creator="user-7", **{"metadata.k": "v"})
    assert set(result) == {"id", "uploadURL"}
    assert uuid.UUID(result["id"]).version == 4
    assert result["uploadURL"] == f"{emulator.url}/upload/{emulator.account_hash}/{result['id']}"
    details = api.get(f"/v1/{result['id']}").json()["result"]
    assert details["draft"] is True
    assert details["creator"] == "user-7" and details["meta"] == {"k": "v"}
    assert api.get("/v2").json()["result"]["images"] == []
    assert api.get("/v1").json()["result"]["images"] == []


def test_create_accepts_json(api: ImagesClient, emulator: EmulatorServer) -> None:
    expiry = _iso(emulator.emulator.now() + timedelta(minutes=10))
    body = {"creator": "u", "metadata": {"a": 1}, "expiry": expiry, "requireSignedURLs": True}
    resp = api.post("/v2/direct_upload", json=body)
    assert resp.status_code == 200, resp.text
    details = api.get(f"/v1/{resp.json()['result']['id']}").json()["result"]
    assert details["requireSignedURLs"] is True and details["meta"] == {"a": 1}


def test_create_refuses_other_bodies(api: ImagesClient) -> None:
    resp = api.post("/v2/direct_upload", data=b"hello", headers={"Content-Type": "text/plain"})
    assert resp.status_code == 415 and _code(resp) == 5415
    assert api.post("/v2/direct_upload").status_code == 200  # an empty body means defaults


def test_expiry_bounds_and_default(api: ImagesClient, emulator: EmulatorServer) -> None:
    now = emulator.emulator.now()
    for bad in (
        _iso(now + timedelta(minutes=1)),
        _iso(now + timedelta(hours=6, minutes=1)),
        _iso(now - timedelta(minutes=5)),
        "tomorrow",
        (now + timedelta(minutes=10)).replace(tzinfo=None).isoformat(),
    ):
        resp = api.post("/v2/direct_upload", files={"_": (None, "")}, data={"expiry": bad})
        assert resp.status_code == 400 and _code(resp) == 5400, bad
    for good in (now + timedelta(minutes=2), now + timedelta(hours=6)):
        api.direct_upload(expiry=_iso(good))

    short = api.direct_upload(expiry=_iso(now + timedelta(minutes=3)))
    default = api.direct_upload()
    emulator.advance(29 * 60)
    assert _send(short["uploadURL"], make_image()).status_code == 410
    assert _send(default["uploadURL"], make_image()).status_code == 200
    later = api.direct_upload()
    emulator.advance(30 * 60 + 1)
    expired = _send(later["uploadURL"], make_image())
    assert expired.status_code == 410 and _code(expired) == 5410
    assert api.get(f"/v1/{later['id']}").json()["result"]["draft"] is True


def test_custom_id_rules(api: ImagesClient) -> None:
    created = api.direct_upload(id="users/7/avatar")
    assert created["id"] == "users/7/avatar"
    assert created["uploadURL"].endswith("/users/7/avatar")
    assert _send(created["uploadURL"], make_image()).status_code == 200
    for fields in (
        {"id": str(uuid.uuid4())},
        {"id": "/starts"},
        {"id": "ends/"},
        {"id": "x" * 1025},
        {"id": "private", "requireSignedURLs": "true"},
    ):
        resp = api.post("/v2/direct_upload", files={"_": (None, "")}, data=fields)
        assert resp.status_code == 400 and _code(resp) == 5411, fields
    taken = api.post("/v2/direct_upload", files={"_": (None, "")}, data={"id": "users/7/avatar"})
    assert taken.status_code == 409 and _code(taken) == 5409


def test_custom_ids_with_control_characters_are_refused(api: ImagesClient) -> None:
    """README: control characters are refused: C0, DEL (0x7f) and C1 (0x80..0x9f) alike."""
    for bad in ("a\x00b", "a\x1fb", "a\x7fb", "a\x80b", "a\x85b", "a\x9fb"):
        direct = api.post("/v2/direct_upload", json={"id": bad, "requireSignedURLs": False})
        assert direct.status_code == 400 and _code(direct) == 5411, repr(bad)
        v1 = api.post("/v1", files={"file": ("a.png", make_image())}, data={"id": bad})
        assert v1.status_code == 400 and _code(v1) == 5411, repr(bad)
    # Printable neighbours stay allowed: a no-break space (U+00A0) and accented letters.
    assert api.direct_upload(id="caf\u00e9\u00a0menu")["id"] == "caf\u00e9\u00a0menu"


def test_metadata_limit(api: ImagesClient) -> None:
    ok = {"metadata": json.dumps({"k": "v" * 1000})}
    assert api.post("/v2/direct_upload", files={"_": (None, "")}, data=ok).status_code == 200
    big = {"metadata": json.dumps({"k": "v" * 1020})}
    resp = api.post("/v2/direct_upload", files={"_": (None, "")}, data=big)
    assert resp.status_code == 400 and _code(resp) == 5400
    as_json = api.post("/v2/direct_upload", json={"metadata": {"k": "é" * 600}})
    assert as_json.status_code == 400  # bytes, not characters
    not_object = api.post("/v2/direct_upload", files={"_": (None, "")}, data={"metadata": "[1]"})
    assert not_object.status_code == 400


def test_upload_url_errors(api: ImagesClient, emulator: EmulatorServer) -> None:
    draft = api.direct_upload()
    url = draft["uploadURL"]
    unknown = _send(f"{emulator.url}/upload/{emulator.account_hash}/nope", make_image())
    assert unknown.status_code == 404 and _code(unknown) == 5404
    wrong_hash = _send(url.replace(emulator.account_hash, "x" * 22), make_image())
    assert wrong_hash.status_code == 404

    assert _send(url, None).status_code == 400
    with requests.post(url, data=make_image(), timeout=10) as raw:
        assert raw.status_code == 415 and _code(raw) == 5415
    oversize = _send(url, make_image() + b"\0" * (10 * 1024 * 1024))
    assert oversize.status_code == 413 and _code(oversize) == 5413
    text = _send(url, b"this is not an image", "fake.png")
    assert text.status_code == 415 and _code(text) == 5455
    fake_jpeg = _send(url, b"\xff\xd8\xff\xe0" + b"\0" * 100, "fake.jpg")
    assert fake_jpeg.status_code == 415 and _code(fake_jpeg) == 5455
    truncated = _send(url, make_image(200, 200, "JPEG")[:300], "cut.jpg")
    assert truncated.status_code == 415
    bmp = _send(url, make_image(10, 10, "BMP"), "x.png")
    assert bmp.status_code == 415 and _code(bmp) == 5455
    assert _send(url, make_image(12_001, 1)).status_code == 400
    assert _send(url, _png_claiming(11_000, 10_000)).status_code == 400  # 110 MP

    # Failures leave the link usable until it expires; then it is single-use.
    assert api.get(f"/v1/{draft['id']}").json()["result"]["draft"] is True
    assert _send(url, make_image(12_000, 1)).status_code == 200
    reused = _send(url, make_image())
    assert reused.status_code == 409 and _code(reused) == 5409


def test_svg_is_accepted_and_served_as_is(api: ImagesClient, http: requests.Session) -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
    draft = api.direct_upload()
    done = _send(draft["uploadURL"], svg, "logo.txt")
    assert done.status_code == 200
    with http.get(done.json()["result"]["variants"][0]) as resp:
        assert resp.headers["Content-Type"] == "image/svg+xml" and resp.content == svg
    not_svg = api.direct_upload()
    assert _send(not_svg["uploadURL"], b"<html><svg></svg></html>").status_code == 415


def test_cors_preflight_and_headers(api: ImagesClient, http: requests.Session) -> None:
    draft = api.direct_upload()
    preflight = {
        "Origin": "http://localhost:5000",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    with http.options(draft["uploadURL"], headers=preflight) as resp:
        assert resp.status_code == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert resp.headers["Access-Control-Allow-Headers"] == "content-type"
    failed = _send(draft["uploadURL"], b"nope", headers={"Origin": "http://localhost:5000"})
    assert failed.headers["Access-Control-Allow-Origin"] == "*"
    done = _send(draft["uploadURL"], make_image(), headers={"Origin": "http://localhost:5000"})
    assert done.status_code == 200
    assert done.headers["Access-Control-Allow-Origin"] == "*"


def test_concurrent_posts_to_one_link_have_one_winner(api: ImagesClient) -> None:
    draft = api.direct_upload()
    results: list[int] = []
    barrier = threading.Barrier(8)

    def post() -> None:
        barrier.wait()
        results.append(_send(draft["uploadURL"], make_image()).status_code)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] + [409] * 7


def test_notifications_on_success_and_failure(tmp_path: Path, receiver: Receiver) -> None:
    config = {"NOTIFY_URL": receiver.url, "NOTIFY_SECRET": "s3cret"}
    with EmulatorServer(tmp_path, config) as emulator, emulator.client() as api:
        draft = api.direct_upload()
        assert _send(draft["uploadURL"], b"junk").status_code == 415
        failed = receiver.wait_for(1)[0]
        failure = failed.json
        assert failed.headers["cf-webhook-auth"] == "s3cret"
        assert failure["imageId"] == draft["id"] and failure["success"] is False
        assert failure["errors"][0]["code"] == 5455
        assert failure["image"]["draft"] is True

        assert _send(draft["uploadURL"], make_image()).status_code == 200
        success = receiver.wait_for(2)[1].json
        assert success["success"] is True and success["event"] == "upload.success"
        assert success["image"]["id"] == draft["id"] and "draft" not in success["image"]

        # An unreachable receiver never delays or breaks the upload answer.
        emulator.emulator.notifier.url = "http://127.0.0.1:9/hook"
        other = api.direct_upload()
        assert _send(other["uploadURL"], make_image()).status_code == 200
        emulator.emulator.notifier.join(timeout=5)


def test_round_trip_at_utc_now(api: ImagesClient) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    draft = api.direct_upload()
    image = _send(draft["uploadURL"], make_image()).json()["result"]
    uploaded = datetime.fromisoformat(image["uploaded"])
    assert before <= uploaded <= datetime.now(UTC) + timedelta(seconds=1)


def test_long_filenames_are_cut_to_255_like_v1(api: ImagesClient) -> None:
    long_name = "a" * 296 + ".png"
    drafts = [api.direct_upload() for _ in range(2)]
    assert _send(drafts[0]["uploadURL"], make_image(), name=long_name).status_code == 200
    assert _send(drafts[1]["uploadURL"], make_image(), name="short.png").status_code == 200
    direct = api.get(f"/v1/{drafts[0]['id']}").json()["result"]["filename"]
    via_v1 = api.upload(make_image(), filename=long_name)["filename"]
    assert direct == via_v1 == long_name[:255]
    assert api.get(f"/v1/{drafts[1]['id']}").json()["result"]["filename"] == "short.png"

"""The upload page of one upload profile in real headless Chromium: the avatar page says its
rules, takes one file per pick, refuses a file that breaks a rule before anything is created (no
create at the broker, none at the emulator) and crops a picture of the wrong shape by keyboard
alone. And the broker's own check of the original still refuses what a client that skips the
page sends, over real HTTP."""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Any

import pytest
import requests
from axe_playwright_python.sync_playwright import Axe
from PIL import Image
from playwright.sync_api import expect

from broker import worker
from broker.platform.db import utcnow
from tests.browser.conftest import profiles_settings, screenshot, serve_live
from tests.browser.test_page_checks import VIEWPORTS, _problems
from tests.browser.test_prepare import _stored
from tests.browser.test_upload_page import _drop, _item, _log_in, _png
from tests.factories import AVATAR_PROFILE, PASSWORD, issue_token, send_file, upload_rows

pytestmark = pytest.mark.browser

# The avatar profile (JPEG or PNG, at most 512 px, 1:1, replace mode), and at least 200 px wide.
PROFILES = AVATAR_PROFILE + "min_width = 200\n"


@pytest.fixture
def live_broker_settings(tmp_path) -> dict[str, Any]:
    return profiles_settings(tmp_path, PROFILES)


def _gif(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(out, format="GIF")
    return out.getvalue()


def _creates(requests_seen: list[Any]) -> list[str]:
    return [
        r.url for r in requests_seen if r.method == "POST" and r.url.endswith("/api/v1/uploads")
    ]


def _refused(page: Any, name: str, words: str) -> None:
    item = _item(page, name)
    expect(item).to_have_attribute("data-state", "refused")
    expect(item.locator(".state")).to_contain_text(words)


@pytest.mark.timeout(300)
def test_the_avatar_page_refuses_wrong_files_before_creating_anything_and_crops_by_keyboard(
    live_broker, make_user, emulator, page
):
    make_user("alice", PASSWORD)
    base = live_broker.url
    _log_in(page, base, "alice")
    seen: list[Any] = []
    page.on("request", lambda request: seen.append(request))
    page.goto(f"{base}/upload?profile=avatar")
    expect(page.get_by_role("heading", level=1)).to_have_text(
        "Upload an image: Your profile picture"
    )
    rules = page.locator("#profile-rules")
    expect(rules).to_contain_text("Width 200 to 512 px.")
    expect(rules).to_contain_text("Aspect ratio 1:1")
    picker = page.locator("#file-input")
    assert picker.get_attribute("multiple") is None
    assert picker.get_attribute("accept") == "image/jpeg,image/png"

    # Dropped: three files on a page that takes one. The first is a GIF (JPEG and PNG only);
    # the other two are left out whatever they are.
    square = _png(300, 300)
    _drop(
        page,
        [
            ("moving.gif", "image/gif", _gif(300, 300)),
            ("second.png", "image/png", square),
            ("third.png", "image/png", square),
        ],
    )
    _refused(page, "moving.gif", "GIF is not accepted here: use JPEG, PNG")
    for name in ("second.png", "third.png"):
        _refused(page, name, "this page takes one file at a time")
    # Pasted: two files, the second left out; the first is smaller than the profile allows.
    _drop(
        page,
        [("tiny.png", "image/png", _png(120, 120)), ("fourth.png", "image/png", square)],
        paste=True,
    )
    _refused(page, "tiny.png", "Too small: 120 px wide (at least 200 px)")
    _refused(page, "fourth.png", "this page takes one file at a time")

    # Nothing was created: not a request to the broker, no row, no upload URL at the emulator.
    assert _creates(seen) == []
    assert upload_rows(live_broker.app) == []
    assert emulator.counters().get("upload_url", 0) == 0

    # 800x400, red on the left half, blue on the right: the crop dialog opens with the focus on
    # its frame (the largest square, centred); it fits the screen and passes axe on a phone and
    # on a laptop.
    picture = Image.new("RGB", (800, 400), (20, 40, 220))
    picture.paste((220, 20, 20), (0, 0, 400, 400))
    wide = io.BytesIO()
    picture.save(wide, "PNG")
    picker.set_input_files(
        [{"name": "wide.png", "mimeType": "image/png", "buffer": wide.getvalue()}]
    )
    dialog = page.get_by_role("dialog", name="Crop wide.png")
    expect(dialog).to_be_visible()
    frame = dialog.locator(".crop-frame")
    expect(frame).to_be_focused()
    expect(_item(page, "wide.png").locator(".state")).to_have_text("Waiting for your crop")
    axe = Axe()
    for device, (width, height) in VIEWPORTS.items():
        page.set_viewport_size({"width": width, "height": height})
        assert _problems(page, axe) == [], device
        box = dialog.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, (device, box)
        screenshot(page, f"upload-crop-dialog-{device}-{width}x{height}")

    # Keyboard only: the frame to the right half (Shift: ten steps at a time), then Tab past
    # the two turn buttons to "Use this crop".
    keys = page.keyboard
    for _ in range(3):
        keys.press("Shift+ArrowRight")
    expect(frame).to_have_attribute(
        "aria-label", "Crop frame: 50 % wide, 50 % from the left, 0 % from the top"
    )
    for key in ("Tab", "Tab", "Tab"):
        keys.press(key)
    expect(dialog.get_by_role("button", name="Use this crop")).to_be_focused()
    keys.press("Enter")
    expect(dialog).to_have_count(0)
    item = _item(page, "wide.png")
    expect(item).to_have_attribute("data-state", "ready", timeout=30_000)
    expect(item.locator(".facts")).to_contain_text("400\u00d7400")

    # One create, for the cropped file, under the avatar profile; the stored original is the
    # blue right half.
    assert len(_creates(seen)) == 1
    [row] = upload_rows(live_broker.app)
    assert (row.profile, row.status) == ("avatar", "ready")
    stored = Image.open(io.BytesIO(_stored(live_broker, emulator, row.id))).convert("RGB")
    assert stored.size == (400, 400)
    for point in ((10, 10), (200, 200), (390, 390)):
        r, g, b = stored.getpixel(point)
        assert b > 180 and r < 80, (point, (r, g, b))


def _pick_on_the_avatar_page(live: Any, page: Any, username: str, name: str, data: bytes) -> Any:
    """Log in, open the avatar page and pick one PNG; return its tile."""
    _log_in(page, live.url, username)
    page.goto(f"{live.url}/upload?profile=avatar")
    page.locator("#file-input").set_input_files(
        [{"name": name, "mimeType": "image/png", "buffer": data}]
    )
    return _item(page, name)


def test_the_avatar_page_sends_a_square_picture_without_asking_to_crop(
    live_broker, make_user, emulator, page
):
    make_user("bea", PASSWORD)
    # 1000x1000: the right shape, too large; made 512x512 on the device, no dialog.
    item = _pick_on_the_avatar_page(live_broker, page, "bea", "me.png", _png(1000, 1000))
    expect(item).to_have_attribute("data-state", "ready", timeout=30_000)
    expect(item.locator(".facts")).to_contain_text("512\u00d7512")
    expect(page.locator("dialog")).to_have_count(0)
    [row] = upload_rows(live_broker.app)
    assert (row.profile, row.status) == ("avatar", "ready")


def test_the_broker_refuses_what_a_client_that_skips_the_page_sends(
    make_app, make_user, emulator, live_broker_settings
):
    """A client of the API skips every check and sends a 4000x3000 PNG to the avatar profile:
    the broker measures the original, refuses it naming the rule and deletes it upstream."""
    app = make_app(**live_broker_settings)
    # No worker thread: the test runs the worker's pass itself, at a known time.
    live = serve_live(app, worker=False)
    try:
        auth = issue_token(app, make_user("carl", PASSWORD))
        with requests.Session() as http:
            http.headers.update(auth)
            created = http.post(
                f"{live.url}/api/v1/uploads", json={"profile": "avatar"}, timeout=10
            )
            assert created.status_code == 201, created.text
            upload = created.json()
            send_file(upload, fmt="PNG", size=(4000, 3000))
            complete = f"{live.url}/api/v1/uploads/{upload['id']}/complete"
            assert http.post(complete, timeout=10).status_code == 202
            worker.run_once(app, now=utcnow() + timedelta(seconds=3))
            answer = http.post(complete, timeout=10)
    finally:
        live.close()
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["status"], body["profile"]) == ("rejected", "avatar")
    assert body["reject_reason"] == "max_width: image is 4000 px wide; at most 512"
    assert emulator.emulator.store.get_image(upload["image_id"]) is None


def test_a_cancelled_crop_creates_nothing_and_retry_asks_again(
    live_broker, make_user, emulator, page
):
    make_user("dora", PASSWORD)
    item = _pick_on_the_avatar_page(live_broker, page, "dora", "wide.png", _png(600, 300))
    dialog = page.get_by_role("dialog", name="Crop wide.png")
    expect(dialog).to_be_visible()
    page.keyboard.press("Escape")
    expect(item).to_have_attribute("data-state", "cancelled")
    assert upload_rows(live_broker.app) == []
    assert emulator.counters().get("upload_url", 0) == 0
    # Retry asks for the crop again; the whole picture's largest square is taken as it is.
    item.get_by_role("button", name="Retry wide.png").click()
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Use this crop").click()
    expect(item).to_have_attribute("data-state", "ready", timeout=30_000)
    [row] = upload_rows(live_broker.app)
    assert (row.profile, row.status) == ("avatar", "ready")

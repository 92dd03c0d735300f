"""The upload queue in real Chromium, used as people use it: many files of mixed kinds at once,
Cancel in the middle of a transfer, a pasted image. What is counted is observed at the emulator
(uploads, transfers handled at once) and in the browser's own network events."""

from __future__ import annotations

import io
import os
import re
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import expect

from broker.emulator.testing import make_image
from tests.browser.conftest import screenshot
from tests.browser.test_upload_page import _csp_violations, _drop, _item, _log_in, _status
from tests.factories import PASSWORD

pytestmark = pytest.mark.browser


def _jpeg_of_about(megabytes: float) -> bytes:
    """A real photo-sized JPEG: random pixels barely compress, so the size is predictable."""
    side = int((megabytes * 1024 * 1024 / 0.97) ** 0.5)  # ~0.97 bytes a pixel at q92
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "JPEG", quality=92)
    return out.getvalue()


def _animated_gif() -> bytes:
    frames = [Image.new("P", (120, 80), i * 40) for i in range(4)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="90" height="60">'
    b'<rect width="90" height="60" fill="teal"/></svg>'
)


class TransferWatch:
    """Counts the page's POSTs to upload URLs as the browser sees them: in flight, peak, per URL."""

    def __init__(self, page: Any, upload_origin: str) -> None:
        self.prefix = f"{upload_origin}/upload/"
        self.in_flight = 0
        self.peak = 0
        self.started: list[str] = []
        self.failed: list[str] = []
        page.on("request", self._start)
        page.on("requestfinished", self._end)
        page.on("requestfailed", self._fail)

    def _mine(self, request: Any) -> bool:
        return request.method == "POST" and request.url.startswith(self.prefix)

    def _start(self, request: Any) -> None:
        if self._mine(request):
            self.started.append(request.url)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)

    def _end(self, request: Any) -> None:
        if self._mine(request):
            self.in_flight -= 1

    def _fail(self, request: Any) -> None:
        if self._mine(request):
            self.failed.append(request.url)
            self.in_flight -= 1


def test_eight_mixed_files_upload_exactly_once_three_at_a_time(
    live_broker, make_user, emulator, page
):
    make_user("erin", PASSWORD)
    base = live_broker.url
    _log_in(page, base, "erin")
    watch = TransferWatch(page, emulator.url)
    # Hold every transfer for a moment at the emulator, so they overlap as on a slow network.
    emulator.inject_fault("upload_url", latency_ms=700)
    big = _jpeg_of_about(8)
    assert 7.5 * 1024 * 1024 < len(big) < 10 * 1024 * 1024
    files = [
        ("big-photo.jpg", "image/jpeg", big),
        ("iphone.heic", "image/heic", make_image(640, 480, "HEIF", color=(30, 140, 60))),
        ("spinner.gif", "image/gif", _animated_gif()),
        ("screenshot.png", "image/png", make_image(800, 600, "PNG", color=(40, 90, 200))),
        ("sticker.webp", "image/webp", make_image(300, 300, "WEBP", color=(200, 160, 20))),
        ("logo.svg", "image/svg+xml", SVG),
        ("small.jpg", "image/jpeg", make_image(200, 150, "JPEG", color=(120, 20, 120))),
        ("diagram.png", "image/png", make_image(333, 222, "PNG", color=(10, 10, 10))),
    ]
    _drop(page, files)

    # Local previews appear at once for what the browser can show; HEIC is named instead.
    for name in ("screenshot.png", "sticker.webp", "logo.svg", "small.jpg", "diagram.png"):
        thumb = _item(page, name).locator("img.thumb")
        expect(thumb).to_have_attribute("src", re.compile(r"^(blob:|/i/)"))
        expect(thumb).to_be_visible()
    expect(_item(page, "iphone.heic").locator(".preview-label")).to_have_text("HEIC")
    screenshot(page, "upload-queue-eight-files")

    overall = page.locator("#overall")
    expect(overall).to_have_attribute("data-percent", "100", timeout=90_000)
    expect(page.locator("#overall-text")).to_have_text("8 files: 8 ready")
    for name, _, _ in files:
        expect(_item(page, name)).to_have_attribute("data-state", "ready", timeout=30_000)
    # The image service's thumbnail replaced each preview, HEIC included (rendered as JPEG).
    expect(_item(page, "iphone.heic").locator("img.thumb")).to_have_js_property("naturalWidth", 256)

    counters = emulator.counters()
    assert counters.get("direct_upload") == 8, counters
    assert counters.get("upload_url") == 8, counters
    peak = emulator.peak_in_flight().get("upload_url")
    assert peak == 3, f"the emulator handled {peak} transfers at once"
    assert watch.peak == 3 and len(watch.started) == 8 == len(set(watch.started))
    assert watch.failed == []

    page.goto(f"{base}/gallery")
    tiles = page.locator("li[data-upload-id]")
    expect(tiles).to_have_count(8)
    ids = {tiles.nth(i).get_attribute("data-upload-id") for i in range(8)}
    assert len(ids) == 8
    assert page.locator(".gallery .badge").count() == 0  # all ready: no status badges
    assert _csp_violations(page) == []


def test_cancel_mid_transfer_stops_that_file_and_frees_its_slot(
    live_broker, make_user, emulator, page
):
    make_user("frank", PASSWORD)
    base = live_broker.url
    _log_in(page, base, "frank")
    watch = TransferWatch(page, emulator.url)
    emulator.inject_fault("upload_url", latency_ms=2500)
    _drop(
        page,
        [
            ("first.png", "image/png", make_image(300, 200, "PNG")),
            ("big.jpg", "image/jpeg", _jpeg_of_about(6)),
            ("third.png", "image/png", make_image(300, 200, "PNG", color=(1, 2, 3))),
            ("fourth.png", "image/png", make_image(300, 200, "PNG", color=(9, 9, 9))),
        ],
    )
    big = _item(page, "big.jpg")
    expect(big).to_have_attribute("data-state", "uploading")
    expect(_item(page, "fourth.png")).to_have_attribute("data-state", "waiting")
    upload_id = big.get_attribute("data-upload-id")
    assert upload_id
    image_id = _image_id_of(live_broker, upload_id)
    big_url = f"{emulator.url}/upload/{emulator.account_hash}/{image_id}"
    with page.expect_response(
        lambda r: r.request.method == "DELETE" and r.url.endswith(f"/uploads/{upload_id}")
    ) as deleted:
        big.get_by_role("button", name="Cancel").click()
    assert deleted.value.status == 200
    expect(big).to_have_attribute("data-state", "cancelled")
    # Its slot went to the waiting file at once, while the other two are still held.
    expect(_item(page, "fourth.png")).not_to_have_attribute("data-state", "waiting")
    for name in ("first.png", "third.png", "fourth.png"):
        expect(_item(page, name)).to_have_attribute("data-state", "ready", timeout=30_000)
    expect(page.locator("#overall")).to_have_attribute("data-percent", "100")

    # The cancelled transfer was aborted in the browser and never started again.
    assert watch.failed == [big_url]
    assert watch.started.count(big_url) == 1 and len(watch.started) == 4
    # (Counted in the browser: the emulator goes on handling the abandoned request until its
    # injected latency is over, so it may see one more at once than were really sent.)
    assert watch.peak <= 3
    assert _status(live_broker, upload_id) == "deleted"
    # The image service holds no image (and no draft) for it.
    with emulator.client() as api:
        assert api.get(f"/v1/{image_id}").status_code == 404
    assert emulator.counters().get("direct_upload") == 4

    # Clear finished: the ready and cancelled rows go; focus lands on the drop zone.
    page.get_by_role("button", name="Clear finished").click()
    expect(page.locator("li.queue-item")).to_have_count(0)
    assert page.evaluate("document.activeElement.id") == "dropzone"
    expect(page.locator("#overall")).to_be_hidden()


def test_pasted_image_is_uploaded(live_broker, make_user, emulator, page):
    make_user("gina", PASSWORD)
    _log_in(page, live_broker.url, "gina")
    # A real clipboard holding a PNG, pasted with the keyboard, as after a screenshot.
    page.evaluate(
        """async () => {
            const canvas = document.createElement("canvas");
            canvas.width = 120; canvas.height = 90;
            const ctx = canvas.getContext("2d");
            ctx.fillStyle = "#c03"; ctx.fillRect(0, 0, 120, 90);
            const blob = await new Promise((r) => canvas.toBlob(r, "image/png"));
            await navigator.clipboard.write([new ClipboardItem({"image/png": blob})]);
        }"""
    )
    page.locator("#dropzone").focus()
    page.keyboard.press("Control+V")
    item = page.locator("li.queue-item")
    expect(item).to_have_count(1)
    expect(item).to_have_attribute("data-state", "ready", timeout=30_000)
    expect(item.locator("img.thumb")).to_have_js_property("naturalWidth", 256)
    assert emulator.counters().get("upload_url") == 1


def _image_id_of(live: Any, upload_id: str) -> str:
    from broker.platform.db import db
    from broker.uploads.models import Upload

    with live.app.app_context():
        return db.session.get(Upload, upload_id).image_id

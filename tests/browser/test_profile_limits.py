"""A profile whose width and height limits differ (a banner: at most 1600 px wide, 400 px high),
in real Chromium: each picture is shrunk just enough to fit inside both, never to the smaller
limit on both sides. What is judged is what the emulator stored."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import expect

from tests.browser.conftest import profiles_settings, screenshot
from tests.browser.test_page_checks import VIEWPORTS
from tests.browser.test_prepare import _exif, _stored, without_app1
from tests.browser.test_upload_page import _drop, _item, _log_in
from tests.factories import PASSWORD

pytestmark = pytest.mark.browser

BANNER = """
[profiles.banner]
description = "A page banner"
formats = ["jpeg", "png"]
max_width = 1600
max_height = 400
"""


@pytest.fixture
def live_broker_settings(tmp_path) -> dict[str, Any]:
    """A broker with the banner profile."""
    return profiles_settings(tmp_path, BANNER)


def _jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (30, 90, 160)).save(out, "JPEG", quality=90, exif=_exif())
    return out.getvalue()


def test_a_non_square_limit_fits_each_side_to_its_own_limit(live_broker, make_user, emulator, page):
    make_user("bea", PASSWORD)
    _log_in(page, live_broker.url, "bea")
    page.goto(f"{live_broker.url}/upload?profile=banner")
    rules = page.locator("#queue")
    expect(page.locator("#profile-rules")).to_contain_text("Width at most 1600 px.")
    data = page.evaluate("JSON.parse(document.getElementById('queue').dataset.rules)")
    assert (data["max_width"], data["max_height"], data["max_dimension"]) == (1600, 400, None)
    fits = _jpeg(1200, 320)
    files = [
        # Inside both limits: sent as it is (only its EXIF cut out), not shrunk to 400 px wide.
        ("fits.jpg", "image/jpeg", fits),
        # Too wide only: to 1600 px wide, its height in proportion.
        ("wide.jpg", "image/jpeg", _jpeg(2400, 400)),
        # Too high only: to 400 px high, its width in proportion.
        ("tall.jpg", "image/jpeg", _jpeg(1000, 800)),
    ]
    _drop(page, files)
    for name, _, _ in files:
        expect(_item(page, name)).to_have_attribute("data-state", "ready", timeout=60_000)
    expect(_item(page, "wide.jpg").locator(".facts")).to_contain_text(
        "1600\u00d7267 · resized from 2400\u00d7400"
    )
    expect(_item(page, "tall.jpg").locator(".facts")).to_contain_text(
        "500\u00d7400 · resized from 1000\u00d7800"
    )
    expect(_item(page, "fits.jpg").locator(".facts")).to_contain_text("1200\u00d7320")
    sizes = {}
    for name, _, _ in files:
        stored = _stored(live_broker, emulator, _item(page, name).get_attribute("data-upload-id"))
        if name == "fits.jpg":
            assert stored == without_app1(fits)
        with Image.open(io.BytesIO(stored)) as image:
            sizes[name] = image.size
    assert sizes == {"fits.jpg": (1200, 320), "wide.jpg": (1600, 267), "tall.jpg": (500, 400)}
    assert rules.locator("li.queue-item").count() == 3
    for device, (width, height) in VIEWPORTS.items():
        page.set_viewport_size({"width": width, "height": height})
        screenshot(page, f"upload-banner-profile-{device}-{width}x{height}")

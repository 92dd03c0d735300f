"""The upload page's tiles and totals in real Chromium: totals that add up, the actions of each
state, wording for touch screens, and the pending-draft limit leading to a one-action discard."""

from __future__ import annotations

import io
import os
import re

import pytest
import requests
import sqlalchemy as sa
from PIL import Image
from playwright.sync_api import expect

from broker.auth.models import User
from broker.platform.db import db
from tests.browser.conftest import screenshot
from tests.browser.test_page_layout import (
    TEXT_FILE,
    _pick,
    _tile,
    layout_problems,
    serious_axe_findings,
)
from tests.browser.test_upload_page import _log_in, _png, click_and_see_deleted
from tests.factories import PASSWORD, issue_token

pytestmark = pytest.mark.browser


def _noise_png(side: int) -> bytes:
    """A PNG of random pixels (it does not compress): about 3 x side² bytes."""
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, format="PNG")
    return out.getvalue()


def test_seven_files_three_refused_one_cancelled_totals_add_up(
    live_broker, make_user, emulator, page
):
    make_user("tess", PASSWORD)
    base = live_broker.url
    _log_in(page, base, "tess")
    # The fourth file waits behind three held uploads, so it can be cancelled before it starts.
    emulator.inject_fault("upload_url", latency_ms=1500, count=3)
    good = [(f"good-{i}.png", _png(320 + i, 240)) for i in range(1, 4)]
    _pick(
        page,
        *good,
        ("waits.png", _png(100, 100)),
        *[(f"text-{i}.png", TEXT_FILE) for i in range(1, 4)],
    )
    waits = _tile(page, "waits.png")
    expect(waits).to_have_attribute("data-state", "waiting")
    waits.get_by_role("button", name="Cancel waits.png").click()
    expect(page.locator('li.queue-item[data-state="ready"]')).to_have_count(3, timeout=30_000)
    totals = page.locator("#overall-text")
    expect(totals).to_have_text("7 files: 3 ready · 3 refused · 1 cancelled")
    numbers = [
        int(n) for n in re.findall(r"(\d+) (?:ready|refused|cancelled)", totals.inner_text())
    ]
    assert sum(numbers) == 7

    # Ready: View and Copy link. Refused: Remove. Cancelled: Retry and Remove.
    ready = _tile(page, "good-1.png")
    ready.get_by_role("button", name="Copy a link to good-1.png").click()
    expect(ready).to_have_attribute("data-url", re.compile("sig="))
    with requests.get(ready.get_attribute("data-url"), timeout=10) as served:
        assert served.status_code == 200
    refused = _tile(page, "text-1.png")
    assert refused.get_by_role("button", name="Retry text-1.png").is_hidden()
    refused.get_by_role("button", name="Remove text-1.png").click()
    expect(page.locator("li.queue-item")).to_have_count(6)
    expect(totals).to_have_text("6 files: 3 ready · 2 refused · 1 cancelled")
    expect(waits.get_by_role("button", name="Retry waits.png")).to_be_visible()
    screenshot(page, "upload-totals-1100")
    ready.get_by_role("link", name="View good-1.png").click()
    page.wait_for_url(re.compile(r"/gallery/[0-9a-f]{32}$"))
    expect(page.locator(".facts-list")).to_contain_text("321 \u00d7 240 px")
    expect(page.locator(".facts-list")).to_contain_text("PNG")


def test_a_phone_is_not_told_to_drop_and_gets_a_camera(live_broker, make_user, browser):
    make_user("uma", PASSWORD)
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True
    )
    page = context.new_page()
    try:
        _log_in(page, live_broker.url, "uma")
        text = page.locator("main").inner_text().lower()
        assert "drop" not in text and "drag" not in text, text
        camera = page.get_by_role("button", name="Take a photo")
        expect(camera).to_be_visible()
        assert page.locator("#camera-input").get_attribute("capture") == "environment"
        assert page.locator("#camera-input").get_attribute("accept") == "image/*"
        with page.expect_file_chooser() as chooser:
            camera.click()
        chooser.value.set_files(
            files=[{"name": "camera.png", "mimeType": "image/png", "buffer": _png(60, 40)}]
        )
        expect(_tile(page, "camera.png")).to_have_attribute("data-state", "ready")
        assert layout_problems(page) == []
        assert serious_axe_findings(page) == []
        screenshot(page, "upload-phone-touch-390", touch=True)
    finally:
        context.close()


def test_desktop_is_invited_to_drag_and_has_no_camera_button(live_broker, make_user, page):
    make_user("vic", PASSWORD)
    _log_in(page, live_broker.url, "vic")
    expect(page.locator("#dropzone")).to_contain_text("Drag images here")
    assert page.get_by_role("button", name="Take a photo").is_hidden()


def test_pending_limit_offers_discarding_the_drafts_in_one_action(
    live_broker, make_user, emulator, page
):
    user = make_user("wes", PASSWORD)
    app, base = live_broker.app, live_broker.url
    with app.app_context():  # this user's own limit, as an admin sets it (settings are read once)
        db.session.execute(sa.update(User).where(User.id == user.id).values(max_pending_uploads=2))
        db.session.commit()
    headers = issue_token(app, user, name="old tab")
    drafts = [
        requests.post(f"{base}/api/v1/uploads", json={}, headers=headers, timeout=10).json()["id"]
        for _ in range(2)
    ]
    _log_in(page, base, "wes")
    _pick(page, ("after-limit.png", _png(200, 100)))
    tile = _tile(page, "after-limit.png")
    expect(tile).to_have_attribute("data-state", "failed")
    notice = page.get_by_role("alert")
    expect(notice).to_contain_text("limit of uploads waiting for a file")
    assert "finish or delete" not in page.locator("main").inner_text()
    assert serious_axe_findings(page) == []
    screenshot(page, "upload-pending-limit-1100")
    page.get_by_role("button", name="Discard the waiting drafts and try again").click()
    expect(tile).to_have_attribute("data-state", "ready", timeout=30_000)
    expect(notice).to_be_hidden()
    for draft in drafts:
        got = requests.get(f"{base}/api/v1/uploads/{draft}", headers=headers, timeout=10)
        assert got.json()["status"] == "deleted"


def test_progress_says_speed_and_time_left(live_broker, make_user, page):
    make_user("xia", PASSWORD)
    _log_in(page, live_broker.url, "xia")
    # Chromium's own network throttling: about 400 KB/s up, so a 2 MB file takes seconds.
    cdp = page.context.new_cdp_session(page)
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 400_000},
    )
    big = _noise_png(900)
    _pick(page, ("noise.png", big))
    speed = page.locator("#overall-speed")
    expect(speed).to_contain_text(re.compile(r"\d+ KB/s · about \d+ s left"), timeout=30_000)
    screenshot(page, "upload-speed-1100")
    expect(_tile(page, "noise.png")).to_have_attribute("data-state", "ready", timeout=60_000)
    cdp.detach()


def test_removing_a_failed_file_gives_its_draft_back(live_broker, make_user, emulator, page):
    make_user("yan", PASSWORD)
    _log_in(page, live_broker.url, "yan")
    emulator.inject_fault("upload_url", status=500, count=1)
    _pick(page, ("broke.png", _png(80, 60)))
    tile = _tile(page, "broke.png")
    expect(tile).to_have_attribute("data-state", "failed")
    upload_id = tile.get_attribute("data-upload-id")
    click_and_see_deleted(page, tile.get_by_role("button", name="Remove broke.png"), upload_id)
    expect(page.locator("li.queue-item")).to_have_count(0)
    expect(page.locator("#overall")).to_be_hidden()
    # Focus is not lost: with no tile left it returns to the drop zone.
    expect(page.locator("#dropzone")).to_be_focused()

"""The upload page of one upload profile in real headless Chromium: the avatar page says its
rules, takes one file and creates its upload under the avatar profile, and the broker's own
check of the original refuses a file the page let through (4000x3000 for a 512-px square)."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.test_upload_page import _log_in, _png
from tests.factories import AVATAR_PROFILE, PASSWORD, upload_rows

pytestmark = pytest.mark.browser


@pytest.fixture
def live_broker_settings(tmp_path) -> dict[str, Any]:
    path = tmp_path / "profiles.toml"
    path.write_text(AVATAR_PROFILE, encoding="utf-8")
    return {"UPLOAD_PROFILES": str(path)}


def test_the_avatar_page_takes_one_file_under_the_avatar_profile(
    live_broker, make_user, emulator, page
):
    make_user("alice", PASSWORD)
    base = live_broker.url
    _log_in(page, base, "alice")
    page.goto(f"{base}/upload?profile=avatar")
    expect(page.get_by_role("heading", level=1)).to_have_text(
        "Upload an image: Your profile picture"
    )
    expect(page.locator("#profile-rules")).to_contain_text("Aspect ratio 1:1")
    picker = page.locator("#file-input")
    assert picker.get_attribute("multiple") is None
    assert picker.get_attribute("accept") == "image/jpeg,image/png"

    picker.set_input_files([{"name": "me.png", "mimeType": "image/png", "buffer": _png(256, 256)}])
    page.wait_for_selector('li.queue-item[data-state="ready"]', timeout=30_000)
    [row] = upload_rows(live_broker.app)
    assert (row.profile, row.status) == ("avatar", "ready")

    page.goto(f"{base}/upload?profile=avatar")
    page.locator("#file-input").set_input_files(
        [{"name": "wide.png", "mimeType": "image/png", "buffer": _png(4000, 3000)}]
    )
    # The page has no check of its own for the profile's rules yet: the broker's check of the
    # original refuses the file, and the tile says which rule.
    failed = page.locator('li.queue-item[data-state="failed"]')
    expect(failed).to_have_count(1, timeout=30_000)
    expect(failed.locator(".state")).to_contain_text("max_width")
    rejected = [r for r in upload_rows(live_broker.app) if r.id != row.id]
    assert [r.status for r in rejected] == ["rejected"]
    assert rejected[0].reject_reason.startswith("max_width: image is 4000 px wide")
    assert emulator.emulator.store.get_image(rejected[0].image_id) is None

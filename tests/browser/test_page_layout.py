"""Every page on phones (320, 360, 390 px) and a laptop (1280x800) with files in every state:
nothing overlaps (every image against every text run), the header keeps to one line, no page
scrolls sideways; the keyboard reaches every action; screenshots land in test-artifacts/."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import requests
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import expect

from tests.browser.conftest import screenshot, seed_admin
from tests.browser.test_upload_page import _log_in, _png
from tests.factories import issue_token

pytestmark = pytest.mark.browser

LAYOUT_JS = (Path(__file__).parent / "layout.js").read_text()
CONTROLS_JS = (Path(__file__).parent / "controls.js").read_text()
WIDTHS = {"320": (320, 640), "360": (360, 740), "390": (390, 844), "1280": (1280, 800)}
SCREENSHOT_WIDTHS = ("390", "1280")
STATES = ("waiting", "uploading", "ready", "refused", "failed", "cancelled")
TEXT_FILE = b"this is plain text, not an image\n" * 20


def layout_problems(page: Any) -> list[str]:
    """Return what overlaps or overflows on the page as shown now, once it has its styles.

    After a form's submit the new document is in the DOM before its stylesheets have loaded
    (a busy machine shows it): measured then, the header is unstyled and "wraps".
    """
    page.wait_for_load_state("load")
    page.evaluate("document.fonts.ready")
    return page.evaluate(LAYOUT_JS)


def serious_axe_findings(page: Any) -> list[str]:
    """Return axe-core's serious and critical findings on the page as shown now."""
    return [
        f"{v['id']}: {[n['target'] for n in v['nodes']][:3]}"
        for v in Axe().run(page).response["violations"]
        if v["impact"] in ("serious", "critical")
    ]


def _pick(page: Any, *files: tuple[str, bytes]) -> None:
    page.locator("#file-input").set_input_files(
        files=[{"name": n, "mimeType": "image/png", "buffer": data} for n, data in files]
    )


def _tile(page: Any, name: str) -> Any:
    return page.locator("li.queue-item", has=page.locator(".name", has_text=name))


def fill_every_state(page: Any, emulator: Any) -> None:
    """Put a file in every state on the upload page (the emulator holds the last ones)."""
    _pick(page, ("sunset-over-the-harbour.png", _png(640, 480)))
    expect(_tile(page, "sunset-over-the-harbour.png")).to_have_attribute("data-state", "ready")
    _pick(page, ("notes-not-an-image.png", TEXT_FILE))
    expect(_tile(page, "notes-not-an-image.png")).to_have_attribute("data-state", "refused")
    emulator.inject_fault("upload_url", status=500, count=1)
    _pick(page, ("broken-connection.png", _png(300, 200)))
    expect(_tile(page, "broken-connection.png")).to_have_attribute("data-state", "failed")
    # Held in the browser (never answered, so nothing reaches the emulator after the test):
    # three upload at once, the rest wait.
    page.route(re.compile(r".*/upload/[^/]+/[^/]+$"), lambda route: None)
    slow = [(f"slow-{i}.png", _png(200 + i, 150)) for i in range(1, 6)]
    _pick(page, *slow)
    expect(page.locator('li.queue-item[data-state="uploading"]')).to_have_count(3)
    first = _tile(page, "slow-1.png")
    first.get_by_role("button", name="Cancel").click()
    expect(first).to_have_attribute("data-state", "cancelled")
    expect(page.locator('li.queue-item[data-state="uploading"]')).to_have_count(3)
    for state in STATES:
        assert page.locator(f'li.queue-item[data-state="{state}"]').count() >= 1, state


def _keyboard_reaches_everything(page: Any) -> list[str]:
    """Tab through the page; return the visible controls focus never reached."""
    controls = page.evaluate(CONTROLS_JS)
    page.locator("body").focus()
    reached = set()
    for _ in range(len(controls) + 5):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("document.activeElement.dataset.kbd || ''"))
    return [c for c in controls if c.split(":", 1)[0] not in reached]


def _refuse_one(app: Any, base: str, headers: dict[str, str]) -> None:
    """Leave one upload refused by the rules, for the gallery's Refused tab."""
    from broker.platform.db import db
    from broker.uploads.models import Upload, UploadStatus

    made = requests.post(f"{base}/api/v1/uploads", json={}, headers=headers, timeout=10)
    assert made.status_code == 201, made.text
    with app.app_context():
        upload = db.session.get(Upload, made.json()["id"])
        upload.status = UploadStatus.REJECTED
        upload.reject_reason = "image is 14000x9000; the limit is 12000 px per side"
        db.session.commit()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("width", list(WIDTHS))
def test_nothing_overlaps_on_any_page(live_broker, make_user, emulator, browser, width):
    w, h = WIDTHS[width]
    app, base = live_broker.app, live_broker.url
    admin, ready_id = seed_admin(app, make_user, (1600, 1200))
    headers = issue_token(app, admin, name="Script")
    draft = requests.post(f"{base}/api/v1/uploads", json={}, headers=headers, timeout=10)
    assert draft.status_code == 201, draft.text
    draft_id = draft.json()["id"]
    _refuse_one(app, base, headers)

    context = browser.new_context(viewport={"width": w, "height": h})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    failures: dict[str, list[str]] = {}

    def check(name: str, path: str | None = None) -> None:
        if path is not None:
            response = page.goto(f"{base}{path}")
            assert response is not None and response.ok, (path, response and response.status)
            page.wait_for_load_state("load")
        problems = layout_problems(page)
        if width in SCREENSHOT_WIDTHS:
            problems += serious_axe_findings(page)
            screenshot(page, f"layout-{name}-{w}")
        if width == "1280":
            problems += [f"no keyboard route to {c}" for c in _keyboard_reaches_everything(page)]
        if problems:
            failures[name] = problems

    try:
        check("login", "/auth/login")
        _log_in(page, base, "root")
        fill_every_state(page, emulator)
        check("upload-every-state")
        emulator.clear_faults()
        check("gallery", "/gallery")
        check("gallery-drafts", "/gallery?show=drafts")
        check("gallery-refused", "/gallery?show=refused")
        check("detail", f"/gallery/{ready_id}")
        page.get_by_role("button", name="Copy link: thumb").click()
        expect(page.locator("#action-status")).to_contain_text("UTC")
        check("detail-link-copied")
        check("detail-draft", f"/gallery/{draft_id}")
        page.goto(f"{base}/auth/account")
        # One long word, as device names often are: it must wrap, not widen the page.
        page.get_by_label("Token name").fill("SamsungGalaxyTabS9UltraOfTheWholeHousehold")
        page.get_by_role("button", name="Create token").click()
        expect(page.locator("#new-token")).to_be_visible()
        check("account-new-token")
        check("admin", "/admin")
    finally:
        emulator.clear_faults()
        context.close()
    assert failures == {}
    assert errors == []

"""Every page, on a laptop (1280x800) and a phone (390x844): no wider than the screen, no serious
or critical axe-core violation, a screenshot under test-artifacts/. Then what keyboard users and
the account page need: focus never lost or invisible, a token made once and revoked on purpose."""

from __future__ import annotations

from typing import Any

import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import expect

from tests.browser.conftest import screenshot, seed_admin
from tests.browser.test_upload_page import _csp_violations, _log_in, _png
from tests.factories import PASSWORD, issue_token

pytestmark = pytest.mark.browser

VIEWPORTS = {"laptop": (1280, 800), "phone": (390, 844)}
BLOCKING = ("serious", "critical")


def _problems(page: Any, axe: Axe) -> list[str]:
    """Return what is wrong with the page as shown now (width, then axe's serious findings)."""
    found = []
    width, viewport = page.evaluate(
        "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    if width > viewport:
        found.append(f"the document is {width} px wide on a {viewport} px screen")
    # axe-core is injected into this test's own page (bundled with the package: no network).
    for violation in axe.run(page).response["violations"]:
        if violation["impact"] in BLOCKING:
            targets = [node["target"] for node in violation["nodes"]][:3]
            found.append(f"{violation['id']} ({violation['impact']}): {targets}")
    return found


# Ten pages, each loaded, measured, screenshotted and audited by axe-core: about 30 s on a quiet
# 2-core machine, but several times that when the machine is shared; the default 120 s would
# fail a correct page for being slow.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("device", list(VIEWPORTS))
def test_every_page_fits_the_screen_and_passes_axe(live_broker, make_user, browser, device):
    width, height = VIEWPORTS[device]
    app, base = live_broker.app, live_broker.url
    admin, upload_id = seed_admin(app, make_user, (4000, 3000))
    issue_token(app, admin, name="A phone with a rather long device name, as people type them")

    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(20_000)
    axe = Axe()
    failures: dict[str, list[str]] = {}

    def check(name: str, path: str) -> None:
        page.goto(f"{base}{path}")
        page.wait_for_load_state("load")
        problems = _problems(page, axe)
        if problems:
            failures[name] = problems
        screenshot(page, f"page-{name}-{device}-{width}x{height}")

    try:
        check("landing", "/")
        check("login", "/auth/login")
        check("register", "/auth/register")
        check("api-docs", "/api/v1/docs")
        _log_in(page, base, "root")
        check("upload", "/upload")
        check("gallery", "/gallery")
        check("detail", f"/gallery/{upload_id}")
        if device == "laptop":
            # The actions of a large photo are on the first screen, no scrolling needed.
            expect(page.locator(".detail img")).to_have_js_property("complete", True)
            for name in ("Copy link: medium", "Delete…"):
                box = page.get_by_role("button", name=name).bounding_box()
                assert box and box["y"] >= 0 and box["y"] + box["height"] <= height, (name, box)
        check("account", "/auth/account")
        check("admin", "/admin")
        check("error", "/gallery/no-such-image")
        assert page.locator("h1").inner_text() == "404"
    finally:
        context.close()
    assert failures == {}


def _focus_is_visible(page: Any) -> dict[str, Any]:
    return page.evaluate(
        """() => {
            const el = document.activeElement;
            const box = el.getBoundingClientRect();
            const style = getComputedStyle(el);
            return { tag: el.tagName, id: el.id, text: (el.textContent || "").trim().slice(0, 40),
                     visible: box.width > 2 && box.height > 2 && style.visibility !== "hidden",
                     outline: style.outlineStyle !== "none" || style.boxShadow !== "none" };
        }"""
    )


def test_keyboard_focus_is_always_somewhere_visible(live_broker, make_user, emulator, page):
    make_user("hana", PASSWORD)
    base = live_broker.url
    # A refused login puts the cursor back in the form, on the password to type again.
    page.goto(f"{base}/auth/login")
    page.get_by_label("Username").fill("hana")
    page.get_by_label("Password", exact=True).fill("not the password")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("Invalid username or password")
    expect(page.get_by_label("Password", exact=True)).to_be_focused()
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{base}/upload")

    # Every tab stop of the upload page is a visible control with a visible focus ring (the file
    # input is not one: the drop zone opens the picker).
    page.locator("body").focus()
    seen = []
    for _ in range(12):
        page.keyboard.press("Tab")
        focus = _focus_is_visible(page)
        if focus["tag"] == "BODY" or (seen and focus == seen[0]):
            break
        assert focus["visible"] and focus["outline"], focus
        assert focus["id"] != "file-input", focus
        seen.append(focus)
    assert any(f["id"] == "dropzone" for f in seen), seen

    # Cancel by keyboard leaves focus on that row's Retry; Retry, on its Cancel; a row that
    # finishes while focused keeps focus in the row.
    emulator.inject_fault("upload_url", latency_ms=2000, count=1)
    page.locator("#file-input").set_input_files(
        files=[{"name": "kbd.png", "mimeType": "image/png", "buffer": _png(90, 60)}]
    )
    row = page.locator("li.queue-item")
    expect(row).to_have_attribute("data-state", "uploading")
    row.get_by_role("button", name="Cancel").focus()
    page.keyboard.press("Enter")
    expect(row).to_have_attribute("data-state", "cancelled")
    expect(row.get_by_role("button", name="Retry")).to_be_focused()
    page.keyboard.press("Enter")
    expect(row.get_by_role("button", name="Cancel")).to_be_focused()
    expect(row).to_have_attribute("data-state", "ready", timeout=30_000)
    # Ready: Cancel is gone, so focus moves to the row's first action, View (visible ring).
    expect(row.get_by_role("link", name="View kbd.png")).to_be_focused()
    assert _focus_is_visible(page)["outline"]
    assert _csp_violations(page) == []


def test_account_page_creates_copies_and_revokes_a_token(live_broker, make_user, page):
    make_user("ivan", PASSWORD)
    base = live_broker.url
    _log_in(page, base, "ivan")
    page.goto(f"{base}/auth/account")
    page.get_by_label("Token name").fill("Backup script")
    page.get_by_role("button", name="Create token").click()
    field = page.locator("#new-token")
    secret = field.input_value()
    assert secret.startswith("brk_")
    expect(page.get_by_role("heading", name="Your new token")).to_be_focused()
    page.get_by_role("button", name="Copy", exact=True).click()
    expect(page.locator("#copy-status")).to_contain_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    me = page.request.get(f"{base}/api/v1/me", headers={"Authorization": f"Bearer {secret}"})
    assert me.status == 200 and me.json()["username"] == "ivan"

    # Revoking asks first; "Keep it" keeps the token.
    page.goto(f"{base}/auth/account")
    revoke = page.get_by_role("button", name="Revoke the token of Backup script")
    revoke.click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Revoke the token of “Backup script”?")
    page.get_by_role("button", name="Keep it").click()
    expect(dialog).to_be_hidden()
    assert (
        page.request.get(f"{base}/api/v1/me", headers={"Authorization": f"Bearer {secret}"}).status
        == 200
    )
    revoke.click()
    page.get_by_role("button", name="Revoke", exact=True).click()
    expect(page.get_by_role("status").first).to_contain_text("revoked")
    expect(page.get_by_text("No active tokens.")).to_be_visible()
    assert (
        page.request.get(f"{base}/api/v1/me", headers={"Authorization": f"Bearer {secret}"}).status
        == 401
    )
    screenshot(page, "account-token-revoked")
    assert _csp_violations(page) == []

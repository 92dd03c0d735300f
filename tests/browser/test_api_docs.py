"""The API reference page in real headless Chromium, at a desktop and a phone size."""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.conftest import ARTIFACTS, LiveBroker

pytestmark = pytest.mark.browser

SIZES = [(1280, 800), (390, 844)]


def _screenshot(page: Any, name: str) -> None:
    """Save what the screen shows (the whole page is many screens long) under test-artifacts/."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_docs_page_reads_on_desktop_and_phone_under_the_strict_csp(
    page: Any, live_broker: LiveBroker, width: int, height: int
) -> None:
    page.set_viewport_size({"width": width, "height": height})
    page.goto(f"{live_broker.url}/api/v1/docs")
    page.wait_for_load_state("networkidle")
    assert page.evaluate("window.__csp") == []  # nothing refused by the CSP, scripts included
    errors = [text for kind, text in page.console_messages_seen if kind == "error"]
    assert errors == []
    # Nothing wider than the screen: no sideways scrolling of the page itself.
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    _screenshot(page, f"api-docs-{width}x{height}")

    # An operation as a developer reads it: typed fields, rules, examples, its errors.
    create = page.locator("#create_upload")
    page.goto(f"{live_broker.url}/api/v1/docs#create_upload")  # a link opens its details
    page.wait_for_load_state("networkidle")
    text = create.inner_text()
    for expected in ("Idempotency-Key", "expires_in", "≥ 120", "too_many_pending_uploads"):
        assert expected in text, expected
    assert "$ref" not in text and "`" not in text
    _screenshot(page, f"api-docs-create-upload-{width}x{height}")


def test_copy_buttons_put_the_snippet_on_the_clipboard(page: Any, live_broker: LiveBroker) -> None:
    live_broker.app.config["PUBLIC_URL"] = live_broker.url  # the snippets name the broker by it
    page.goto(f"{live_broker.url}/api/v1/docs")
    page.get_by_role("button", name="Copy curl example").click()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.startswith(f"BROKER={live_broker.url}\n")
    assert "Idempotency-Key: $KEY" in copied
    assert page.get_by_role("status").inner_text() == "Copied to the clipboard."
    for language in ("JavaScript (fetch)", "Swift (URLSession)", "Kotlin (OkHttp)"):
        page.get_by_text(language, exact=True).click()  # opens its <details>
        assert page.get_by_role("button", name=f"Copy {language} example").is_visible()

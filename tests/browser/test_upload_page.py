"""The upload page, gallery and delete flow in real headless Chromium."""

from __future__ import annotations

import base64
import io
import os
import re
from typing import Any

import pytest
import requests
from PIL import Image
from playwright.sync_api import expect

from tests.browser.conftest import screenshot
from tests.factories import PASSWORD

pytestmark = pytest.mark.browser


def _png(width: int, height: int, color: tuple[int, int, int] = (40, 120, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def _noise_png_over_10mb() -> bytes:
    # Random pixels do not compress: 1900x1900 RGB is ~10.8 MB as PNG.
    side = 1900
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(
        out, format="PNG", compress_level=0
    )
    data = out.getvalue()
    assert len(data) > 10 * 1024 * 1024
    return data


def _log_in(page: Any, base: str, username: str) -> None:
    page.goto(f"{base}/auth/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{base}/upload")


def _drop(page: Any, files: list[tuple[str, str, bytes]], *, paste: bool = False) -> None:
    """Drop files on the drop zone as a user dragging them from the desktop would (`paste`:
    paste them on the page instead, as from a file manager's copy of several files)."""
    payload = [
        {"name": name, "type": mime, "b64": base64.b64encode(data).decode()}
        for name, mime, data in files
    ]
    page.evaluate(
        """([files, paste]) => {
            const transfer = new DataTransfer();
            for (const f of files) {
                const text = atob(f.b64);
                const bytes = new Uint8Array(text.length);
                for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
                transfer.items.add(new File([bytes], f.name, { type: f.type }));
            }
            if (paste) {
                const init = { clipboardData: transfer, bubbles: true, cancelable: true };
                document.body.dispatchEvent(new ClipboardEvent("paste", init));
                return;
            }
            const zone = document.getElementById("dropzone");
            for (const type of ["dragenter", "dragover", "drop"]) {
                const init = { dataTransfer: transfer, bubbles: true, cancelable: true };
                zone.dispatchEvent(new DragEvent(type, init));
            }
        }""",
        [payload, paste],
    )


def _item(page: Any, name: str) -> Any:
    return page.locator("li.queue-item", has=page.locator(".name", has_text=name))


def _csp_violations(page: Any) -> list[str]:
    reported = page.evaluate("window.__csp")
    console = [t for kind, t in page.console_messages_seen if "Content Security Policy" in t]
    return reported + console


def test_upload_refuse_ready_gallery_delete(live_broker, make_user, emulator, page):
    make_user("alice", PASSWORD)
    base = live_broker.url
    _log_in(page, base, "alice")
    # Slow the emulator's answer to the file POST so the page can be seen mid-upload.
    emulator.inject_fault("upload_url", latency_ms=1200)

    good, fake, big = _png(640, 480), b"this is plain text, not an image\n" * 20, None
    big = _noise_png_over_10mb()
    _drop(
        page,
        [
            ("holiday.png", "image/png", good),
            ("notes.png", "image/png", fake),
            ("huge.png", "image/png", big),
        ],
    )

    page.wait_for_selector('li.queue-item[data-state="uploading"]')
    screenshot(page, "upload-page-mid-upload")
    page.wait_for_selector('li.queue-item[data-state="ready"]', timeout=30_000)

    refused_fake = _item(page, "notes.png")
    assert refused_fake.get_attribute("data-state") == "refused"
    assert "Not a supported image" in refused_fake.locator(".state").inner_text()
    refused_big = _item(page, "huge.png")
    assert refused_big.get_attribute("data-state") == "refused"
    assert "Too large" in refused_big.locator(".state").inner_text()

    ready = _item(page, "holiday.png")
    upload_id = ready.get_attribute("data-upload-id")
    assert upload_id
    thumb = ready.locator("img.thumb")
    expect(thumb).to_have_js_property("naturalWidth", 256)  # the `thumb` variant: 256x256 cover
    assert page.locator("#live").get_attribute("aria-live") == "polite"
    # Only the good file reached the broker; the refused ones never asked for an upload URL.
    assert emulator.counters().get("direct_upload") == 1

    page.goto(f"{base}/gallery")
    tile = page.locator(f'li[data-upload-id="{upload_id}"]')
    assert tile.count() == 1
    expect(tile.locator("img")).to_have_js_property("naturalWidth", 256)
    screenshot(page, "gallery")

    tile.locator("a").click()
    page.wait_for_url(f"{base}/gallery/{upload_id}")
    page.get_by_role("button", name="Copy link: medium").click()
    expect(page.locator("#action-status")).to_have_attribute("data-url", re.compile("sig="))
    link = page.locator("#action-status").get_attribute("data-url")
    assert link.startswith(emulator.url) and "sig=" in link
    with requests.get(link, timeout=10) as served:
        assert served.status_code == 200 and served.headers["Content-Type"] == "image/png"

    page.get_by_role("button", name="Delete…").click()
    page.get_by_role("button", name="Delete", exact=True).click()
    page.wait_for_url(f"{base}/gallery")
    assert page.locator(f'li[data-upload-id="{upload_id}"]').count() == 0
    image_id = _image_id(live_broker, upload_id)
    with requests.get(
        f"{emulator.api_base}/accounts/{emulator.account_id}/images/v1/{image_id}",
        headers={"Authorization": f"Bearer {emulator.api_token}"},
        timeout=10,
    ) as gone:
        assert gone.status_code == 404

    assert _csp_violations(page) == []


def test_retry_after_injected_upload_failure_uses_a_new_url(live_broker, make_user, emulator, page):
    make_user("bob", PASSWORD)
    base = live_broker.url
    _log_in(page, base, "bob")
    emulator.inject_fault("upload_url", status=500, count=1)

    page.locator("#file-input").set_input_files(
        files=[{"name": "retry.png", "mimeType": "image/png", "buffer": _png(300, 200)}]
    )
    item = _item(page, "retry.png")
    page.wait_for_selector('li.queue-item[data-state="failed"]')
    first_id = item.get_attribute("data-upload-id")
    assert first_id
    assert "Failed" in item.locator(".state").inner_text()

    item.get_by_role("button", name="Retry retry.png").click()
    page.wait_for_selector('li.queue-item[data-state="ready"]', timeout=30_000)
    second_id = item.get_attribute("data-upload-id")
    assert second_id and second_id != first_id
    assert emulator.counters().get("direct_upload") == 2
    assert _csp_violations(page) == []


def test_keyboard_only_file_picker_and_cancel(live_broker, make_user, emulator, page):
    make_user("carol", PASSWORD)
    _log_in(page, live_broker.url, "carol")
    emulator.inject_fault("upload_url", latency_ms=3000)
    # Listening first lets Playwright intercept the chooser before the key press opens it.
    with page.expect_file_chooser() as chooser:
        page.locator("#dropzone").focus()
        assert page.evaluate("document.activeElement.id") == "dropzone"
        page.keyboard.press("Enter")
    chooser.value.set_files(
        files=[{"name": "slow.png", "mimeType": "image/png", "buffer": _png(100, 100)}]
    )
    item = _item(page, "slow.png")
    page.wait_for_selector('li.queue-item[data-state="uploading"]')
    item.get_by_role("button", name="Cancel").focus()
    page.keyboard.press("Enter")
    page.wait_for_selector('li.queue-item[data-state="cancelled"]')
    assert item.get_by_role("button", name="Retry").is_visible()


def _image_id(live: Any, upload_id: str) -> str:
    from broker.platform.db import db
    from broker.uploads.models import Upload

    with live.app.app_context():
        return db.session.get(Upload, upload_id).image_id


def test_cancel_gives_the_upload_slot_back(live_broker, make_user, emulator, page):
    make_user("dave", PASSWORD)
    _log_in(page, live_broker.url, "dave")
    emulator.inject_fault("upload_url", latency_ms=3000)
    page.locator("#file-input").set_input_files(
        files=[{"name": "never.png", "mimeType": "image/png", "buffer": _png(120, 80)}]
    )
    item = _item(page, "never.png")
    page.wait_for_selector('li.queue-item[data-state="uploading"]')
    upload_id = item.get_attribute("data-upload-id")
    # The page deletes the unused slot so it does not count against the pending limit.
    click_and_see_deleted(page, item.get_by_role("button", name="Cancel"), upload_id)
    page.wait_for_selector('li.queue-item[data-state="cancelled"]')
    expect(page.locator("#live")).to_contain_text("never.png was cancelled")
    assert _status(live_broker, upload_id) == "deleted"


def click_and_see_deleted(page: Any, button: Any, upload_id: str) -> None:
    """Click `button` and check the page deleted that upload through the API (200)."""
    with page.expect_response(
        lambda r: r.request.method == "DELETE" and r.url.endswith(f"/uploads/{upload_id}")
    ) as deleted:
        button.click()
    assert deleted.value.status == 200


def _status(live: Any, upload_id: str) -> str:
    from broker.platform.db import db
    from broker.uploads.models import Upload

    with live.app.app_context():
        return db.session.get(Upload, upload_id).status

"""The upload queue survives a reload (IndexedDB) and a broken connection, in real Chromium: what
is counted is what the emulator stored and what the broker recorded, never the page's word."""

from __future__ import annotations

import io
import os
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
import time_machine
from PIL import Image
from playwright.sync_api import expect

from broker.emulator.testing import make_image
from broker.platform.db import db
from broker.uploads.models import Upload
from tests.browser.test_prepare import _stored
from tests.browser.test_upload_page import _drop, _item, _log_in
from tests.factories import PASSWORD

pytestmark = pytest.mark.browser


@pytest.fixture
def live_broker_settings() -> dict[str, Any]:
    """Upload links that live two minutes, the shortest Cloudflare allows."""
    return {"UPLOAD_DEFAULT_EXPIRY": 120}


COLOURS = [
    (200, 30, 30),
    (30, 200, 30),
    (30, 30, 200),
    (200, 200, 30),
    (30, 200, 200),
    (90, 90, 90),
]


def _six() -> list[tuple[str, str, bytes]]:
    return [
        (f"photo-{i}.png", "image/png", make_image(300 + i, 200, "PNG", color=colour))
        for i, colour in enumerate(COLOURS)
    ]


def _noise_png(side: int) -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "PNG")
    return out.getvalue()


def _uploads(live: Any, username: str) -> list[Upload]:
    from broker.auth.models import User

    with live.app.app_context():
        user = db.session.scalar(sa.select(User).where(User.username == username))
        rows = db.session.scalars(sa.select(Upload).where(Upload.user_id == user.id)).all()
        db.session.expunge_all()
        return list(rows)


def _stored_once(live: Any, emulator: Any, username: str, files: list[Any]) -> list[Upload]:
    """Assert every file is stored at the image service exactly once; return the ready rows."""
    ready = [u for u in _uploads(live, username) if u.status == "ready"]
    blobs = [_stored(live, emulator, u.id) for u in ready]
    assert sorted(blobs) == sorted(data for _, _, data in files)
    return ready


def test_reload_in_the_middle_of_six_files_loses_none_and_sends_each_once(
    live_broker, make_user, emulator, page
):
    make_user("rosa", PASSWORD)
    _log_in(page, live_broker.url, "rosa")
    files = _six()
    _drop(page, files[:1])
    expect(_item(page, files[0][0])).to_have_attribute("data-state", "ready")
    # The next transfers are held in the browser (nothing reaches the image service), so the
    # reload finds a file done, three on the wire with their upload links, two not started.
    holding = [True]
    page.route(
        re.compile(r".*/upload/[^/]+/[^/]+$"),
        lambda route: None if holding[0] else route.continue_(),
    )
    _drop(page, files[1:])
    uploading = page.locator('li.queue-item[data-state="uploading"]')
    expect(uploading).to_have_count(3)
    on_the_wire = [
        uploading.nth(i).get_attribute("data-upload-id") for i in range(uploading.count())
    ]
    done = [files[0][0]]
    assert all(on_the_wire)
    holding[0] = False  # the held ones end with the page; those after the reload go through
    # While the page is gone its upload links run out (the broker's and the image service's
    # clocks move on together): the ones on the wire must be replaced.
    with time_machine.travel(datetime.now(UTC) + timedelta(seconds=300), tick=True):
        page.reload()

        left = page.locator("li.queue-item")
        # Every file not done before the reload is back in the queue by itself, and only those.
        expect(left).to_have_count(6 - len(done))
        names = left.locator(".name").all_inner_texts()
        assert sorted(names) == sorted(n for n, _, _ in files if n not in done)
        for name in names:
            expect(_item(page, name)).to_have_attribute("data-state", "ready", timeout=60_000)

        ready = _stored_once(live_broker, emulator, "rosa", files)
        assert len(ready) == 6
        # The links that expired while the page was away were replaced by new uploads, without
        # the user doing anything: their drafts never got a file and were given back.
        by_id = {u.id: u for u in _uploads(live_broker, "rosa")}
        assert all(by_id[old].status in ("deleted", "expired") for old in on_the_wire), [
            by_id[old].status for old in on_the_wire
        ]
        # Nothing is left in the browser's storage once every file is ready.
        page.reload()
        expect(page.locator("#dropzone")).to_be_visible()
        assert (
            page.evaluate(
                """async () => (await import("/static/js/store.js")).load(
                document.getElementById("queue").dataset.owner).then((r) => r.length)"""
            )
            == 0
        )
        expect(page.locator("li.queue-item")).to_have_count(0)


def test_a_dropped_connection_is_retried_and_offline_waits_for_the_network(
    live_broker, make_user, emulator, page
):
    make_user("otto", PASSWORD)
    _log_in(page, live_broker.url, "otto")
    # The first transfer's connection is cut by the image service's side.
    emulator.inject_fault("upload_url", drop=True, count=1)
    files = _six()[:2]
    _drop(page, files[:1])
    first = _item(page, files[0][0])
    expect(first.locator(".state")).to_contain_text("Connection lost: trying again in 1 s")
    expect(first).to_have_attribute("data-state", "ready", timeout=30_000)

    # Offline: the file waits, says so, and goes when the browser is online again.
    page.context.set_offline(True)
    _drop(page, files[1:])
    second = _item(page, files[1][0])
    expect(second).to_have_attribute("data-state", "paused", timeout=30_000)
    expect(second.locator(".state")).to_have_text("Offline: waiting for the network")
    page.context.set_offline(False)
    expect(second).to_have_attribute("data-state", "ready", timeout=30_000)
    ready = _stored_once(live_broker, emulator, "otto", files)
    assert len(ready) == 2


KEPT = """() => new Promise((resolve, reject) => {
    // Every record in the browser's upload store, whoever it belongs to: [owner, name].
    const opening = indexedDB.open("upload-broker");
    opening.onerror = () => reject(opening.error);
    opening.onsuccess = () => {
        const db = opening.result;
        if (!db.objectStoreNames.contains("queue")) { db.close(); resolve([]); return; }
        const all = db.transaction("queue").objectStore("queue").getAll();
        all.onsuccess = () => {
            db.close();
            resolve(all.result.map((r) => [r.owner, r.file.name]));
        };
        all.onerror = () => reject(all.error);
    };
})"""


def _unsent(page: Any, files: list[tuple[str, str, bytes]]) -> str:
    """Drop `files` with their transfers held in the browser; return the page's owner key once
    the store keeps each of them."""
    page.route(re.compile(r".*/upload/[^/]+/[^/]+$"), lambda route: None)
    _drop(page, files)
    expect(page.locator('li.queue-item[data-state="uploading"]')).to_have_count(len(files))
    owner = page.locator("#queue").get_attribute("data-owner")
    page.wait_for_function(f"async () => (await ({KEPT})()).length === {len(files)}", polling=100)
    return owner


def test_logging_out_forgets_the_queue_and_the_next_user_never_sees_another_users_files(
    live_broker, make_user, emulator, page
):
    make_user("ana", PASSWORD)
    make_user("ben", PASSWORD)
    files = _six()
    _log_in(page, live_broker.url, "ana")
    owner = _unsent(page, files[:2])
    assert sorted(page.evaluate(KEPT)) == sorted([owner, n] for n, _, _ in files[:2])

    # Ana logs out with the header's button: nothing of hers is left in the browser.
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(f"{live_broker.url}/auth/login")
    assert page.evaluate(KEPT) == []

    # Her session ends without a log-out (the cookies go) while files are still unsent; Ben
    # signs in on the same browser: he sees none of them, and they are gone from its storage.
    _log_in(page, live_broker.url, "ana")
    page.unroute_all(behavior="ignoreErrors")
    _unsent(page, files[2:4])
    page.context.clear_cookies()
    _log_in(page, live_broker.url, "ben")
    expect(page.locator("#dropzone")).to_be_visible()
    page.wait_for_function(f"async () => (await ({KEPT})()).length === 0", polling=100)
    expect(page.locator("li.queue-item")).to_have_count(0)
    for name in ("ana", *(n for n, _, _ in files[:4])):
        expect(page.locator("main")).not_to_contain_text(name)

    # His own file goes as usual, once.
    page.unroute_all(behavior="ignoreErrors")
    _drop(page, files[4:5])
    expect(_item(page, files[4][0])).to_have_attribute("data-state", "ready")
    assert len(_stored_once(live_broker, emulator, "ben", files[4:5])) == 1
    assert page.evaluate(KEPT) == []

"""Real headless Chromium (Debian's build) against the broker and the emulator on loopback."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import make_server

ARTIFACTS = Path(__file__).resolve().parent.parent.parent / "test-artifacts"


@dataclass
class LiveBroker:
    """A broker served over real HTTP with its worker running, as `make run` does."""

    app: Flask
    url: str
    _stop: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        """Stop the worker and the server."""
        for stop in reversed(self._stop):
            stop()


@pytest.fixture
def live_broker_settings() -> dict[str, Any]:
    """Settings a test module adds to its live broker (override this fixture)."""
    return {}


def profiles_settings(tmp_path: Path, text: str) -> dict[str, Any]:
    """Settings for a live broker with the upload profiles `text` (TOML) in a file."""
    path = tmp_path / "profiles.toml"
    path.write_text(text, encoding="utf-8")
    return {"UPLOAD_PROFILES": str(path)}


def whole_answers(app: Any) -> Callable[..., Any]:
    """Wrap a WSGI app so that each answer is read whole, and its iterable closed, before the
    server writes it.

    werkzeug's development server closes an answer's iterable (a static file, for one) only
    after draining the request socket, and that read raises when the browser has dropped the
    connection (a page navigated away mid-download): the file would stay open until collected,
    a ResourceWarning. The broker streams nothing, so reading answers whole changes nothing else.
    """

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        answer = app(environ, start_response)
        try:
            return list(answer)
        finally:
            close = getattr(answer, "close", None)
            if close is not None:
                close()

    return serve


def serve_live(app: Flask, *, worker: bool = True) -> LiveBroker:
    """Serve `app` on 127.0.0.1 with an inline worker thread (`worker=False`: none, the test
    runs the worker's passes itself); `close()` stops both."""
    from broker.devserver import prepare_upstream
    from broker.worker import start_inline

    with app.app_context():
        # What `make run` does at start: declared variants upstream, signing keys mirrored.
        problems = [line for line in prepare_upstream() if "fail" in line.lower()]
        assert not problems, problems
    server = make_server("127.0.0.1", 0, whole_answers(app), threaded=True)
    serving = threading.Thread(target=server.serve_forever, name="live-broker", daemon=True)
    serving.start()
    worker_thread, stop_worker = start_inline(app) if worker else (None, None)
    live = LiveBroker(app=app, url=f"http://127.0.0.1:{server.server_port}")

    def stop_all() -> None:
        if worker_thread and stop_worker:
            stop_worker.set()
            worker_thread.join(timeout=30)
        server.shutdown()
        server.server_close()
        serving.join(timeout=10)

    live._stop.append(stop_all)
    return live


@pytest.fixture
def live_broker(
    make_app: Callable[..., Flask], live_broker_settings: dict[str, Any]
) -> Iterator[LiveBroker]:
    """Serve the broker on 127.0.0.1 with an inline worker thread."""
    live = serve_live(make_app(WORKER_POLL_INTERVAL=0.05, **live_broker_settings))
    yield live
    live.close()


def throttle(page: Any, uplink_bits: int) -> Any:
    """Throttle the page's uplink to `uplink_bits` a second (Chromium's DevTools network
    emulation); return the DevTools session (detach it to stop)."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {
            "offline": False,
            "latency": 20,
            "downloadThroughput": -1,
            "uploadThroughput": uplink_bits / 8,
        },
    )
    return cdp


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context and page; CSP violations and console errors are recorded."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.console_messages_seen = []  # type: ignore[attr-defined]
    page.on("console", lambda m: page.console_messages_seen.append((m.type, m.text)))
    # Collect CSP violations the page reports, whatever the console says.
    page.add_init_script(
        "window.__csp = [];"
        "document.addEventListener('securitypolicyviolation',"
        " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
    )
    yield page
    context.close()


def seed_admin(app: Flask, make_user: Callable[..., Any], first: tuple[int, int]) -> Any:
    """Make the administrator `root` with a `first`-sized image and three smaller ones; return
    (the user, the first image's upload id)."""
    from tests.factories import PASSWORD, upload_image

    admin = make_user("root", PASSWORD, is_admin=True)
    upload_id = upload_image(app, admin.id, size=first)
    for _ in range(3):
        upload_image(app, admin.id, size=(640, 480))
    return admin, upload_id


def screenshot(page: Any, name: str, *, touch: bool = False) -> Path:
    """Save a full-page screenshot under test-artifacts/ for review.

    `touch`: the page is in a touch context, whose emulation Chromium's full-page capture drops
    (the page would be drawn as on a mouse-driven screen): the viewport grows to the page's
    height instead and is captured as is.
    """
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    if touch:
        size = page.viewport_size
        page.set_viewport_size(
            {"width": size["width"], "height": page.evaluate("document.body.scrollHeight")}
        )
        page.screenshot(path=str(path))
        page.set_viewport_size(size)
    else:
        page.screenshot(path=str(path), full_page=True)
    return path

"""The upload queue's cases (tests/js/queue_cases.mjs) run again in real Chromium, on the same
module file the page loads: the rules hold in the browser as they do in node."""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ORIGIN = "http://queue.test"


def _serve_repo_file(route: Any) -> None:
    path = route.request.url.removeprefix(ORIGIN).split("?", 1)[0]
    if path == "/":
        route.fulfill(status=200, content_type="text/html", body="<!doctype html><title>q</title>")
        return
    file = (ROOT / path.lstrip("/")).resolve()
    if ROOT not in file.parents or not file.is_file():
        route.fulfill(status=404, body="not found")
        return
    kind = "text/javascript" if file.suffix in (".js", ".mjs") else mimetypes.guess_type(file)[0]
    route.fulfill(
        status=200, content_type=kind or "application/octet-stream", body=file.read_bytes()
    )


def test_queue_cases_pass_in_chromium(page: Any) -> None:
    page.route(f"{ORIGIN}/**", _serve_repo_file)
    page.goto(f"{ORIGIN}/")
    results = page.evaluate(
        """async () => {
            const { cases } = await import("/tests/js/queue_cases.mjs");
            const out = {};
            for (const [name, body] of Object.entries(cases)) {
                try { await body(); out[name] = "ok"; } catch (e) { out[name] = String(e); }
            }
            return out;
        }"""
    )
    assert len(results) >= 9
    assert {name: r for name, r in results.items() if r != "ok"} == {}

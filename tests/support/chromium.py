"""The one headless Chromium (Debian's build, through Playwright) of a pytest run.

A plugin of the root conftest, so every suite shares it: Playwright's sync API runs one instance
per thread, and a second `sync_playwright()` while the first is open fails ("Sync API inside
the asyncio loop"), which is what a system test launching its own did after tests/browser.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("BROKER_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Launch Debian's Chromium headless through Playwright (no browser download)."""
    from tests.conftest import require

    require(
        bool(shutil.which(CHROMIUM)) or Path(CHROMIUM).exists(), f"needs Chromium at {CHROMIUM}"
    )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()

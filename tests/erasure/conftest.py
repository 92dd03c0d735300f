"""Fixtures of the erasure tests: an emulator of each test's own (they count what the account
holds), and helpers that put images there behind and in front of the broker."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def emulator(fresh_emulator: Any) -> Any:
    """A fresh emulator over real HTTP (make_app points the apps of the test at it)."""
    return fresh_emulator

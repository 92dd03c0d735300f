"""Fixtures of the reconciliation tests: an emulator of each test's own (they compare what
the whole account holds with the database)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def emulator(fresh_emulator: Any) -> Any:
    """A fresh emulator over real HTTP (make_app points the apps of the test at it)."""
    return fresh_emulator

"""Fixtures of the images tests: an emulator of each test's own (they sync, rotate and delete the
account's keys and variants), and the broker pointed at it with its variants and keys synced."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

VARIANTS = "thumb:256x256:cover,medium:1024x1024:scale-down,avatar:64x64:cover:never-signed"


@pytest.fixture
def emulator(fresh_emulator: Any) -> Any:
    """A fresh emulator over real HTTP (make_app points the apps of the test at it)."""
    return fresh_emulator


@pytest.fixture
def broker(make_app: Callable[..., Flask]) -> Flask:
    """The broker pointed at the emulator, with its variants and keys synced."""
    app = make_app(VARIANTS=VARIANTS)
    runner = app.test_cli_runner()
    for args in (["variants", "sync"], ["keys", "sync"]):
        result = runner.invoke(args=args)
        assert result.exit_code == 0, result.output
    return app

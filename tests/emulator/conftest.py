"""Fixtures for the emulator conformance tests: a fresh emulator over real HTTP per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from broker.emulator.testing import EmulatorServer, ImagesClient


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[EmulatorServer]:
    """Start a fresh emulator on a free port with its data under `tmp_path`."""
    with EmulatorServer(tmp_path / "emulator") as server:
        yield server


@pytest.fixture
def api(emulator: EmulatorServer) -> Iterator[ImagesClient]:
    """Return an authenticated REST client for the emulator."""
    with emulator.client() as client:
        yield client


@pytest.fixture
def http() -> Iterator[requests.Session]:
    """Return an unauthenticated session (browsers, delivery, control)."""
    with requests.Session() as session:
        yield session

"""Fixtures for the emulator conformance tests: a fresh emulator over real HTTP per test (the
root conftest's `fresh_emulator`), and a REST client for it. `http` comes from the root."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.emulator.testing import EmulatorServer, ImagesClient


@pytest.fixture
def emulator(fresh_emulator: EmulatorServer) -> EmulatorServer:
    """A fresh emulator on a free port with its data under `tmp_path`."""
    return fresh_emulator


@pytest.fixture
def api(emulator: EmulatorServer) -> Iterator[ImagesClient]:
    """Return an authenticated REST client for the emulator."""
    with emulator.client() as client:
        yield client

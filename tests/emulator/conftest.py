"""Fixtures for the emulator conformance tests: a fresh emulator over real HTTP per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.emulator.testing import EmulatorServer


class Api:
    """A bearer-authenticated client for one emulator's Images REST API."""

    def __init__(self, server: EmulatorServer) -> None:
        self.server = server
        self.base = f"{server.url}/client/v4/accounts/{server.account_id}/images"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {server.api_token}"

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Call `base + path` and return the (already read) response."""
        kwargs.setdefault("timeout", 10)
        with self.session.request(method, self.base + path, **kwargs) as resp:
            resp.content  # noqa: B018 - read the body so the connection can be reused
            return resp

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        """GET a path of the API."""
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        """POST to a path of the API."""
        return self.request("POST", path, **kwargs)

    def upload(self, data: bytes, filename: str = "pic.png", **fields: Any) -> dict[str, Any]:
        """Upload through v1 and return the Image, asserting success."""
        resp = self.post("/v1", files={"file": (filename, data)}, data=fields)
        assert resp.status_code == 200, resp.text
        return resp.json()["result"]

    def direct_upload(self, **fields: Any) -> dict[str, Any]:
        """Create a direct upload and return `{id, uploadURL}`, asserting success."""
        resp = self.post("/v2/direct_upload", files={"_": (None, "")}, data=fields)
        assert resp.status_code == 200, resp.text
        return resp.json()["result"]

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[EmulatorServer]:
    """Start a fresh emulator on a free port with its data under `tmp_path`."""
    with EmulatorServer(tmp_path / "emulator") as server:
        yield server


@pytest.fixture
def api(emulator: EmulatorServer) -> Iterator[Api]:
    """Return an authenticated REST client for the emulator."""
    client = Api(emulator)
    yield client
    client.close()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    """Return an unauthenticated session (browsers, delivery, control)."""
    with requests.Session() as session:
        yield session

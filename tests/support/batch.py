"""The batch API's test setup, shared by tests/upstream's batch tests: an app whose Cloudflare
client uses the emulator's batch host, its route, and a create through the API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask

from broker.upstream.batch import BatchRoute

URL = "/api/v1/uploads"
# The metrics scrape token the batch apps are built with.
METRICS = "scrape-me-0123456789"


def batch_app(make_app: Callable[..., Flask], **overrides: Any) -> Flask:
    """An app with the batch API on (`auto`) and /metrics open to METRICS."""
    return make_app(CLOUDFLARE_BATCH="auto", METRICS_TOKEN=METRICS, **overrides)


def batch_route(app: Flask) -> BatchRoute:
    """The app's batch route (its tokens, rates and fall-backs)."""
    route = app.extensions["batch_route"]
    assert isinstance(route, BatchRoute)
    return route


def create(app: Flask, auth: dict[str, str]) -> dict[str, Any]:
    """Create an upload through the API (201); return its answer."""
    response = app.test_client().post(URL, json={}, headers=auth)
    assert response.status_code == 201, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body

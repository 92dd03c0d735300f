"""Fixtures of the uploads tests: the completion set-up (an app taking Cloudflare's
notifications, with an endpoint on the webhook receiver)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.factories import add_webhook_endpoint

# The shared secret Cloudflare's notifications carry in `cf-webhook-auth`.
CF_SECRET = "cf-notify-secret-for-tests"


@pytest.fixture
def setup(
    make_app: Callable[..., Flask],
    make_user: Callable[..., Any],
    bearer: Callable[..., dict[str, str]],
    receiver: Any,
) -> tuple[Flask, FlaskClient, dict[str, str]]:
    """An app pointed at the emulator, Alice's bearer header, and an endpoint on the receiver.

    `/complete` leaves verification to the worker here (as under budget pressure), so these
    tests exercise the batched path; test_completion.py's `inline` turns inline checks on.
    """
    app = make_app(
        WEBHOOK_ALLOW_PRIVATE=True, CLOUDFLARE_WEBHOOK_SECRET=CF_SECRET, COMPLETE_INLINE_BUDGET=0
    )
    auth = bearer(app, make_user("alice"))
    _, receiver.secret = add_webhook_endpoint(app, receiver.url)
    return app, app.test_client(), auth

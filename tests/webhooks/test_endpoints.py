"""Registering endpoints: event types, the SSRF check when saving, the refusal's advice."""

from __future__ import annotations

import pytest

from broker.platform.db import db
from broker.webhooks import endpoints, ssrf


def test_event_types_are_validated():
    assert endpoints.normalise_events(["upload.completed,upload.expired"]) == (
        "upload.completed upload.expired"
    )
    with pytest.raises(ValueError):
        endpoints.normalise_events(["upload.nope"])
    with pytest.raises(ValueError):
        endpoints.normalise_events([])


def test_saving_a_private_endpoint_is_refused(app):
    with app.app_context(), pytest.raises(ssrf.BlockedAddress):
        endpoints.add_endpoint(db.session, "https://192.168.1.1/x", ["*"], app.config)


def test_refusal_outside_production_says_how_to_allow_a_local_receiver():
    with pytest.raises(ssrf.BlockedAddress, match="BROKER_WEBHOOK_ALLOW_PRIVATE=true"):
        endpoints.check_target("http://127.0.0.1:9/hook", {"ENV": "development"})
    with pytest.raises(ssrf.BlockedAddress) as refused:
        endpoints.check_target("https://127.0.0.1/hook", {"ENV": "production"})
    assert "ALLOW_PRIVATE" not in str(refused.value)

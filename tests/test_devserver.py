"""The development server's start-up (`make run`): variants and keys synced, failures said in
one line without the token; a restart keeps the batch API."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from broker.devserver import forget_emulator_batch_token, prepare_upstream
from broker.emulator.testing import EmulatorServer
from broker.images import keys
from tests.factories import emulator_config


def test_dev_server_start_up_syncs_variants_and_keys(
    make_app: Callable[..., Flask], fresh_emulator: EmulatorServer
) -> None:
    """`make run` declares the variants upstream and mirrors the signing keys before serving."""
    settings = emulator_config(fresh_emulator)  # an account nothing was synced to yet
    app = make_app(**settings)
    with app.app_context():
        assert prepare_upstream() == ["Variants: thumb, medium; signing key default (1 new)."]
        assert keys.current_signer() is not None
    assert {"thumb", "medium"} <= {v.id for v in fresh_emulator.emulator.store.list_variants()}
    broken = make_app(**{**settings, "CLOUDFLARE_API_TOKEN": "wrong"})
    with broken.app_context():
        (line,) = prepare_upstream()
        assert "not synced" in line and "wrong" not in line


def test_a_restart_beside_a_new_emulator_keeps_the_batch_api(
    make_app: Callable[..., Flask],
    make_user: Callable[..., Any],
    bearer: Callable[..., dict[str, str]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`make run` again: the database still holds the batch token the last emulator issued,
    which the new one (tokens in memory only) would refuse, sending the batch endpoints to the
    global API for the cool-down with a warning. The start drops it instead."""
    data = tmp_path / "emulator"
    alice = make_user("alice")
    with EmulatorServer(data) as before:
        app = make_app(**{**emulator_config(before), "CLOUDFLARE_BATCH": "auto"})
        created = app.test_client().post("/api/v1/uploads", json={}, headers=bearer(app, alice))
        assert created.status_code == 201 and before.counters()["batch_token"] == 1
    caplog.set_level(logging.INFO, logger="broker")
    with EmulatorServer(data) as after:  # the next run's emulator, on the same data
        app = make_app(**{**emulator_config(after), "CLOUDFLARE_BATCH": "auto"})
        with app.app_context():
            forget_emulator_batch_token(app)
        created = app.test_client().post("/api/v1/uploads", json={}, headers=bearer(app, alice))
        assert created.status_code == 201
        counters = after.counters()
    assert counters["batch_token"] == 1 and counters["batch.direct_upload"] == 1
    assert "direct_upload" not in counters
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

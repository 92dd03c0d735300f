"""The development server's start-up (`make run`): variants and keys synced, failures said in
one line without the token."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask

from broker.devserver import prepare_upstream
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

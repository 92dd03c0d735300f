"""Variants: `flask variants sync` / `list`, and a bad `BROKER_VARIANTS` stopping start-up."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask

from broker.emulator.testing import EmulatorServer
from broker.upstream.cloudflare import get_client


def test_variants_cli_syncs_and_lists(broker: Flask, emulator: EmulatorServer) -> None:
    runner = broker.test_cli_runner()
    again = runner.invoke(args=["variants", "sync"])
    assert again.exit_code == 0
    assert "thumb" in again.output and "created" not in again.output
    with broker.app_context():
        get_client().update_variant("thumb", "contain", 100, 100)
    fixed = runner.invoke(args=["variants", "sync"])
    assert "thumb                updated" in fixed.output
    listed = runner.invoke(args=["variants", "list"])
    assert "avatar" in listed.output and "never-signed" in listed.output
    upstream = runner.invoke(args=["variants", "list", "--upstream"])
    assert "public" in upstream.output and "thumb                256x256 cover" in upstream.output


def test_bad_variant_declaration_stops_start_up(make_app: Callable[..., Flask]) -> None:
    from broker.platform.config import ConfigError

    with pytest.raises(ConfigError, match="BROKER_VARIANTS"):
        make_app(VARIANTS="thumb:big")

"""Settings: the production refusals of unsafe or missing values, the README's settings table,
the request body cap."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from broker import create_app
from broker.platform.config import (
    DEFAULTS,
    SETTINGS,
    ConfigError,
    Settings,
    build_settings,
    finalize,
    settings_of,
)
from tests.factories import production_app, production_settings

ROOT = Path(__file__).resolve().parent.parent.parent


def test_production_refuses_default_secret(tmp_path):
    with pytest.raises(ConfigError, match="SECRET_KEY is the insecure default"):
        create_app({"ENV": "production", "INSTANCE_PATH": str(tmp_path)})


def test_production_refuses_missing_cloudflare_settings(tmp_path):
    with pytest.raises(ConfigError, match="BROKER_CLOUDFLARE_ACCOUNT_ID"):
        create_app({"ENV": "production", "SECRET_KEY": "s" * 40, "INSTANCE_PATH": str(tmp_path)})


def test_production_with_real_settings_starts(tmp_path):
    app = production_app(tmp_path)
    assert app.config["SESSION_COOKIE_SECURE"] is True
    assert app.config["REGISTRATION"] is False


def test_production_refuses_a_short_secret(tmp_path):
    with pytest.raises(ConfigError, match="too short"):
        production_app(tmp_path, SECRET_KEY="only-twenty-chars-xx")


@pytest.mark.parametrize(
    ("api_base", "batch_base"),
    [
        ("https://api.cloudflare.com/client/v4", "https://batch.imagedelivery.net"),
        ("https://api.cloudflare.com/client/v4/", "https://batch.imagedelivery.net"),
        ("https://cf-proxy.example.com/client/v4", "https://cf-proxy.example.com/batch"),
    ],
)
def test_the_batch_base_follows_the_api_base(tmp_path, api_base, batch_base):
    """Unset, BROKER_CLOUDFLARE_BATCH_BASE is Cloudflare's batch host only with Cloudflare's API;
    another API base (a proxy, the emulator) has its batch host beside it."""
    app = production_app(tmp_path, CLOUDFLARE_API_BASE=api_base, CLOUDFLARE_BATCH_BASE=None)
    assert app.config["CLOUDFLARE_BATCH_BASE"] == batch_base
    chosen = production_app(tmp_path, CLOUDFLARE_BATCH_BASE="https://batch.example.com")
    assert chosen.config["CLOUDFLARE_BATCH_BASE"] == "https://batch.example.com"


def test_an_api_base_whose_batch_host_cannot_be_told_refuses_to_start(tmp_path):
    """Rather than send every create to a batch host that does not exist (502 each), say so."""
    weird = {
        "CLOUDFLARE_API_BASE": "https://proxy.example.com/images",
        "CLOUDFLARE_BATCH_BASE": None,
    }
    with pytest.raises(ConfigError) as refused:
        production_app(tmp_path, **weird)
    assert str(refused.value.message).count("\n") == 0
    assert "BROKER_CLOUDFLARE_BATCH_BASE is needed" in refused.value.message
    # With the batch API off, no batch host is needed.
    production_app(tmp_path, CLOUDFLARE_BATCH="off", **weird)


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [s.name for s in SETTINGS if f"`BROKER_{s.name}`" not in readme]
    assert missing == []


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"DEBUG": True}, "DEBUG"),
        ({"TESTING": True}, "TESTING"),
        ({"WTF_CSRF_ENABLED": False}, "CSRF"),
        ({"WEBHOOK_ALLOW_PRIVATE": True}, "WEBHOOK_ALLOW_PRIVATE"),
        ({"CLOUDFLARE_API_BASE": "http://127.0.0.1:8788/client/v4"}, "CLOUDFLARE_API_BASE"),
        ({"CLOUDFLARE_DELIVERY_BASE": "http://127.0.0.1:8788"}, "CLOUDFLARE_DELIVERY_BASE"),
        ({"CLOUDFLARE_UPLOAD_ORIGIN": "http://127.0.0.1:8788"}, "CLOUDFLARE_UPLOAD_ORIGIN"),
    ],
)
def test_production_refuses_unsafe_settings(overrides: dict[str, Any], named: str) -> None:
    """Debug/testing mode, CSRF off, private webhooks and plain-http (emulator) Cloudflare URLs
    are refused in production, naming the setting."""
    finalize(production_settings(), "/tmp")  # the baseline is accepted
    with pytest.raises(ConfigError, match=named):
        finalize(production_settings(**overrides), "/tmp")


def test_request_bodies_are_capped(make_app: Callable[..., Flask]) -> None:
    """An anonymous caller cannot make the broker buffer an unbounded JSON body: 413 JSON."""
    app = make_app()
    assert app.config["MAX_CONTENT_LENGTH"] == 1024 * 1024
    big = b'{"username": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    response = app.test_client().post(
        "/api/v1/auth/tokens", data=big, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "request_entity_too_large"


def test_typed_settings_have_one_field_per_setting(make_app: Callable[..., Flask]) -> None:
    """Every row of the table is a typed field, read once into the app (no setting forgotten)."""
    settings = settings_of(make_app())
    names = {f.name for f in fields(Settings)}
    assert names == {s.name.lower() for s in SETTINGS}
    assert settings.env == "testing"
    # Derived defaults are filled in, with their real types.
    assert settings.registration is True and settings.worker_inline is False
    assert settings.database_url.startswith(("sqlite", "postgresql"))
    assert settings.upstream_budget == 1000 and settings.cloudflare_timeout == 10.0
    assert settings.encryption_keys and all(isinstance(k, str) for k in settings.encryption_keys)


def test_typed_settings_read_strings_as_their_types() -> None:
    """Values from the environment or instance/config.py arrive as strings or JSON values."""
    raw = {
        **DEFAULTS,
        "ENV": "production",
        "SECRET_KEY": "s" * 40,
        "DATABASE_URL": "sqlite://",
        "REGISTRATION": "off",
        "WORKER_INLINE": 0,
        "CLOUDFLARE_ACCOUNT_ID": 12345,
        "CLOUDFLARE_TIMEOUT": "2.5",
        "UPSTREAM_BUDGET": "900",
        "KEY_ROTATION_GRACE": 60,
        "UPLOAD_ALLOWED_FORMATS": "jpeg, PNG webp",
        "UPLOAD_MAX_BYTES": "",
        "OIDC_ALGORITHMS": ["RS256", " ES256 "],
        "CORS_ORIGINS": "https://a.example, https://b.example",
    }
    settings = build_settings(raw)
    assert settings.registration is False and settings.worker_inline is False
    assert settings.cloudflare_account_id == "12345"
    assert settings.cloudflare_timeout == 2.5 and settings.upstream_budget == 900
    assert settings.key_rotation_grace == 60.0 and isinstance(settings.key_rotation_grace, float)
    assert settings.upload_allowed_formats == ("jpeg", "PNG", "webp")
    assert settings.upload_max_bytes is None
    assert settings.oidc_algorithms == ("RS256", "ES256")
    assert settings.cors_origins == ("https://a.example", "https://b.example")


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("UPSTREAM_BUDGET", "lots", "a number"),
        ("UPLOAD_DEFAULT_EXPIRY", 90.5, "a whole number"),
        ("WEBHOOK_ALLOW_PRIVATE", "maybe", "true or false"),
        ("CLOUDFLARE_TIMEOUT", True, "a number"),
        ("CLOUDFLARE_API_BASE", None, "must be set"),
        ("ERASURE_LEASE", 0, "at least 1"),
        ("ERASURE_LEASE", "soon", "a number"),
        ("CLOUDFLARE_BATCH_RATE", 0, "at least 1"),
        ("CLOUDFLARE_BATCH_RATE", 3201, "at most 16 times BROKER_CLOUDFLARE_BATCH_TOKEN_RATE"),
    ],
)
def test_typed_settings_refuse_a_bad_value_naming_it(
    make_app: Callable[..., Flask], name: str, value: Any, says: str
) -> None:
    """A value of the wrong type stops the start with the setting's name, not a traceback later."""
    with pytest.raises(ConfigError, match=f"BROKER_{name} .*{says}|BROKER_{name} {says}"):
        make_app(**{name: value})

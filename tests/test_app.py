"""The app factory: what `create_app()` reads and wraps, what it warns about, and the `flask`
command's one-line refusal of a bad configuration."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from broker import create_app
from broker.platform.config import DEFAULT_SECRET_KEY, DEV_EMULATOR_FILE, ConfigError
from tests.factories import TEST_ENCRYPTION_KEY, production_app
from tests.support.guide import GUIDE

ROOT = Path(__file__).resolve().parent.parent


def test_production_warns_about_per_process_rate_limit_counters(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="broker"):
        production_app(tmp_path)
    assert any("memory://" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="broker"):
        production_app(tmp_path, RATELIMIT_STORAGE_URI="redis://127.0.0.1:6379")
    assert not any("memory://" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("proxies", "seen"), [(0, "127.0.0.1"), (1, "203.0.113.9")])
def test_forwarded_client_address_is_trusted_only_behind_configured_proxies(
    make_app, proxies, seen
):
    app = make_app(PROXY_COUNT=proxies)

    @app.get("/_test/addr")
    def addr():  # type: ignore[no-untyped-def]
        from flask import request

        return request.remote_addr or ""

    response = app.test_client().get(
        "/_test/addr",
        headers={"X-Forwarded-For": "203.0.113.9"},
        environ_base={"REMOTE_ADDR": "127.0.0.1"},
    )
    assert response.text == seen


def _config_of_cli_app(tmp_path, **env):
    script = (
        "import json; from broker import create_app; c = create_app().config; "
        "print(json.dumps([c['CLOUDFLARE_API_BASE'], c['CLOUDFLARE_ACCOUNT_ID']]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "BROKER_INSTANCE_PATH": str(tmp_path), **env},
        capture_output=True,
        text=True,
    )
    if "ConfigError" in result.stderr:
        raise ConfigError(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cli_in_development_reaches_make_runs_emulator(tmp_path):
    (tmp_path / DEV_EMULATOR_FILE).write_text(
        json.dumps(
            {
                "CLOUDFLARE_API_BASE": "http://127.0.0.1:8788/client/v4",
                "CLOUDFLARE_ACCOUNT_ID": "emulator-account",
            }
        )
    )
    assert _config_of_cli_app(tmp_path) == ["http://127.0.0.1:8788/client/v4", "emulator-account"]
    # A real account in the environment wins, and production never reads the file.
    real = _config_of_cli_app(tmp_path, BROKER_CLOUDFLARE_ACCOUNT_ID="real")
    assert real == ["https://api.cloudflare.com/client/v4", "real"]


def test_flask_command_refuses_bad_config_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "broker", "worker", "--once"],
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "BROKER_ENV": "production",
            "BROKER_INSTANCE_PATH": str(tmp_path),
            # Everything else in order: one problem is one line (several problems:
            # tests/platform/test_config_errors.py).
            "BROKER_ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
            "BROKER_CLOUDFLARE_ACCOUNT_ID": "a",
            "BROKER_CLOUDFLARE_API_TOKEN": "t",
            "BROKER_CLOUDFLARE_ACCOUNT_HASH": "h",
        },
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1  # the guide: one `Error: …` line, exit status 1
    assert result.stderr.strip().splitlines() == [
        "Error: BROKER_SECRET_KEY is the insecure default; set a long random value"
    ]


def test_testing_env_skips_the_production_checks_and_says_so(tmp_path):
    """The guide: `testing` is for automated test suites and skips production's refusals; it
    runs no inline worker and never reads make run's emulator file."""
    (tmp_path / DEV_EMULATOR_FILE).write_text(
        json.dumps({"CLOUDFLARE_ACCOUNT_ID": "emulator-account"})
    )
    # The default secret, no Cloudflare settings: production refuses, testing starts.
    with pytest.raises(ConfigError):
        _config_of_cli_app(tmp_path, BROKER_ENV="production")
    assert _config_of_cli_app(tmp_path, BROKER_ENV="testing") == [
        "https://api.cloudflare.com/client/v4",
        None,
    ]
    app = create_app(
        {"ENV": "testing", "INSTANCE_PATH": str(tmp_path), "DATABASE_URL": "sqlite://"}
    )
    assert app.config["SECRET_KEY"] == DEFAULT_SECRET_KEY
    assert app.config["WORKER_INLINE"] is False
    guide = " ".join(GUIDE.read_text().split())
    assert "`BROKER_ENV=testing` is for automated test suites and skips these checks" in guide

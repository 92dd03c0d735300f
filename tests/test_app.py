"""The factory, configuration, health probes and request logging."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flask import Flask

from broker import create_app
from broker.platform.config import DEV_EMULATOR_FILE, SETTINGS, ConfigError
from tests.conftest import PRODUCTION_SETTINGS

ROOT = Path(__file__).resolve().parent.parent


def _production(tmp_path, **extra):
    return create_app(
        {
            **PRODUCTION_SETTINGS,
            "INSTANCE_PATH": str(tmp_path),
            "DATABASE_URL": "sqlite://",
            **extra,
        }
    )


def test_livez_touches_nothing(client):
    response = client.get("/livez")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_reports_database(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["database"] == "ok"


def test_readyz_503_when_database_unreachable(tmp_path):
    app = create_app(
        {
            "ENV": "testing",
            "SECRET_KEY": "x",
            "INSTANCE_PATH": str(tmp_path),
            # a folder that does not exist: SQLite cannot open the file
            "DATABASE_URL": f"sqlite:///{tmp_path}/missing/dir/db.sqlite3",
        }
    )
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json() == {"status": "unavailable", "reason": "database unreachable"}


def test_request_id_is_generated_and_logged(client, caplog):
    with caplog.at_level(logging.INFO, logger="broker.request"):
        response = client.get("/livez")
    request_id = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    line = caplog.records[-1].getMessage()
    assert re.fullmatch(rf"GET /livez 200 \d+\.\dms request_id={request_id}", line)


def test_request_id_honoured_when_plain_replaced_when_not(client):
    assert client.get("/livez", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == (
        "abc-123"
    )
    forged = client.get("/livez", headers={"X-Request-ID": "x 200 FAKE=1 " + "y" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", forged.headers["X-Request-ID"])


def test_unknown_api_route_is_json_404(client):
    response = client.get("/api/v1/nope")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


def test_unknown_page_is_html_404(client):
    response = client.get("/nope", headers={"Accept": "text/html"})
    assert response.status_code == 404
    assert "text/html" in response.content_type
    assert "404" in response.text


def test_unexpected_error_is_500_without_trace(app: Flask):
    @app.get("/api/v1/boom")
    def boom():  # type: ignore[no-untyped-def]
        raise RuntimeError("secret internals")

    app.config["PROPAGATE_EXCEPTIONS"] = False
    response = app.test_client().get("/api/v1/boom")
    assert response.status_code == 500
    body = response.get_json()
    assert body["error"]["code"] == "internal_error"
    assert "secret internals" not in response.text
    assert "Traceback" not in response.text


def test_production_refuses_default_secret(tmp_path):
    with pytest.raises(ConfigError, match="SECRET_KEY is the insecure default"):
        create_app({"ENV": "production", "INSTANCE_PATH": str(tmp_path)})


def test_production_refuses_missing_cloudflare_settings(tmp_path):
    with pytest.raises(ConfigError, match="BROKER_CLOUDFLARE_ACCOUNT_ID"):
        create_app({"ENV": "production", "SECRET_KEY": "s" * 40, "INSTANCE_PATH": str(tmp_path)})


def test_production_with_real_settings_starts(tmp_path):
    app = _production(tmp_path)
    assert app.config["SESSION_COOKIE_SECURE"] is True
    assert app.config["REGISTRATION"] is False


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [s.name for s in SETTINGS if f"`BROKER_{s.name}`" not in readme]
    assert missing == []


def test_production_refuses_a_short_secret(tmp_path):
    with pytest.raises(ConfigError, match="too short"):
        _production(tmp_path, SECRET_KEY="only-twenty-chars-xx")


def test_production_warns_about_per_process_rate_limit_counters(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="broker"):
        _production(tmp_path)
    assert any("memory://" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="broker"):
        _production(tmp_path, RATELIMIT_STORAGE_URI="redis://127.0.0.1:6379")
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
        },
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "Error: BROKER_SECRET_KEY is the insecure default; set a long random value"
    ]

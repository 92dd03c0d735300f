"""compose.yaml is safe by default: production settings, no secret in the file, no start
without the secrets.

No Docker engine runs here, and Debian's `docker-compose` (v1) rejects the file's
`depends_on: {required: false}` (a newer part of the compose specification), so the file is
interpolated the way compose does it (`${VAR}`, `${VAR:-default}`, `${VAR:?error}`, `$$`) from
the same env files an operator uses, and the result is checked, down to the broker's own
production checks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from cryptography.fernet import Fernet

from broker.platform.config import DEFAULTS, finalize
from tests.support.reader import free_port, reader_env
from tests.system.topology import BIN, wait_for

ROOT = Path(__file__).resolve().parents[1]

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}; `$$` is a `$`.
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|_KEY")


class Missing(Exception):
    """A `${VAR:?error}` whose variable is unset: compose refuses to start."""


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Return `value` (compose.yaml's parsed YAML) with every variable replaced from `env`."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.groups()
        current = env.get(name)
        unset = current is None or (
            operator is not None and operator.startswith(":") and not current
        )
        if operator and operator.endswith("?") and unset:
            raise Missing(f"{name}: {argument}")
        if operator and operator.endswith("-") and unset:
            return str(argument)
        return current or ""

    return _VARIABLE.sub(one, value)


def env_file(name: str) -> dict[str, str]:
    """Parse a compose env file (`NAME=value` lines; `#` comments)."""
    pairs = {}
    for line in (ROOT / name).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def raw() -> dict[str, Any]:
    """compose.yaml, parsed, not interpolated."""
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def filled_example() -> dict[str, str]:
    """.env.example as an operator fills it in (fresh random values)."""
    env = env_file(".env.example")
    env.update(
        BROKER_SECRET_KEY="s" * 48,
        BROKER_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
        POSTGRES_PASSWORD="pw0123456789",
        BROKER_CLOUDFLARE_ACCOUNT_ID="acc",
        BROKER_CLOUDFLARE_API_TOKEN="tok",
        BROKER_CLOUDFLARE_ACCOUNT_HASH="hash",
    )
    return env


def _finalized(environment: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    """The broker's config from a service's environment, as `create_app` finalizes it."""
    config = {**DEFAULTS, **{k.removeprefix("BROKER_"): v for k, v in environment.items()}}
    config.pop("PORT", None)
    finalize(config, str(tmp_path))
    return config


def test_no_secret_is_written_in_compose_yaml() -> None:
    """Every setting whose name says secret, password, token or key takes its value from the
    environment, with no default but an empty one."""
    services = raw()["services"]
    checked = []
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if _SECRET_NAME.search(key):
                checked.append(f"{name}.{key}")
                text = str(value)
                for match in _VARIABLE.finditer(text):
                    operator, argument = match.group(2), match.group(3)
                    assert not (operator and operator.endswith("-") and argument), (
                        f"{name}.{key} has a default value: {text}"
                    )
                literal = _VARIABLE.sub("", text)
                assert re.fullmatch(r"[a-z+]*(://broker:@postgres:5432/broker)?", literal), (
                    f"{name}.{key} holds a literal value: {text}"
                )
    assert "web.BROKER_SECRET_KEY" in checked and "postgres.POSTGRES_PASSWORD" in checked


def test_compose_refuses_to_start_without_the_secrets() -> None:
    """With nothing set, interpolation stops at the first required secret, naming it and the
    example file; .env.example as shipped (values empty) is refused the same way."""
    for env in ({}, env_file(".env.example")):
        with pytest.raises(Missing, match=r"see \.env\.example"):
            interpolate(raw(), env)
    for required in (
        "BROKER_SECRET_KEY",
        "BROKER_ENCRYPTION_KEYS",
        "POSTGRES_PASSWORD",
        "BROKER_CLOUDFLARE_API_TOKEN",
    ):
        env = filled_example()
        del env[required]
        with pytest.raises(Missing, match=required):
            interpolate(raw(), env)


def test_filled_in_example_runs_in_production_and_passes_its_checks(tmp_path: Path) -> None:
    """.env.example filled in gives production, Cloudflare's https origins, and a
    configuration the broker's production checks accept."""
    services = interpolate(raw(), filled_example())["services"]
    for name in ("setup", "web", "worker"):
        environment = services[name]["environment"]
        assert environment["BROKER_ENV"] == "production"
        assert environment["BROKER_DATABASE_URL"].endswith(
            "broker:pw0123456789@postgres:5432/broker"
        )
        config = _finalized(environment, tmp_path)  # ConfigError on anything production refuses
        assert config["SESSION_COOKIE_SECURE"] is True
        assert config["CLOUDFLARE_BATCH_BASE"] == "https://batch.imagedelivery.net"  # derived
    assert services["emulator"]["profiles"] == ["emulator"]
    # A worker container is healthy while its worker beats (tests/test_operations.py runs it).
    assert services["worker"]["healthcheck"]["test"] == [
        "CMD",
        *services["worker"]["command"],
        "health",
    ]


def test_the_emulator_env_file_is_the_one_way_to_testing(tmp_path: Path) -> None:
    """.env.emulator chooses the emulator profile and `testing`, pointing at the emulator only
    (its batch host too, derived from the API base rather than Cloudflare's)."""
    env = env_file(".env.emulator")
    assert env["COMPOSE_PROFILES"] == "emulator"
    services = interpolate(raw(), env)["services"]
    web = services["web"]["environment"]
    assert web["BROKER_ENV"] == "testing"
    assert web["BROKER_CLOUDFLARE_API_BASE"] == "http://emulator:8788/client/v4"
    config = _finalized(web, tmp_path)
    assert config["CLOUDFLARE_BATCH_BASE"] == "http://emulator:8788/batch"
    assert (
        services["emulator"]["environment"]["EMULATOR_NOTIFY_SECRET"]
        == (web["BROKER_CLOUDFLARE_WEBHOOK_SECRET"])
    )


def test_a_proxy_api_base_takes_its_own_batch_host_not_cloudflares(tmp_path: Path) -> None:
    """Compose leaves the batch host unset unless given, so the broker derives it from the API
    base: a proxy's token never goes to Cloudflare's batch host."""
    env = {**filled_example(), "BROKER_CLOUDFLARE_API_BASE": "https://proxy.example.com/client/v4"}
    web = interpolate(raw(), env)["services"]["web"]["environment"]
    config = _finalized(web, tmp_path)
    assert config["CLOUDFLARE_BATCH_BASE"] == "https://proxy.example.com/batch"


def test_every_published_port_is_on_this_machines_loopback() -> None:
    """Nothing compose starts is reachable from other machines: the web instances (behind a TLS
    proxy on this machine) and the emulator publish on 127.0.0.1 only."""
    published = {
        name: service["ports"] for name, service in raw()["services"].items() if "ports" in service
    }
    assert published == {
        "web": ["127.0.0.1:8000-8001:8000"],
        "emulator": ["127.0.0.1:8788:8788"],
    }


def test_the_emulator_stays_on_this_machine_with_no_controls() -> None:
    """The emulator's port is published on the host's loopback only, its controls are off (no
    token could be required there: compose checks every service's `${VAR:?}`, production's
    starts too), and its API wants the very token the broker sends."""
    emulator = raw()["services"]["emulator"]
    assert emulator["ports"] == ["127.0.0.1:8788:8788"]
    assert "--control" not in emulator["command"]
    assert not [key for key in emulator["environment"] if key.startswith("EMULATOR_CONTROL")]
    services = interpolate(raw(), env_file(".env.emulator"))["services"]
    web = services["web"]["environment"]
    assert (
        services["emulator"]["environment"]["EMULATOR_API_TOKEN"]
        == (web["BROKER_CLOUDFLARE_API_TOKEN"])
    )


def test_the_emulator_as_compose_runs_it_keeps_keys_and_controls_to_itself(
    tmp_path: Path,
) -> None:
    """compose's emulator command and environment (.env.emulator), on a free loopback port: the
    signing keys need the API token, `/_emulator` answers 404, and the healthcheck passes."""
    emulator = interpolate(raw(), env_file(".env.emulator"))["services"]["emulator"]
    port = free_port()
    command = [
        *emulator["command"],
        *("--host", "127.0.0.1", "--port", str(port), "--data-dir", str(tmp_path / "data")),
    ]
    env = reader_env(**emulator["environment"], PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    base = f"http://127.0.0.1:{port}"
    # The healthcheck's `python -c …`, at this port.
    probe = [part.replace("8788", str(port)) for part in emulator["healthcheck"]["test"][1:]]
    assert probe[0] == "python"
    log_path = tmp_path / "emulator.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: proc.poll() is not None or "Running on" in log_path.read_text(),
            60,
            "the emulator's start",
        )
        keys = f"{base}/client/v4/accounts/{env['EMULATOR_ACCOUNT_ID']}/images/v1/keys"
        with requests.Session() as http:
            assert http.get(keys, timeout=5).status_code in (401, 403)
            wrong = {"Authorization": "Bearer emulator-token-guessed"}
            assert http.get(keys, headers=wrong, timeout=5).status_code in (401, 403)
            token = {"Authorization": f"Bearer {env['EMULATOR_API_TOKEN']}"}
            assert http.get(keys, headers=token, timeout=5).status_code == 200
            assert http.get(f"{base}/_emulator/counters", timeout=5).status_code == 404
        done = subprocess.run(
            [sys.executable, *probe[1:]], capture_output=True, timeout=30, check=False
        )
        assert done.returncode == 0, done.stderr
    finally:
        proc.terminate()
        proc.wait(30)
    down = subprocess.run(
        [sys.executable, *probe[1:]], capture_output=True, timeout=30, check=False
    )
    assert down.returncode == 1  # nothing answers: unhealthy

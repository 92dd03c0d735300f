"""The deployment files agree: compose.yaml, gunicorn.conf.py, the Dockerfile and the worker."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import yaml

from broker.worker import SHUTDOWN_DEADLINE
from tests.support.guide import GUIDE

ROOT = Path(__file__).resolve().parent.parent


def _seconds(value: str) -> int:
    match = re.fullmatch(r"(\d+)s", value)
    assert match, value
    return int(match.group(1))


def test_gunicorn_stops_within_the_workers_deadline_and_compose_waits_for_both(monkeypatch):
    """One stop timeout covers web and worker: each finishes within 30 s of SIGTERM, and compose
    waits longer than that before it kills."""
    monkeypatch.delenv("GUNICORN_CONTROL_SOCKET", raising=False)
    settings = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert settings["graceful_timeout"] == SHUTDOWN_DEADLINE
    assert settings["worker_class"] == "gthread"
    assert settings["control_socket"].endswith(".ctl")  # its own, named after the master's pid
    monkeypatch.setenv("GUNICORN_CONTROL_SOCKET", "/run/broker/web-a.ctl")
    assert runpy.run_path(str(ROOT / "gunicorn.conf.py"))["control_socket"] == (
        "/run/broker/web-a.ctl"
    )
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    for name in ("web", "worker"):
        assert _seconds(services[name]["stop_grace_period"]) > SHUTDOWN_DEADLINE


def test_compose_runs_the_commands_the_guide_and_the_dockerfile_give():
    """The web tier is gunicorn with gunicorn.conf.py everywhere; workers are `flask worker`."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert services["web"]["command"] == ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    assert services["worker"]["command"] == ["flask", "--app", "broker", "worker"]
    assert services["web"]["deploy"]["replicas"] == 2
    assert services["worker"]["deploy"]["replicas"] == 3
    assert services["emulator"]["profiles"] == ["emulator"]
    assert all("healthcheck" in services[name] for name in ("postgres", "redis", "web", "emulator"))
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "exec gunicorn -c gunicorn.conf.py wsgi:app" in dockerfile
    assert "COPY wsgi.py gunicorn.conf.py /app/" in dockerfile
    guide = GUIDE.read_text()
    assert "gunicorn -c gunicorn.conf.py wsgi:app" in guide
    assert "docker compose --env-file .env.emulator --profile emulator up" in guide


def test_the_access_log_never_shows_a_basic_authorization_user():
    """gunicorn's access line, rendered by gunicorn itself with gunicorn.conf.py's format, for a
    request carrying `Authorization: Basic` (its default format prints the user part)."""
    import base64
    import datetime
    import logging
    from types import SimpleNamespace

    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    config = Config()
    config.set(
        "access_log_format", runpy.run_path(str(ROOT / "gunicorn.conf.py"))["access_log_format"]
    )
    config.set("accesslog", "-")
    logger = Logger(config)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger.access_log.addHandler(handler)
    secret = base64.b64encode(b"hunter2-typed-as-user:pw").decode()
    environ = {
        "REMOTE_ADDR": "10.0.0.1",
        "REQUEST_METHOD": "GET",
        "RAW_URI": "/livez",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_AUTHORIZATION": f"Basic {secret}",
    }
    response = SimpleNamespace(status="200 OK", sent=2, headers=[])
    request = SimpleNamespace(headers=[("AUTHORIZATION", f"Basic {secret}")])
    logger.access(response, request, environ, datetime.timedelta(milliseconds=3))
    [line] = lines
    assert '"GET /livez HTTP/1.1" 200 2' in line
    assert "hunter2" not in line and " - - [" in line

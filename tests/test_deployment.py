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


def _access_line(
    logger_class: type,
    access_log_format: str,
    environ: dict[str, str],
    request_headers: list[tuple[str, str]],
) -> str:
    """Render one access line with `logger_class`, as gunicorn does after a request."""
    import datetime
    import logging
    from types import SimpleNamespace

    from gunicorn.config import Config

    config = Config()
    config.set("access_log_format", access_log_format)
    config.set("accesslog", "-")
    logger = logger_class(config)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger.access_log.addHandler(handler)
    response = SimpleNamespace(status="201 CREATED", sent=512, headers=[("X-Request-ID", "r-1")])
    request = SimpleNamespace(headers=request_headers)
    try:
        logger.access(response, request, environ, datetime.timedelta(milliseconds=3))
    finally:
        logger.access_log.removeHandler(handler)
    [line] = lines
    return line


def _loggers() -> tuple[type, type, str]:
    """gunicorn.conf.py's logger class, gunicorn's own, and the configured format."""
    from gunicorn.glogging import Logger

    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    return conf["logger_class"], Logger, conf["access_log_format"]


def test_the_access_log_never_shows_a_basic_authorization_user():
    """The access line, rendered by gunicorn's logger and by gunicorn.conf.py's with its format,
    for a request carrying `Authorization: Basic` (gunicorn's default format prints the user)."""
    import base64

    secret = base64.b64encode(b"hunter2-typed-as-user:pw").decode()
    environ = {
        "REMOTE_ADDR": "10.0.0.1",
        "REQUEST_METHOD": "GET",
        "RAW_URI": "/livez",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_AUTHORIZATION": f"Basic {secret}",
    }
    ours, theirs, fmt = _loggers()
    for logger_class in (ours, theirs):
        line = _access_line(logger_class, fmt, environ, [("AUTHORIZATION", f"Basic {secret}")])
        assert '"GET /livez HTTP/1.1" 201 512' in line
        assert "hunter2" not in line and " - - [" in line


def test_the_configured_logger_writes_gunicorns_own_access_line():
    """gunicorn.conf.py's logger builds only the atoms its format shows: the same line as
    gunicorn's logger, and gunicorn's full set for a format naming any other atom."""
    ours, theirs, fmt = _loggers()
    assert issubclass(ours, theirs) and ours is not theirs
    environ = {
        "REMOTE_ADDR": "10.0.0.1",
        "REQUEST_METHOD": "POST",
        "RAW_URI": "/api/v1/uploads?x=1",
        "PATH_INFO": "/api/v1/uploads",
        "QUERY_STRING": "x=1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_REFERER": "https://app.example/",
        "HTTP_USER_AGENT": 'agent "quoted"/1.0',
    }
    headers = [("USER-AGENT", environ["HTTP_USER_AGENT"])]

    def both(fmt: str) -> tuple[str, str]:
        # The time atom alone may differ (a second may turn between the two lines).
        mine, gunicorns = (
            re.sub(r"\[[^]]*\]", "[t]", _access_line(cls, fmt, environ, headers))
            for cls in (ours, theirs)
        )
        return mine, gunicorns

    mine, gunicorns = both(fmt)
    assert mine == gunicorns
    assert '"POST /api/v1/uploads?x=1 HTTP/1.1" 201 512 "https://app.example/"' in mine
    assert mine.endswith('"agent \\"quoted\\"/1.0"')
    mine, gunicorns = both('%(h)s "%(r)s" %(s)s %(D)s %({x-request-id}o)s %(L)s %(U)s %(t)s')
    assert mine == gunicorns and " r-1 " in mine


def test_the_access_line_escapes_what_could_forge_a_field_or_drive_a_terminal():
    """A backslash cannot make a field's closing quote look escaped, and a tab or a C1 control
    (0x9b starts a terminal escape sequence) is written as a visible escape."""
    ours, _, fmt = _loggers()
    environ = {
        "REMOTE_ADDR": "10.0.0.1",
        "REQUEST_METHOD": "GET",
        "RAW_URI": "/livez",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_REFERER": "r\\",
        "HTTP_USER_AGENT": 'a\x9b[2J\tb" "forged',
    }
    line = _access_line(ours, fmt, environ, [])
    assert line.endswith('"r\\\\" "a\\x9b[2J\\tb\\" \\"forged"')
    assert "\x9b" not in line and "\t" not in line


def test_the_date_header_is_gunicorns_rendered_once_a_second():
    """gunicorn.conf.py renders the `Date` header of every response once a second: the same
    text as gunicorn's own rendering at every moment, the next second's once it turns."""
    import email.utils

    import gunicorn.util
    import time_machine

    runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    http_date = gunicorn.util.http_date
    assert http_date.rendered is not http_date  # type: ignore[attr-defined]
    with time_machine.travel(1_800_000_000.25, tick=False) as traveller:
        first = http_date()
        assert first == email.utils.formatdate(1_800_000_000.25, usegmt=True)
        traveller.shift(0.5)
        assert http_date() is first  # the same second: not rendered again
        traveller.shift(0.5)
        assert http_date() == email.utils.formatdate(1_800_000_001, usegmt=True) != first
    assert http_date(1_000_000_000) == email.utils.formatdate(1_000_000_000, usegmt=True)


def test_the_access_lines_time_is_gunicorns():
    """The access line's time atom, rendered once a second, reads as gunicorn renders it."""
    import time_machine
    from gunicorn.config import Config

    ours, theirs, _ = _loggers()
    for moment in (1_800_000_000.5, 1_800_000_001.0, 1_800_086_400.9):
        with time_machine.travel(moment, tick=False):
            assert ours(Config()).now() == theirs(Config()).now(), moment

"""BROKER_LOG_FORMAT=json: one JSON object per line, UTC time, and what the line is about."""

from __future__ import annotations

import io
import json
import logging
import runpy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from broker.platform.logs import LineFormatter, LineHandler, log_context
from tests.factories import create_user, issue_token, record_upload

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def json_app(make_app: Callable[..., Flask]) -> Iterator[tuple[Flask, io.StringIO]]:
    """An app logging JSON at INFO into a buffer; text lines again afterwards."""
    app = make_app(LOG_FORMAT="json", LOG_LEVEL="INFO")
    handler = next(h for h in logging.getLogger("broker").handlers if type(h) is LineHandler)
    buffer = io.StringIO()
    stream = handler.setStream(buffer)
    yield app, buffer
    handler.setStream(stream)
    handler.setFormatter(LineFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.getLogger("broker").setLevel("WARNING")


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    """Every line written, each parsed as JSON (a line that is not JSON fails the test)."""
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_request_line_names_request_user_and_upload(json_app: tuple[Flask, io.StringIO]) -> None:
    """An API request about an upload: its line carries the request id, the caller's public
    id and the upload id as fields, and the time in UTC."""
    app, buffer = json_app
    user = create_user(app, "alice")
    upload_id = record_upload(app, user.id, "img-1")
    headers = {**issue_token(app, user), "X-Request-ID": "req-42"}
    response = app.test_client().get(f"/api/v1/uploads/{upload_id}", headers=headers)
    assert response.status_code == 200
    (line,) = [entry for entry in lines(buffer) if entry["logger"] == "broker.request"]
    assert line["request_id"] == "req-42"
    assert line["user"] == user.public_id
    assert line["upload_id"] == upload_id
    assert line["method"] == "GET" and line["status"] == 200
    assert line["path"] == f"/api/v1/uploads/{upload_id}"
    assert line["level"] == "INFO"
    assert line["time"].endswith("Z")  # UTC, ISO 8601


def test_job_lines_carry_the_delivery_from_log_context(json_app: tuple[Flask, io.StringIO]) -> None:
    """Outside a request, `log_context` names the object; a message with a newline stays one
    line of JSON."""
    _app, buffer = json_app
    with log_context(delivery_id=17, upload_id="u1"):
        logging.getLogger("broker.worker").warning("attempt failed:\nreceiver said 503")
    logging.getLogger("broker.worker").warning("after")
    first, after = lines(buffer)
    assert first["delivery_id"] == "17" and first["upload_id"] == "u1"
    assert first["message"] == "attempt failed:\nreceiver said 503"
    assert "delivery_id" not in after


def test_text_stays_the_default(make_app: Callable[..., Flask]) -> None:
    """Without BROKER_LOG_FORMAT, lines are plain text."""
    app = make_app()
    assert app.config["LOG_FORMAT"] == "text"
    handler = next(h for h in logging.getLogger("broker").handlers if type(h) is LineHandler)
    assert type(handler.formatter) is LineFormatter


def test_json_logs_leave_the_access_log_to_the_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """gunicorn's plain-text access line is off with BROKER_LOG_FORMAT=json (the broker's own
    JSON request line carries the same and more), on otherwise."""
    monkeypatch.setenv("BROKER_LOG_FORMAT", "json")
    assert runpy.run_path(str(ROOT / "gunicorn.conf.py"))["accesslog"] is None
    monkeypatch.setenv("BROKER_LOG_FORMAT", "text")
    assert runpy.run_path(str(ROOT / "gunicorn.conf.py"))["accesslog"] == "-"

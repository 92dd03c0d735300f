"""One log line per request, with its request id."""

from __future__ import annotations

import logging
import re

from broker.platform.logs import LINE_FORMAT, LineFormatter


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


def test_a_newline_in_the_path_cannot_forge_a_log_line(make_app, caplog):
    """`%0A` in the path is logged as a visible `\\n`: the request is one line, not two."""
    app = make_app(LOG_LEVEL="INFO")
    handler = next(h for h in logging.getLogger("broker").handlers)
    assert isinstance(handler.formatter, LineFormatter)
    forged = "/x%0A2026-11-29 12:00:00,000 INFO broker.request GET /admin 200 1.0ms%0D%1B[2J"
    with caplog.at_level(logging.INFO, logger="broker.request"):
        app.test_client().get(forged)
    records = [r for r in caplog.records if r.name == "broker.request"]
    assert len(records) == 1
    line = handler.formatter.format(records[0])
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    escaped = "/x\\n2026-11-29 12:00:00,000 INFO broker.request GET /admin 200 1.0ms\\r\\x1b[2J"
    assert escaped in line


def test_line_formatter_writes_times_as_logging_does():
    """The date and time of day, rendered once a second, read as the standard formatter's:
    within one second, across a second and across a day."""
    plain = logging.Formatter(LINE_FORMAT)
    ours = LineFormatter(LINE_FORMAT)
    for created in (1_795_000_000.001, 1_795_000_000.999, 1_795_000_001.5, 1_795_086_400.25):
        record = logging.makeLogRecord({"msg": "GET / 200", "created": created})
        record.msecs = (created - int(created)) * 1000
        assert ours.format(record) == plain.format(record)

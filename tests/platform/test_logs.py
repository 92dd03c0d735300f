"""One log line per request, with its request id."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

from broker.platform import logs
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


STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


@contextmanager
def broker_handler_alone() -> Iterator[tuple[logging.Handler, io.StringIO]]:
    """Leave the broker's own handler the only one listening, as in production (pytest's
    capture on the root logger is set aside), writing into a buffer; restore both after."""
    root = logging.getLogger()
    handler = logging.getLogger("broker").handlers[0]
    saved = root.handlers[:]
    stream = io.StringIO()
    previous = handler.setStream(stream)  # type: ignore[attr-defined]
    root.handlers.clear()
    try:
        yield handler, stream
    finally:
        root.handlers[:] = saved
        handler.setStream(previous)  # type: ignore[attr-defined]


def test_the_line_written_straight_to_the_broker_handler(make_app):
    """With only the broker's handler listening the request's line skips the record: written
    once per request with every field, a hostile path escaped, a hostile id replaced."""
    app = make_app(LOG_LEVEL="INFO")
    client = app.test_client()
    forged = (
        "/x%0A2026-11-29 12:00:00,000 INFO broker.request GET /admin 200 1.0ms%0D%1B[2J%E2%80%A8"
    )
    with broker_handler_alone() as (handler, stream):
        assert logs._sole_handler() is handler
        ok = client.get("/livez", headers={"X-Request-ID": "trace-7"})
        # A header value a client sends as it likes, past any server's checks.
        bad = client.get(forged, environ_overrides={"HTTP_X_REQUEST_ID": "id\n2026 FAKE"})
        refused = client.post("/api/v1/uploads", json={})
    lines = stream.getvalue().split("\n")
    assert lines.pop() == "" and len(lines) == 3, lines
    assert ok.status_code == 200 and refused.status_code == 401
    assert re.fullmatch(
        rf"{STAMP} INFO broker.request GET /livez 200 \d+\.\dms request_id=trace-7", lines[0]
    )
    rid = bad.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    escaped = "/x\\n2026-11-29 12:00:00,000 INFO broker.request GET /admin 200 1.0ms\\r\\x1b[2J"
    assert lines[1].startswith(f"{lines[1][:23]} INFO broker.request GET {escaped}\\u2028 404 ")
    assert re.fullmatch(rf"{STAMP} INFO .* 404 \d+\.\dms request_id={rid}", lines[1])
    refused_line = rf"{STAMP} INFO broker.request POST /api/v1/uploads 401 \d+\.\dms "
    assert re.fullmatch(refused_line + r"request_id=[0-9a-f]{32}", lines[2])


def test_anyone_else_listening_gets_the_record_and_the_line_is_written_once(make_app):
    """A handler added on the way (an operator's, a test's capture), a filter, a quieter
    handler or another format: the ordinary record path runs, and the broker's handler still
    writes the one line (or none, where its level says so)."""
    app = make_app(LOG_LEVEL="INFO")
    client = app.test_client()
    request_log = logging.getLogger("broker.request")

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    other = Collect()
    with broker_handler_alone() as (handler, stream):
        logging.getLogger().addHandler(other)
        assert logs._sole_handler() is None
        client.get("/livez", headers={"X-Request-ID": "seen-by-two"})
        logging.getLogger().removeHandler(other)
        request_log.addFilter(lambda record: "drop-me" not in record.getMessage())
        assert logs._sole_handler() is None
        client.get("/livez", headers={"X-Request-ID": "drop-me"})
        request_log.filters.clear()
        handler.setLevel(logging.WARNING)
        assert logs._sole_handler() is None
        client.get("/livez", headers={"X-Request-ID": "too-quiet"})
        handler.setLevel(logging.NOTSET)
        own_format = handler.formatter
        handler.setFormatter(LineFormatter("%(levelname)s|%(message)s"))
        assert logs._sole_handler() is None
        client.get("/livez", headers={"X-Request-ID": "other-format"})
        handler.setFormatter(own_format)
        assert logs._sole_handler() is handler
    assert [r.getMessage().rsplit("=", 1)[1] for r in other.records] == ["seen-by-two"]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(
        rf"{STAMP} INFO broker.request GET /livez 200 .* request_id=seen-by-two", lines[0]
    )
    assert re.fullmatch(r"INFO\|GET /livez 200 \d+\.\dms request_id=other-format", lines[1])


def test_the_short_cut_writes_what_the_formatter_writes():
    """`LineFormatter.line` and the record path give the same text: escapes, milliseconds
    (on a second's edges too) and a `%` in the message left alone."""
    formatter = LineFormatter(LINE_FORMAT)
    assert formatter.writes_plain_lines()
    messages = [
        "GET /a%20b 200 1.0ms request_id=x",
        "GET /x\n2026 INFO forged\r\x1b[2J\x00\x7f\x85\u2028\u2029 404",
        "GET /caf\u00e9/\u200b 200",  # printable or merely invisible: not a control, kept
    ]
    for created in (1_795_000_000.0, 1_795_000_000.0005, 1_795_000_000.999, 1_795_086_399.9999):
        for message in messages:
            record = logging.makeLogRecord(
                {"name": "broker.request", "levelno": logging.INFO, "levelname": "INFO",
                 "msg": message, "created": created}
            )  # fmt: skip
            record.msecs = int((created - int(created)) * 1000) + 0.0
            assert formatter.line(created, "INFO", "broker.request", message) == (
                formatter.format(record)
            )
    assert not LineFormatter("%(message)s").writes_plain_lines()
    assert not LineFormatter(LINE_FORMAT, datefmt="%H:%M").writes_plain_lines()

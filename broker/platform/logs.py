"""Logging: one line per request with method, path, status, duration and request id.

Every broker log line goes through `LineFormatter`, which escapes control characters in the
message: a value taken from a request (a path with `%0A` in it, a header, a filename) can never
start a line of its own and forge an entry.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time

from flask import Flask, Response, g, request

log = logging.getLogger("broker.request")

# Honour a caller's X-Request-ID only when it is short and plain, so it cannot forge log lines.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str) -> str:
    """Return `text` with every control character written as a visible escape (`\\n`, `\\x1b`)."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class LineFormatter(logging.Formatter):
    """Format a record's message as one line: control characters escaped. A traceback, which
    the formatter appends itself, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        """Interpolate the record with its message escaped (the record itself is not changed)."""
        safe = logging.makeLogRecord(record.__dict__)
        safe.message = escape(record.message)
        return super().formatMessage(safe)


def _configure(level: str) -> None:
    root = logging.getLogger("broker")
    root.setLevel(level.upper())
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LineFormatter(LINE_FORMAT))
        root.addHandler(handler)


def _start() -> None:
    incoming = request.headers.get("X-Request-ID", "")
    # 128 random bits in hex, like uuid4().hex without building a UUID on every request.
    g.request_id = incoming if _REQUEST_ID.match(incoming) else os.urandom(16).hex()
    g.request_started = time.perf_counter()


def _finish(response: Response) -> Response:
    request_id = g.get("request_id") or os.urandom(16).hex()
    response.headers["X-Request-ID"] = request_id
    started = g.get("request_started")
    duration_ms = (time.perf_counter() - started) * 1000 if started else 0.0
    log.info(
        "%s %s %s %.1fms request_id=%s",
        request.method,
        request.path,
        response.status_code,
        duration_ms,
        request_id,
    )
    return response


def init_app(app: Flask) -> None:
    """Configure the broker loggers and the per-request log line."""
    _configure(app.config["LOG_LEVEL"])
    app.before_request(_start)
    app.after_request(_finish)

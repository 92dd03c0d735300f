"""Logging: one line per request with method, path, status, duration and request id.

The request id and the line are the work of `RequestLog`, a WSGI middleware around the app:
every response gets its `X-Request-ID`, including error pages and static files, and the id is
`request_id()` while the request runs (error pages quote it). Working on the raw WSGI environ
and header list keeps it off Flask's per-request hooks and header checks (the hot path).

Every broker log line goes through `LineFormatter`, which escapes control characters in the
message: a value taken from a request (a path with `%0A` in it, a header, a filename) can never
start a line of its own and forge an entry.

The request's line is the one written on every request, so it takes a short cut when nothing
but the broker's own handler would see its record (the configuration `_configure` sets up): the
line is built once, exactly as that handler's formatter would write it, and handed to the handler
(`LineHandler.write_line`) with no `LogRecord` and no `Formatter` work. Anything else listening
(a handler added to a logger on the way, a filter, a test's capture) gets the ordinary record.

`BROKER_LOG_FORMAT=json` writes one JSON object per line instead (`JsonLineFormatter`, built on
python-json-logger): the time in UTC, level, logger, message, and the fields of what the line is
about where known — `request_id`, `user` (the public id), `upload_id`, `delivery_id` — taken
from the request, from `log_context(...)` around a job, or from a call's `extra=`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from flask import Flask, g, has_request_context, request
from pythonjsonlogger.json import JsonFormatter

from broker.platform.config import settings_of

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
        # Whatever the pattern matches is unprintable: the quick test settles most lines.
        if record.message.isprintable() or _CONTROL.search(record.message) is None:
            return super().formatMessage(record)  # nothing to escape: no copy of the record
        safe = logging.makeLogRecord(record.__dict__)
        safe.message = escape(record.message)
        return super().formatMessage(safe)

    _stamp: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """Return the record's time as `logging.Formatter` writes it, the date and time of day
        rendered once a second rather than for every line."""
        msec_format = self.default_msec_format
        if datefmt or self.datefmt or not msec_format:
            return super().formatTime(record, datefmt)
        return msec_format % (self._second(int(record.created)), record.msecs)

    def _second(self, second: int) -> str:
        """Return the date and time of day of `second` (epoch seconds) in the default format."""
        stamp = self._stamp  # one tuple, read and replaced whole: safe across threads
        if stamp[0] != second:
            stamp = (second, time.strftime(self.default_time_format, self.converter(second)))
            self._stamp = stamp
        return stamp[1]

    def writes_plain_lines(self) -> bool:
        """Tell whether this formatter writes `LINE_FORMAT` with the default time format, the
        lines `line` builds."""
        return (
            self._fmt == LINE_FORMAT
            and not self.datefmt
            and self.default_time_format == logging.Formatter.default_time_format
            and self.default_msec_format == "%s,%03d"
        )

    def line(self, created: float, levelname: str, name: str, message: str) -> str:
        """Return the line `format` writes for a record with these fields and no traceback
        (when `writes_plain_lines`): one f-string, no record."""
        # Whatever the pattern matches is unprintable: the quick test settles most lines.
        if not message.isprintable() and _CONTROL.search(message) is not None:
            message = escape(message)
        second = int(created)
        # The milliseconds as LogRecord computes them, so both ways read the same.
        msecs = int((created - second) * 1000)
        return f"{self._second(second)},{msecs:03d} {levelname} {name} {message}"


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The broker's handler (a stream handler with a `LineFormatter`), which also takes a line
    that is already formatted."""

    def write_line(self, text: str) -> None:
        """Write one formatted line as `emit` writes a record's (then flushed), under the
        handler's lock."""
        with self.lock:  # type: ignore[union-attr]
            try:
                stream = self.stream
                stream.write(text + self.terminator)
                stream.flush()
            except RecursionError:
                raise
            except Exception:
                self.handleError(logging.makeLogRecord({"msg": text}))


# What a JSON line may say it is about, beside the request id.
CONTEXT_FIELDS = ("user", "upload_id", "delivery_id")
# Set by `log_context` around a job (a worker's delivery or verification) outside a request.
_context: ContextVar[Mapping[str, str]] = ContextVar(
    "broker_log_context", default=MappingProxyType({})
)
# Where the request's user and objects wait in the WSGI environ for the request's own line.
FIELDS_KEY = "broker.log_fields"


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Name what the lines logged inside are about (`upload_id=…`, `delivery_id=…`, `user=…`)."""
    token = _context.set({**_context.get(), **{k: str(v) for k, v in fields.items()}})
    try:
        yield
    finally:
        _context.reset(token)


def _request_fields() -> dict[str, str]:
    """The current request's id, user public id and the upload or delivery in its URL."""
    if not has_request_context():
        return {}
    fields: dict[str, str] = {}
    rid = request.environ.get(REQUEST_ID_KEY)
    if rid:
        fields["request_id"] = rid
    # Only a user already loaded by the request: logging never runs a query of its own.
    user = g.get("_login_user")
    public_id = getattr(user, "public_id", None)
    if public_id:
        fields["user"] = str(public_id)
    for name in ("upload_id", "delivery_id"):
        value = (request.view_args or {}).get(name)
        if value is not None:
            fields[name] = str(value)
    return fields


class JsonLineFormatter(JsonFormatter):
    """One JSON object per record: `time` (UTC, ISO 8601), `level`, `logger`, `message`, the
    context fields where known, and `exc_info` with a traceback."""

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        """Add the standard fields, then the time in UTC and what the line is about."""
        log_data["time"] = (
            datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        ).replace("+00:00", "Z")
        super().add_fields(log_data, record, message_dict)
        for key, value in {**_request_fields(), **_context.get()}.items():
            log_data.setdefault(key, value)


def _configure(level: str, fmt: str = "text") -> None:
    root = logging.getLogger("broker")
    root.setLevel(level.upper())
    formatter = JsonLineFormatter() if fmt == "json" else LineFormatter(LINE_FORMAT)
    ours = [h for h in root.handlers if type(h) is LineHandler]
    if ours:
        # The process's last app decides (one app per process outside tests).
        if type(ours[0].formatter) is not type(formatter):
            ours[0].setFormatter(formatter)
    elif not root.handlers:
        handler = LineHandler(sys.stderr)
        handler.setFormatter(formatter)
        root.addHandler(handler)


# Where the id waits in the WSGI environ while the request runs.
REQUEST_ID_KEY = "broker.request_id"

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def request_id() -> str | None:
    """Return the current request's id (None outside a request)."""
    if not has_request_context():
        return None
    value: str | None = request.environ.get(REQUEST_ID_KEY)
    return value


class RequestLog:
    """WSGI middleware: give each request an id, echo it as `X-Request-ID`, log one line; and
    add the fixed headers every response carries (`add_headers`, broker.platform.headers), in
    the same pass: one layer around the app, not one per concern."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app
        self.fixed: list[tuple[str, str]] = []
        self.names: frozenset[str] = frozenset()

    def add_headers(self, fixed: list[tuple[str, str]]) -> None:
        """Add `fixed` to every response that does not set one of those headers itself."""
        self.fixed = [*self.fixed, *fixed]
        self.names = frozenset(name.lower() for name, _ in self.fixed)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """Serve the request through the app, then log it (once its status is known)."""
        started = time.perf_counter()
        incoming = environ.get("HTTP_X_REQUEST_ID")
        # 128 random bits in hex, like uuid4().hex without building a UUID on every request.
        rid = incoming if incoming and _REQUEST_ID.match(incoming) else os.urandom(16).hex()
        environ[REQUEST_ID_KEY] = rid
        status = ""
        fixed, names = self.fixed, self.names

        def start(status_line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            nonlocal status
            status = status_line
            # A view that set one of the fixed ones itself (a page with its own policy) keeps
            # its own.
            own = {name.lower() for name, _ in headers} & names
            # Appended, not set: no view names its own X-Request-ID, so none is replaced.
            headers.append(("X-Request-ID", rid))
            headers.extend([pair for pair in fixed if pair[0].lower() not in own] if own else fixed)
            return start_response(status_line, headers, exc_info)

        body = self.app(environ, start)
        if status and log.isEnabledFor(logging.INFO):
            method = environ.get("REQUEST_METHOD", "GET").upper()
            elapsed = (time.perf_counter() - started) * 1000
            code = status.split(" ", 1)[0]
            path = _path(environ)
            _log_request(
                f"{method} {path} {code} {elapsed:.1f}ms request_id={rid}",
                environ,
                {
                    "method": method,
                    "path": path,
                    "status": int(code) if code.isdigit() else code,
                    "duration_ms": round(elapsed, 1),
                    "request_id": rid,
                },
            )
        return body


def _log_request(message: str, environ: dict[str, Any], fields: dict[str, Any]) -> None:
    """Log the request's line at INFO: straight to the broker's handler when it is the only
    one to see it, else as an ordinary record."""
    handler = _sole_handler()
    if handler is not None:
        formatter: LineFormatter = handler.formatter  # type: ignore[assignment]
        handler.write_line(formatter.line(time.time(), "INFO", log.name, message))
        return
    # The record made and handed to the handlers directly: `log.info` would first walk the
    # stack for the caller's file and line, which the line never shows. The message is final
    # (no arguments): a `%` in a path stays as it is. The fields (and what the request was
    # about, kept by `_keep_request_fields`) are attributes of the record, for a JSON formatter.
    extra = {**fields, **environ.get(FIELDS_KEY, {})}
    log.handle(log.makeRecord(log.name, logging.INFO, "", 0, message, (), None, extra=extra))


def _sole_handler() -> LineHandler | None:
    """Return the broker's own handler when an INFO record of the request logger would reach
    it and nothing else (no filter, no other handler on the way up), else None."""
    if log.handlers or log.filters or log.disabled or not log.propagate:
        return None
    parent = log.parent
    if parent is None or parent.filters or len(parent.handlers) != 1:
        return None
    handler = parent.handlers[0]
    if (
        type(handler) is not LineHandler
        or handler.filters
        or handler.level > logging.INFO
        or type(handler.formatter) is not LineFormatter
        or not handler.formatter.writes_plain_lines()
    ):
        return None
    above = parent.parent if parent.propagate else None
    while above is not None:
        if above.handlers:
            return None
        above = above.parent if above.propagate else None
    return handler


def _path(environ: dict[str, Any]) -> str:
    """Return the request's path as Flask's `request.path` reads it (WSGI's latin-1 undone)."""
    raw = environ.get("PATH_INFO") or ""
    return "/" + raw.encode("latin-1").decode(errors="replace").lstrip("/")


def _keep_request_fields(response: Any) -> Any:
    """Keep the request's user and objects for its own line, written after the request ends."""
    fields = {k: v for k, v in _request_fields().items() if k != "request_id"}
    if fields:
        request.environ[FIELDS_KEY] = fields
    return response


def init_app(app: Flask) -> None:
    """Configure the broker loggers and the per-request log line."""
    settings = settings_of(app)
    _configure(settings.log_level, settings.log_format)
    if settings.log_format == "json":
        # Only then: the hook is a cost on every request, and text lines do not show it.
        app.after_request(_keep_request_fields)
    app.wsgi_app = RequestLog(app.wsgi_app)  # type: ignore[method-assign]

"""The one JSON reader for request bodies: every malformed body is a clear 400 or 422.

`init_app` gives the app `StrictJSONProvider` (Flask hands `app.json` to every request as its
JSON reader) and `BrokerRequest`, so `request.get_json()` everywhere — the API's `@endpoint`, the
rate limiter's key function, the login form, the inbound hooks — parses with `strict_loads`:

- a body `json` cannot read (syntax, bad encoding) or nested deeper than `MAX_DEPTH` (deep
  nesting used to escape as `RecursionError`, which is not a `ValueError`) → 400 `invalid_json`;
- well-formed JSON holding what no field may hold — `NaN`, `Infinity`, a number too large for a
  float, a lone surrogate (`"\\udc00"`, which no UTF-8 encoder accepts), a NUL character
  (`"\\u0000"`, which PostgreSQL refuses in text) → 422 naming the field.

`text_problem` is the same rule for text from elsewhere (query strings, form fields).

`get_json(silent=True)` still answers None for all of these, never an exception.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn

from flask import Flask, Request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import RequestEntityTooLarge

from broker.platform.errors import ApiError

# Deep enough for any body the API takes; far below the interpreter's recursion limit.
MAX_DEPTH = 32

_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text: str, what: str = "Text") -> str | None:
    """Return why no field may hold `text` (a lone surrogate, a NUL character), else None."""
    if "\x00" in text:
        return f"{what} must not contain NUL characters."
    if _SURROGATE.search(text):
        return f"{what} must be valid Unicode (no lone surrogates)."
    return None


class MalformedJSON(ValueError):
    """The body is not JSON the broker reads (400 `invalid_json`)."""


class UnacceptableJSON(ValueError):
    """The body is JSON, but a value in it is not acceptable (422 naming `field`)."""

    def __init__(self, field: str, message: str, kind: str) -> None:
        super().__init__(f"{field or 'body'}: {message}")
        self.field = field
        self.message = message
        self.kind = kind


def _field(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path)


def check_value(value: Any) -> None:
    """Raise MalformedJSON or UnacceptableJSON for what `strict_loads` refuses in `value`."""
    # Iterative, so a deep value cannot exhaust the stack here either.
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) >= MAX_DEPTH and isinstance(item, dict | list):
            raise MalformedJSON(f"JSON nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, float) and not math.isfinite(item):
            raise UnacceptableJSON(
                _field(path), "Numbers must be finite (no NaN or Infinity).", "finite_number"
            )
        if isinstance(item, str) and (problem := text_problem(item)):
            raise UnacceptableJSON(_field(path), problem, "unicode")
        if isinstance(item, dict):
            for key, child in item.items():
                if problem := text_problem(key, "Keys"):
                    raise UnacceptableJSON(_field(path), problem, "unicode")
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((child, (*path, i)) for i, child in enumerate(item))


def strict_loads(data: str | bytes, **kwargs: Any) -> Any:
    """Parse JSON; raise a ValueError subclass for anything the broker refuses."""
    try:
        value = json.loads(data, **kwargs)
    except RecursionError:
        raise MalformedJSON("JSON nested too deeply") from None
    check_value(value)
    return value


class StrictJSONProvider(DefaultJSONProvider):
    """Flask's JSON provider, reading with `strict_loads` (writing is unchanged)."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        """Parse JSON strictly (see the module docstring)."""
        return strict_loads(s, **kwargs)


class BrokerRequest(Request):
    """Flask's request, answering a body `get_json()` refuses as an API error (415 without a
    JSON content type, 400 unreadable, 422 unacceptable values)."""

    def _cut_at_the_maximum(self) -> bool:
        """Tell whether a body without Content-Length (chunked) went on past
        MAX_CONTENT_LENGTH: werkzeug reads such a body up to the maximum and silently cuts it
        there, so it would fail as cut JSON (400) instead of a body too large (413)."""
        limit = self.max_content_length
        if limit is None or self.content_length is not None:
            return False
        rest = getattr(self.stream, "_stream", None)  # what the limited stream did not read
        return len(self.get_data()) >= limit and rest is not None and bool(rest.read(1))

    def on_json_loading_failed(self, e: ValueError | None) -> NoReturn:
        """Refuse a body `get_json()` could not take."""
        if e is None:
            raise ApiError(415, "unsupported_media_type", "Send the body as application/json.")
        if self._cut_at_the_maximum():
            raise RequestEntityTooLarge()
        if isinstance(e, UnacceptableJSON):
            detail = {"field": e.field or None, "message": e.message, "type": e.kind}
            raise ApiError(422, "validation_error", "The request is not valid.", [detail])
        raise ApiError(400, "invalid_json", "The request body is not valid JSON.")


def init_app(app: Flask) -> None:
    """Read every JSON body of `app` strictly and answer refusals in the API's error shape."""
    app.json = StrictJSONProvider(app)
    app.request_class = BrokerRequest

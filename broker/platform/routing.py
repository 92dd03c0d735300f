"""URL converters: a path id is parsed once, by the route, never by hand in a view. And which
views serve everyone alike (`needs_no_user`): no credential is checked for them; and which
only read whatever their method (`only_reads`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask
from werkzeug.routing import BaseConverter, UnicodeConverter, ValidationError

# The largest primary key the tables hold: an INTEGER, 32-bit on PostgreSQL (a larger number
# there is an out-of-range error, a 500, not "no such row").
MAX_ROW_ID = 2**31 - 1


class RowIdConverter(BaseConverter):
    """`<id:name>`: a database row id — ASCII digits only, within a 32-bit integer, else 404.

    Werkzeug's `int` converter matches `\\d+`, which takes other scripts' digits too, and any
    length, which overflows the database driver (a 500 instead of a 404).
    """

    regex = "[0-9]{1,10}"

    def to_python(self, value: str) -> int:
        """Return the id as an int (no match, so 404, beyond a 32-bit integer)."""
        number = int(value)
        if number > MAX_ROW_ID:
            raise ValidationError()
        return number

    def to_url(self, value: int) -> str:
        """Return the id as it appears in a URL."""
        return str(int(value))


class TextConverter(UnicodeConverter):
    """`<name>` (the default) and `<string:name>`: one path segment without a NUL character.

    Werkzeug's own takes `%00` into the value; PostgreSQL refuses text holding NUL outright
    (an error, a 500), so no string id with one can name a row: not matching makes it a 404.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.regex = self.regex.replace("[^/]", "[^/\\x00]", 1)


F = TypeVar("F", bound=Callable[..., Any])

_NO_USER = "broker_needs_no_user"


def needs_no_user(view: F) -> F:
    """Mark a view that answers everyone alike (probes, metrics with their own token): a bearer
    credential sent to it is not looked up, so it costs no database work."""
    setattr(view, _NO_USER, True)
    return view


def serves_no_user(app: Flask, endpoint: str | None) -> bool:
    """Tell whether `endpoint` needs no user: a view marked `needs_no_user`, or static files."""
    if endpoint == "static":
        return True
    return endpoint is not None and getattr(app.view_functions.get(endpoint), _NO_USER, False)


_READS_ONLY = "broker_reads_only"


def only_reads(view: F) -> F:
    """Mark a view that only reads, whatever its method (a POST whose body is a query): a
    caller's first request to it creates no account for them."""
    setattr(view, _READS_ONLY, True)
    return view


def reads_only(app: Flask, endpoint: str | None) -> bool:
    """Tell whether `endpoint` is a view marked `only_reads`."""
    return endpoint is not None and getattr(app.view_functions.get(endpoint), _READS_ONLY, False)


def init_app(app: Flask) -> None:
    """Register the converters before any blueprint uses them."""
    app.url_map.converters["id"] = RowIdConverter
    app.url_map.converters["default"] = TextConverter
    app.url_map.converters["string"] = TextConverter

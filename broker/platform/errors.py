"""One JSON error shape for the API, HTML error pages for the browser.

Each way the domain refuses a request is declared once, as a `Refusal`: its kind, snake_case
code, message template, the request field at fault and whether a retry time comes with it.
Domain code raises it (`raise UploadError(TOO_MANY_PENDING, limit=20, retry_after=…)`) and knows
nothing of HTTP: `HTTP_STATUS` below is the one place that turns a kind into a status. The API
documents the same declaration on every route that may answer it (`broker.api.spec.endpoint`
takes refusals among its `errors`), so the raise and the OpenAPI case cannot drift apart.
Views may raise `ApiError` directly for what only HTTP knows (401, 403, 404 of a route).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, jsonify, render_template, request
from flask.typing import ResponseReturnValue
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from broker.platform.logs import request_id

log = logging.getLogger("broker.errors")


class ApiError(Exception):
    """An error answered as `{"error": {"code", "message", "details"}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


class Kind(enum.Enum):
    """What kind of refusal a domain error is; `HTTP_STATUS` maps each to its answer."""

    MALFORMED = "malformed"  # the request cannot be read as meant
    CONFLICT = "conflict"  # it clashes with work in progress; retry shortly
    INVALID = "invalid"  # well-formed, but a rule refuses it
    LIMIT_REACHED = "limit_reached"  # a limit is spent; retry after `retry_after`
    FORBIDDEN = "forbidden"  # the caller may not do this, whatever the input


HTTP_STATUS = {
    Kind.MALFORMED: 400,
    Kind.CONFLICT: 409,
    Kind.INVALID: 422,
    Kind.LIMIT_REACHED: 429,
    Kind.FORBIDDEN: 403,
}


@dataclass(frozen=True, eq=False)
class Refusal:
    """One refusal, declared once: kind, `code`, `message` (a `str.format` template filled by
    the raise, and by `example` for the API's document), the request `field` at fault (if one
    is), and whether the answer says when to retry (`Retry-After`)."""

    kind: Kind
    code: str
    message: str
    example: Mapping[str, Any] | None = None
    field: str | None = None
    retry_after: bool = False

    @property
    def status(self) -> int:
        """The HTTP status of this refusal."""
        return HTTP_STATUS[self.kind]

    def sample_message(self) -> str:
        """The message with the example's values, as the API's document shows it."""
        return self.message.format(**(self.example or {}))


class DomainError(Exception):
    """A declared refusal, raised: its `message` filled with `values`, and seconds until a
    retry may succeed (`retry_after`, when the refusal says when)."""

    def __init__(self, refusal: Refusal, *, retry_after: int | None = None, **values: Any) -> None:
        message = refusal.message.format(**values)
        super().__init__(message)
        self.refusal = refusal
        self.kind = refusal.kind
        self.code = refusal.code
        self.message = message
        self.field = refusal.field
        self.retry_after = retry_after

    def as_api_error(self) -> ApiError:
        """Return the HTTP answer of this refusal."""
        details = None
        if self.field:
            details = [{"field": self.field, "message": self.message, "type": "value_error"}]
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return ApiError(HTTP_STATUS[self.kind], self.code, self.message, details, headers)


def from_validation_error(exc: ValidationError, status: int = 422) -> ApiError:
    """Turn a pydantic ValidationError into a 422 naming each bad field."""
    details = [
        {
            "field": ".".join(str(p) for p in err["loc"]) or None,
            "message": err["msg"],
            "type": err["type"],
        }
        for err in exc.errors(include_url=False, include_input=False)
    ]
    return ApiError(status, "validation_error", "The request is not valid.", details)


def wants_json() -> bool:
    """Answer JSON for the API, the hooks and clients that ask for it; HTML for pages."""
    if request.path.startswith(("/api/", "/hooks/", "/readyz", "/livez")):
        return True
    best = request.accept_mimetypes.best_match(["application/json", "text/html"])
    return (
        best == "application/json"
        and request.accept_mimetypes[best] > request.accept_mimetypes["text/html"]
    )


def _json(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    # Always all three keys, so a client reads `details` without checking it is there: null
    # when there is nothing more to say than the message.
    response = jsonify({"error": {"code": code, "message": message, "details": details}})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _snake(name: str) -> str:
    return name.lower().replace(" ", "_").replace("'", "").replace("-", "_")


def handle_api_error(exc: ApiError) -> ResponseReturnValue:
    """Render an ApiError (as HTML when a page raised it)."""
    if wants_json():
        return _json(exc.status, exc.code, exc.message, exc.details, exc.headers)
    html = render_template("error.html", status=exc.status, message=exc.message)
    return html, exc.status, exc.headers


def handle_domain_error(exc: DomainError) -> ResponseReturnValue:
    """Answer a domain refusal with the status its kind maps to."""
    return handle_api_error(exc.as_api_error())


def handle_validation_error(exc: ValidationError) -> ResponseReturnValue:
    """Answer a request model's validation failure with 422 and field details."""
    return handle_api_error(from_validation_error(exc))


def handle_http_exception(exc: HTTPException) -> ResponseReturnValue:
    """Render werkzeug's HTTP errors (404, 405, 413, …) in the caller's format."""
    status = exc.code or 500
    headers = dict(exc.get_headers()) if status in (405, 429) else {}
    headers.pop("Content-Type", None)
    message = exc.description or exc.name
    if wants_json():
        return _json(status, _snake(exc.name), message, headers=headers)
    return render_template("error.html", status=status, message=message), status, headers


def handle_unexpected(exc: Exception) -> ResponseReturnValue:
    """Log an unexpected error with its request id and answer a plain 500, never a trace."""
    if isinstance(exc, HTTPException):
        return handle_http_exception(exc)
    rid = request_id()
    log.exception("unhandled error request_id=%s", rid)
    message = f"Something went wrong on our side. Quote request id {rid or '-'}."
    if wants_json():
        return _json(500, "internal_error", message)
    return render_template("error.html", status=500, message=message), 500


def init_app(app: Flask) -> None:
    """Register the error handlers."""
    app.register_error_handler(ApiError, handle_api_error)
    app.register_error_handler(DomainError, handle_domain_error)
    app.register_error_handler(ValidationError, handle_validation_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)

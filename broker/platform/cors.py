"""CORS for the JSON API: pages of the listed origins may call `/api/v1` with a bearer token.

Only `/api/v1/…` (and the browser module under `/static/js/`) answers cross-origin requests, and
only for the origins in `BROKER_CORS_ORIGINS` — exact `scheme://host[:port]` values, never `*`.
`Access-Control-Allow-Credentials` is never sent, so a browser never attaches the broker's
cookies to a cross-origin call: cookie sessions stay same-origin (and keep their CSRF rules);
another origin authenticates with `Authorization: Bearer …`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, request

from broker.platform.config import ConfigError, settings_of

API_PREFIX = "/api/v1/"
# The page's ES module (`/static/js/…`), imported by apps' pages with `<script type="module">`.
MODULE_PREFIX = "/static/js/"
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE"
ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key, X-Request-ID"
EXPOSE_HEADERS = "Retry-After, Location, Idempotent-Replayed, X-Request-ID"
# Browsers cap this anyway (Chromium: 2 h); ten minutes keeps a changed allow-list prompt.
MAX_AGE = "600"


def parse_origins(value: Any) -> frozenset[str]:
    """Read BROKER_CORS_ORIGINS (a list or comma-separated) into normalised origins."""
    names = value.split(",") if isinstance(value, str) else list(value or [])
    origins = set()
    for raw in (str(n).strip() for n in names):
        if not raw:
            continue
        parts = urlsplit(raw)
        if (
            raw == "*"
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or parts.username is not None
        ):
            raise ConfigError(
                f"BROKER_CORS_ORIGINS: {raw!r} is not an origin like https://app.example.com "
                "(no paths, no wildcard)"
            )
        origins.add(f"{parts.scheme}://{parts.netloc.lower()}")
    return frozenset(origins)


def _applies() -> bool:
    return request.path.startswith((API_PREFIX, MODULE_PREFIX))


def init_app(app: Flask) -> None:
    """Answer preflights and mark API answers for the allowed origins (before auth runs)."""
    allowed = parse_origins(settings_of(app).cors_origins)
    if not allowed:
        return

    @app.before_request
    def _preflight() -> Response | None:
        if request.method != "OPTIONS" or not _applies():
            return None
        if "Access-Control-Request-Method" not in request.headers:
            return None  # a plain OPTIONS request: Flask's own answer
        response = app.response_class(status=204)
        if request.headers.get("Origin") in allowed:
            response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
            response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
            response.headers["Access-Control-Max-Age"] = MAX_AGE
        return response

    @app.after_request
    def _cors(response: Response) -> Response:
        if not _applies():
            return response
        response.vary.add("Origin")
        origin = request.headers.get("Origin")
        if origin in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        return response

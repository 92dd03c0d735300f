"""Security headers on every response: a strict CSP, nosniff, referrer policy, HSTS.

The request log's WSGI middleware (broker.platform.logs.RequestLog) adds them, so every response
kind carries them — pages, API answers, error pages, static files, redirects — and they cost
one pass over the response's header list in the layer already there: the values are built
once, when the app is created.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask

from broker.platform.config import settings_of
from broker.platform.logs import RequestLog


def origin_of(url: str | None) -> str | None:
    """Return `scheme://host[:port]` of a URL, or None when it has none."""
    if not url:
        return None
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}"


def content_security_policy(upload_origin: str | None, delivery_origin: str | None) -> str:
    """Build the CSP: scripts and styles from 'self' only; uploads only to the upload origin."""
    upload = " ".join(o for o in ("'self'", upload_origin) if o)
    images = " ".join(o for o in ("'self'", delivery_origin, "blob:") if o)
    directives = {
        "default-src": "'self'",
        "script-src": "'self'",
        "style-src": "'self'",
        "img-src": images,
        "connect-src": upload,
        "form-action": upload,
        "font-src": "'self'",
        "object-src": "'none'",
        "base-uri": "'none'",
        "frame-ancestors": "'none'",
    }
    return "; ".join(f"{name} {value}" for name, value in directives.items())


def init_app(app: Flask) -> None:
    """Add the security headers to every response of the app."""
    settings = settings_of(app)
    csp = content_security_policy(
        origin_of(settings.cloudflare_upload_origin),
        origin_of(settings.cloudflare_delivery_base),
    )
    fixed = [
        ("Content-Security-Policy", csp),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "strict-origin-when-cross-origin"),
        ("X-Frame-Options", "DENY"),
        ("Cross-Origin-Opener-Policy", "same-origin"),
    ]
    if settings.env == "production":
        fixed.append(("Strict-Transport-Security", "max-age=63072000; includeSubDomains"))
    middleware = app.wsgi_app
    if not isinstance(middleware, RequestLog):
        raise RuntimeError("broker.platform.logs.init_app must run before headers.init_app")
    middleware.add_headers(fixed)

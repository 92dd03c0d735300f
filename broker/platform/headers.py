"""Security headers on every response: a strict CSP, nosniff, referrer policy, HSTS."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, Response


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
    csp = content_security_policy(
        origin_of(app.config.get("CLOUDFLARE_UPLOAD_ORIGIN")),
        origin_of(app.config.get("CLOUDFLARE_DELIVERY_BASE")),
    )
    fixed = [
        ("Content-Security-Policy", csp),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "strict-origin-when-cross-origin"),
        ("X-Frame-Options", "DENY"),
        ("Cross-Origin-Opener-Policy", "same-origin"),
    ]
    if app.config["ENV"] == "production":
        fixed.append(("Strict-Transport-Security", "max-age=63072000; includeSubDomains"))
    names = {name.lower() for name, _ in fixed}

    @app.after_request
    def _headers(response: Response) -> Response:
        headers = response.headers
        # Built once above; one pass over the response's headers finds what a view set itself.
        own = {name.lower() for name, _ in headers} & names
        headers.extend([(name, value) for name, value in fixed if name.lower() not in own])
        return response

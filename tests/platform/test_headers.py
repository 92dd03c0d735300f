"""Security headers on every page."""

from __future__ import annotations

from broker.platform.headers import content_security_policy, origin_of
from tests.factories import production_app


def _directives(csp: str) -> dict[str, str]:
    return dict(part.strip().split(" ", 1) for part in csp.split(";"))


def test_origin_of():
    assert origin_of("https://imagedelivery.net/abc") == "https://imagedelivery.net"
    assert origin_of("http://127.0.0.1:8788/client/v4") == "http://127.0.0.1:8788"
    assert origin_of("not a url") is None
    assert origin_of(None) is None


def test_csp_allows_only_self_and_the_upload_and_delivery_origins(make_app):
    app = make_app(
        CLOUDFLARE_UPLOAD_ORIGIN="https://upload.imagedelivery.net",
        CLOUDFLARE_DELIVERY_BASE="https://imagedelivery.net",
    )
    response = app.test_client().get("/")
    csp = _directives(response.headers["Content-Security-Policy"])
    assert csp["script-src"] == "'self'"
    assert csp["connect-src"] == "'self' https://upload.imagedelivery.net"
    assert csp["form-action"] == "'self' https://upload.imagedelivery.net"
    assert csp["img-src"] == "'self' https://imagedelivery.net blob:"
    assert csp["object-src"] == "'none'"
    assert csp["base-uri"] == "'none'"
    assert csp["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "strict-origin-when-cross-origin"
    assert "Strict-Transport-Security" not in response.headers


def test_hsts_outside_development(tmp_path):
    app = production_app(tmp_path)
    response = app.test_client().get("/livez")
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")


def test_csp_without_upload_origin_is_self_only():
    csp = _directives(content_security_policy(None, None))
    assert csp["connect-src"] == "'self'"
    assert csp["img-src"] == "'self' blob:"

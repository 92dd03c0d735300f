"""The one JSON error shape for the API, HTML error pages for browsers, no trace leaked."""

from __future__ import annotations

from flask import Flask


def test_unknown_api_route_is_json_404(client):
    response = client.get("/api/v1/nope")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


def test_unknown_page_is_html_404(client):
    response = client.get("/nope", headers={"Accept": "text/html"})
    assert response.status_code == 404
    assert "text/html" in response.content_type
    assert "404" in response.text


def test_unexpected_error_is_500_without_trace(app: Flask):
    @app.get("/api/v1/boom")
    def boom():  # type: ignore[no-untyped-def]
        raise RuntimeError("secret internals")

    app.config["PROPAGATE_EXCEPTIONS"] = False
    response = app.test_client().get("/api/v1/boom")
    assert response.status_code == 500
    body = response.get_json()
    assert body["error"]["code"] == "internal_error"
    assert "secret internals" not in response.text
    assert "Traceback" not in response.text

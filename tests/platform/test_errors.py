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


def test_every_api_error_has_code_message_and_details(make_app, make_user, bearer):
    """README: errors always look like {"error": {"code", "message", "details"}}; `details` is
    null when the message says it all, a list of fields for 422."""
    from tests.factories import record_upload

    app = make_app(MAX_CONTENT_LENGTH=2048)
    alice = make_user()
    auth = bearer(app, alice)
    pending = record_upload(app, alice.id, "img-pending", status="pending")
    client = app.test_client()
    json_auth = {**auth, "Accept": "application/json"}
    answers = {
        400: client.post(
            "/api/v1/uploads", data="{nope", headers={**auth, "Content-Type": "application/json"}
        ),
        401: client.get("/api/v1/uploads"),
        404: client.get("/api/v1/uploads/nope", headers=auth),
        405: client.put("/api/v1/uploads", headers=auth),
        409: client.get(f"/i/{pending}/thumb", headers=json_auth),
        413: client.post("/api/v1/uploads", json={"metadata": {"x": "y" * 4096}}, headers=auth),
        415: client.post("/api/v1/uploads", data="{}", headers=auth),
        422: client.post("/api/v1/uploads", json={"expires_in": 5}, headers=auth),
    }
    for status, response in answers.items():
        assert response.status_code == status, (status, response.get_json())
        error = response.get_json()["error"]
        assert set(error) == {"code", "message", "details"}, (status, error)
        assert error["code"] and error["message"], (status, error)
        if status == 422:
            assert [d["field"] for d in error["details"]] == ["expires_in"]
        else:
            assert error["details"] is None, (status, error)


def test_documented_error_schema_requires_details(client):
    """The OpenAPI document says the same: `details` is always there, possibly null."""
    schema = client.get("/api/v1/openapi.json").get_json()["components"]["schemas"]
    assert set(schema["ErrorDetail"]["required"]) == {"code", "message", "details"}

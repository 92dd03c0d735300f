"""The OpenAPI document and its offline docs page."""

from __future__ import annotations

import jsonschema
import pytest
from flask import Blueprint
from pydantic import BaseModel, Field

from broker.api import spec
from broker.api.spec import endpoint
from tests.support.openapi_check import _compiled


class Ping(BaseModel):
    name: str = Field(min_length=1, max_length=10)


class Pong(BaseModel):
    greeting: str


@pytest.fixture
def demo_api(make_app):
    """An app with one extra documented endpoint, removed from the registry afterwards."""
    bp = Blueprint("demo", __name__, url_prefix="/api/v1/demo")
    before = list(spec.OPERATIONS)

    @endpoint(bp, "POST", "/ping", body=Ping, responses={200: Pong}, auth=False)
    def ping(body: Ping) -> Pong:
        """Answer a greeting."""
        return Pong(greeting=f"hi {body.name}")

    app = make_app()
    app.register_blueprint(bp)
    _compiled.cache_clear()
    yield app
    spec.OPERATIONS[:] = before
    _compiled.cache_clear()


def test_openapi_document_is_valid_31(client):
    doc = client.get("/api/v1/openapi.json").get_json()
    assert doc["openapi"] == "3.1.0"
    jsonschema.Draft202012Validator.check_schema(doc["components"]["schemas"].get("ErrorResponse"))
    assert "/api/v1/openapi.json" not in doc["paths"]  # documents the API, not itself


def test_docs_page_renders_offline(client):
    page = client.get("/api/v1/docs")
    assert page.status_code == 200
    assert "openapi.json" in page.text
    assert "https://" not in page.text.split("<body>")[0]  # no CDN assets in <head>


def test_endpoint_validates_body_and_documents_itself(demo_api):
    c = demo_api.test_client()
    assert c.post("/api/v1/demo/ping", json={"name": "ana"}).get_json() == {"greeting": "hi ana"}

    bad = c.post("/api/v1/demo/ping", json={"name": ""})
    assert bad.status_code == 422
    assert bad.get_json()["error"]["details"][0]["field"] == "name"

    broken = c.post("/api/v1/demo/ping", data="{nope", content_type="application/json")
    assert broken.status_code == 400
    assert broken.get_json()["error"]["code"] == "invalid_json"

    doc = c.get("/api/v1/openapi.json").get_json()
    op = doc["paths"]["/api/v1/demo/ping"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/Ping")
    assert "Pong" in doc["components"]["schemas"]


def test_spec_checking_client_catches_undocumented_shapes(demo_api):
    @demo_api.get("/api/v1/demo/ping-wrong")
    def wrong():  # type: ignore[no-untyped-def]
        return {"nope": 1}

    with pytest.raises(AssertionError, match="not in the OpenAPI document"):
        demo_api.test_client().get("/api/v1/demo/ping-wrong")


def test_admin_endpoints_refuse_non_admins_before_reading_the_body(app, make_user, bearer):
    user = make_user("alice")
    client = app.test_client()
    # A body that would be a 422 for an admin: a non-admin learns nothing about the schema.
    refused = client.post("/api/v1/webhooks/endpoints", json={"nope": 1}, headers=bearer(app, user))
    assert refused.status_code == 403
    assert refused.get_json()["error"]["code"] == "forbidden"
    doc = client.get("/api/v1/openapi.json").get_json()
    op = doc["paths"]["/api/v1/webhooks/endpoints"]["post"]
    assert op["description"].startswith("Administrators only")

"""The OpenAPI document and its offline docs page."""

from __future__ import annotations

import jsonschema
import pytest
from flask import Blueprint
from pydantic import BaseModel, Field

from broker.api import spec
from broker.api.spec import endpoint


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
    yield app
    spec.OPERATIONS[:] = before


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


def _document(app):
    with app.test_request_context():
        return spec.openapi_document()


def _validator(document, schema):
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    registry = Registry().with_resource("urn:doc", Resource(document, DRAFT202012))
    ref = schema.get("$ref")
    return jsonschema.Draft202012Validator(
        {"$ref": "urn:doc" + ref} if ref else schema, registry=registry
    )


def test_every_request_and_answer_has_an_example_that_fits_its_schema(app):
    document = _document(app)
    checked = 0
    for path, item in document["paths"].items():
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            media = op.get("requestBody", {}).get("content", {}).get("application/json")
            examples = [media["example"]] if media else []
            for status, answer in op["responses"].items():
                content = answer.get("content", {}).get("application/json")
                if content is None:
                    assert status == "204", f"{where} {status} has no body"
                    continue
                if int(status) < 400:
                    assert "example" in content, f"{where} {status} has no example"
                    examples.append(content["example"])
                else:  # one example per error code the route can answer, with that status
                    assert content["examples"], f"{where} {status}"
                    for code, example in content["examples"].items():
                        assert example["value"]["error"]["code"] == code
                        examples.append(example["value"])
                for example in examples:
                    schema = media if example is (media or {}).get("example") else content
                    errors = list(_validator(document, schema["schema"]).iter_errors(example))
                    assert not errors, f"{where} {status}: {errors[0].message}"
                    checked += 1
                examples = []
            for param in op["parameters"]:
                param = (
                    param
                    if "$ref" not in param
                    else document["components"]["parameters"]["RequestId"]
                )
                assert param.get("description"), f"{where}: {param['name']} undescribed"
                if param["required"]:
                    assert "example" in param, f"{where}: {param['name']} has no example"
    assert checked > 80


def test_the_document_declares_headers_optional_bodies_enums_and_limits(make_app):
    document = _document(make_app(VARIANTS="thumb:256x256:cover,hero:1600x900:scale-down"))
    paths = document["paths"]
    create = paths["/api/v1/uploads"]["post"]
    key = next(p for p in create["parameters"] if p.get("name") == "Idempotency-Key")
    assert key["in"] == "header" and key["schema"]["maxLength"] == 255
    assert create["requestBody"]["required"] is False  # no body at all means every default
    created = create["responses"]["201"]["headers"]
    assert created["Location"]["required"] and not created["Idempotent-Replayed"]["required"]
    assert set(create["responses"]["409"]["content"]["application/json"]["examples"]) == {
        "idempotency_in_progress",
        "image_id_taken",
    }
    for status in ("429", "503"):
        assert create["responses"][status]["headers"]["Retry-After"]["required"]
    assert paths["/api/v1/uploads/{upload_id}/complete"]["post"]["responses"]["202"]["headers"][
        "Retry-After"
    ]["required"]
    for path, method in (
        ("/api/v1/webhooks/endpoints/{endpoint_id}", "patch"),
        ("/api/v1/webhooks/endpoints/{endpoint_id}/rotate-secret", "post"),
        ("/api/v1/users/{public_id}/upload-limits", "put"),
    ):
        assert paths[path][method]["requestBody"]["required"] is False, path
    assert paths["/api/v1/auth/tokens"]["post"]["requestBody"]["required"] is True
    # The variants this app declares, and no others.
    url = paths["/api/v1/images/{upload_id}/url"]["get"]
    variant = next(p for p in url["parameters"] if p.get("name") == "variant")
    assert variant["schema"]["enum"] == ["hero", "public", "thumb"]
    batch = document["components"]["schemas"]["UrlRequest"]["properties"]["variant"]
    assert batch["enum"] == ["hero", "public", "thumb"]
    custom_id = document["components"]["schemas"]["CreateUpload"]["properties"]["id"]
    assert custom_id["anyOf"][0]["maxLength"] == 1024 and "pattern" in custom_id["anyOf"][0]
    assert {s["url"] for s in document["servers"]} == {"http://localhost"}
    assert set(document["components"]["securitySchemes"]) == {"bearer", "serviceKey", "session"}


def test_a_decorator_declares_what_it_adds_to_every_route_it_wraps(make_app):
    """`spec.declare` is how @idempotent documents Idempotency-Key: any route it wraps has it."""
    from broker.uploads.api import idempotent

    bp = Blueprint("demo2", __name__, url_prefix="/api/v1/demo2")
    before = list(spec.OPERATIONS)
    try:

        @endpoint(bp, "POST", "/things", responses={201: Pong})
        @idempotent
        def make_thing():
            """Make a thing."""
            return Pong(greeting="made")

        op = _document(make_app())["paths"]["/api/v1/demo2/things"]["post"]
    finally:
        spec.OPERATIONS[:] = before
    assert "Idempotency-Key" in [p.get("name") for p in op["parameters"]]
    assert "Idempotent-Replayed" in op["responses"]["201"]["headers"]
    assert (
        "idempotency_key_reused"
        in op["responses"]["422"]["content"]["application/json"]["examples"]
    )


@pytest.mark.parametrize(
    "custom_id",
    [
        *("a", "a/b", "photos/2026/beach.jpg", ".a", "a.", "...", "a/.../b", "é", "a b"),
        *("/a", "a/", "a//b", ".", "..", "a/./b", "a/..", "x?", "a#b", "a\\b", "a\x7f", "a\x1fb"),
        *("0123456789abcdef0123456789abcdef", "01234567-89ab-cdef-0123-456789ABCDEF"),
    ],
)
def test_the_documented_custom_id_pattern_is_the_rule_the_broker_applies(custom_id):
    import re

    from broker.uploads import policy

    documented = re.fullmatch(policy.CUSTOM_ID_PATTERN, custom_id) is not None
    assert documented == (policy.custom_id_problem(custom_id) is None)

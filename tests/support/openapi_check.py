"""Check every JSON answer of the API against the OpenAPI document (used by the test client)."""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import jsonschema
from flask.testing import FlaskClient
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from werkzeug.test import TestResponse

from broker.api.spec import openapi_document


@cache
def _compiled() -> tuple[dict[str, Any], list[tuple[str, re.Pattern[str], dict[str, Any]]]]:
    doc = openapi_document()
    routes = []
    for path, item in doc["paths"].items():
        pattern = re.compile("^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(path)) + "$")
        for method, op in item.items():
            routes.append((method, pattern, op))
    return doc, routes


def check_response(method: str, path: str, response: TestResponse) -> None:
    """Fail when an /api/v1 JSON response does not match its documented schema."""
    if not path.startswith("/api/v1/") or not response.is_json:
        return
    if path in ("/api/v1/openapi.json",):
        return
    doc, routes = _compiled()
    op = next((o for m, p, o in routes if m == method.lower() and p.match(path)), None)
    if op is None:
        schema_ref = "#/components/schemas/ErrorResponse"
        assert response.status_code >= 400, f"{method} {path} is not in the OpenAPI document"
    else:
        documented = op["responses"].get(str(response.status_code))
        if documented is None:
            assert response.status_code >= 400, (
                f"{method} {path} answered {response.status_code}, which is not documented"
            )
            documented = op["responses"]["default"]
        content = documented.get("content")
        if content is None:
            return
        schema_ref = content["application/json"]["schema"]["$ref"]
    registry = Registry().with_resource("urn:openapi", Resource(doc, DRAFT202012))
    validator = jsonschema.Draft202012Validator(
        {"$ref": "urn:openapi" + schema_ref}, registry=registry
    )
    errors = sorted(validator.iter_errors(response.get_json()), key=lambda e: list(e.path))
    assert not errors, f"{method} {path} {response.status_code}: {errors[0].message}"


class SpecCheckingClient(FlaskClient):
    """A test client that validates every API JSON response against the OpenAPI document."""

    def open(self, *args: Any, **kwargs: Any) -> TestResponse:  # type: ignore[override]
        response = super().open(*args, **kwargs)
        request = response.request
        check_response(request.method, request.path, response)
        return response

"""Check every API answer against the OpenAPI document (used by the test client).

Every status an /api/v1 route answers must be documented for it; an error's `code` must be one
of the examples documented for its status; each header documented as required must be there;
and the JSON body must match the documented schema. So the whole suite checks the contract.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

import jsonschema
from flask import Flask
from flask.testing import FlaskClient
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from werkzeug.test import TestResponse

from broker.api.reference import resolve
from broker.api.spec import openapi_document

Routes = list[tuple[str, re.Pattern[str], dict[str, Any]]]
_CACHE: weakref.WeakKeyDictionary[Flask, tuple[dict[str, Any], Routes]] = (
    weakref.WeakKeyDictionary()
)


def compiled(app: Flask) -> tuple[dict[str, Any], Routes]:
    """Return the app's document and its routes as (method, path pattern, operation)."""
    if app not in _CACHE:
        with app.test_request_context():
            doc = openapi_document()
        routes = []
        for path, item in doc["paths"].items():
            pattern = re.compile("^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(path)) + "$")
            for method, op in item.items():
                routes.append((method, pattern, op))
        _CACHE[app] = (doc, routes)
    return _CACHE[app]


def forget(app: Flask) -> None:
    """Drop the app's cached document (after declaring more routes on it)."""
    _CACHE.pop(app, None)


def check_response(app: Flask, method: str, path: str, response: TestResponse) -> None:
    """Fail when an /api/v1 answer is not what the OpenAPI document says of its route."""
    if not path.startswith("/api/v1/") or path == "/api/v1/openapi.json":
        return
    doc, routes = compiled(app)
    op = next((o for m, p, o in routes if m == method.lower() and p.match(path)), None)
    where = f"{method} {path} answered {response.status_code}"
    if op is None or response.status_code == 500:
        # A path that is no operation, or a failure of ours (tests provoke some on purpose):
        # the one error shape, nothing more to check.
        if not response.is_json:
            return  # a page under /api/v1 (the docs), not an operation
        assert response.status_code >= 400, f"{method} {path} is not in the OpenAPI document"
        documented: dict[str, Any] = {
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
            }
        }
    else:
        documented = op["responses"].get(str(response.status_code))
        assert documented is not None, (
            f"{where}, which its OpenAPI entry does not list: declare it on the route"
        )
        for name, header in documented.get("headers", {}).items():
            if resolve(doc, header).get("required"):
                assert name in response.headers, f"{where} without its documented {name} header"
    content = documented.get("content")
    if content is None:
        assert not response.get_data(), f"{where} with a body its OpenAPI entry does not have"
        return
    assert response.is_json, f"{where} with {response.content_type}, not JSON"
    media = content["application/json"]
    body = response.get_json()
    if op is not None and "examples" in media and response.status_code >= 400:
        code = body.get("error", {}).get("code") if isinstance(body, dict) else None
        assert code in media["examples"], (
            f"{where} with code {code!r}, which is not documented for it "
            f"(documented: {', '.join(media['examples'])}): add its ErrorCase to the route"
        )
    registry = Registry().with_resource("urn:openapi", Resource(doc, DRAFT202012))
    validator = jsonschema.Draft202012Validator(
        {"$ref": "urn:openapi" + media["schema"]["$ref"]}, registry=registry
    )
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
    assert not errors, f"{where}: {errors[0].message}"


class SpecCheckingClient(FlaskClient):
    """A test client that checks every API answer against the OpenAPI document."""

    def open(self, *args: Any, **kwargs: Any) -> TestResponse:  # type: ignore[override]
        response = super().open(*args, **kwargs)
        request = response.request
        check_response(self.application, request.method, request.path, response)
        return response

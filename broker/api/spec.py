"""Declare JSON endpoints once: the same pydantic models validate requests and build OpenAPI.

    @endpoint(bp, "POST", "/uploads", body=CreateUpload, responses={201: UploadOut})
    def create_upload(body: CreateUpload) -> tuple[UploadOut, int]: ...

The wrapper parses and validates the JSON body (400 for malformed JSON, 422 naming each bad
field) and the query string, passes them as `body=` / `query=`, requires a logged-in user unless
`auth=False`, and serialises a returned model. `openapi_document()` renders every declared
operation as an OpenAPI 3.1 document.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from flask_login import current_user
from pydantic import BaseModel, Field, ValidationError
from pydantic.json_schema import models_json_schema

from broker.platform.errors import ApiError, from_validation_error


class ErrorDetail(BaseModel):
    """The body of every API error: all three keys, always."""

    code: str
    message: str
    # Required in the schema (never left out), but nullable.
    details: Any = Field(
        description="null when there is nothing more to say; for 422 a list of "
        "{field, message, type}; some errors carry an object (e.g. {reason})."
    )


class ErrorResponse(BaseModel):
    """`{"error": {...}}`: the one error shape of the API."""

    error: ErrorDetail


def errors(*statuses: int) -> dict[int, type[BaseModel] | None]:
    """Document these error statuses, each answered with the one ErrorResponse shape."""
    return dict.fromkeys(statuses, ErrorResponse)


@dataclass
class Operation:
    """One documented API operation."""

    method: str
    path: str  # OpenAPI style, e.g. /uploads/{upload_id}, relative to the blueprint prefix
    summary: str
    operation_id: str
    tags: tuple[str, ...]
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    responses: dict[int, type[BaseModel] | None]
    auth: bool
    admin: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    prefix: str = ""
    scope: str | None = None


OPERATIONS: list[Operation] = []

_CONVERTER = re.compile(r"<(?:[a-z]+:)?([A-Za-z_][A-Za-z0-9_]*)>")


def parse_json(model: type[BaseModel]) -> BaseModel:
    """Validate the request's JSON body against `model` (415 not JSON, 400 unreadable, 422
    invalid; no body at all means an empty object)."""
    # The request class (broker.platform.json_input) answers 415/400/422 for a bad body.
    data = request.get_json() if request.get_data(cache=True) else {}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def parse_query(model: type[BaseModel]) -> BaseModel:
    """Validate the query string against `model` (422 naming each bad parameter)."""
    try:
        return model.model_validate(request.args.to_dict())
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def to_response(result: Any) -> Response | Any:
    """Serialise a model (or `(model, status[, headers])`) returned by a view."""
    if isinstance(result, tuple) and result and isinstance(result[0], BaseModel):
        payload, *rest = result
        response = jsonify(payload.model_dump(mode="json", by_alias=True))
        if rest:
            response.status_code = rest[0]
        if len(rest) > 1:
            response.headers.update(rest[1])
        return response
    if isinstance(result, BaseModel):
        return jsonify(result.model_dump(mode="json", by_alias=True))
    return result


def require_user() -> None:
    """Refuse an anonymous caller with the API's JSON 401."""
    if not current_user.is_authenticated:
        raise ApiError(
            401,
            "unauthorized",
            "Authentication required: send 'Authorization: Bearer <token>' or log in.",
            headers={"WWW-Authenticate": 'Bearer realm="api"'},
        )


def require_admin() -> None:
    """Refuse a caller who is not an administrator with the API's JSON 403."""
    if not current_user.is_admin:
        raise ApiError(403, "forbidden", "This needs an administrator account.")


def require_scope(scope: str | None, admin: bool) -> None:
    """Hold a scoped credential (a service key) to the route's scope: 403 without it.

    `broker.auth` leaves a service key's scopes in `g.credential_scopes` (None for a user's own
    credentials, which carry all of the user's rights). A route without a scope refuses every
    service key; on an admin route the scope stands in for the admin role; elsewhere the key
    must name the user it acts for.
    """
    granted: frozenset[str] | None = g.get("credential_scopes")
    if granted is None:
        return
    if scope is None or scope not in granted:
        needed = f"the scope {scope}" if scope else "a user's own credentials"
        raise ApiError(403, "insufficient_scope", f"This route needs {needed}.")
    if not admin and not current_user.is_authenticated:
        raise ApiError(
            400,
            "on_behalf_of_required",
            "A service key acts for one of your users: name them in the On-Behalf-Of header.",
        )


def endpoint(
    bp: Blueprint,
    method: str,
    rule: str,
    *,
    responses: dict[int, type[BaseModel] | None],
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    auth: bool = True,
    admin: bool = False,
    tags: tuple[str, ...] = (),
    summary: str | None = None,
    scope: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a JSON view on `bp` and document it in the OpenAPI registry.

    `admin=True` refuses non-admins with 403 before the body is even read. `scope` is what a
    service key needs to call the route (see `require_scope`).
    """

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapped(**kwargs: Any) -> Any:
            if g.get("credential_scopes") is not None:
                require_scope(scope, admin)
            else:
                if auth or admin:
                    require_user()
                if admin:
                    require_admin()
            if body is not None:
                kwargs["body"] = parse_json(body)
            if query is not None:
                kwargs["query"] = parse_query(query)
            return to_response(view(**kwargs))

        bp.add_url_rule(rule, view_func=wrapped, methods=[method])
        OPERATIONS.append(
            Operation(
                method=method.lower(),
                path=_CONVERTER.sub(r"{\1}", rule),
                summary=summary or (view.__doc__ or view.__name__).strip().splitlines()[0],
                operation_id=view.__name__,
                tags=tags or (bp.name,),
                body=body,
                query=query,
                responses=responses,
                auth=auth or admin,
                admin=admin,
                prefix=bp.url_prefix or "",
                scope=scope,
            )
        )
        return wrapped

    return decorator


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    required = set(schema.get("required", []))
    return [
        {"name": name, "in": "query", "required": name in required, "schema": prop}
        for name, prop in schema.get("properties", {}).items()
    ]


def openapi_document(title: str = "Upload broker API", version: str = "1") -> dict[str, Any]:
    """Build the OpenAPI 3.1 document of every declared operation."""
    models: set[type[BaseModel]] = {ErrorResponse}
    for op in OPERATIONS:
        models.update(m for m in (op.body, *op.responses.values()) if m is not None)
    ordered = sorted(models, key=lambda m: m.__name__)
    _, defs = models_json_schema(
        [(m, "validation" if _is_request(m) else "serialization") for m in ordered],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = defs.get("$defs", {})
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        item: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "tags": list(op.tags),
            "responses": {},
        }
        if op.admin:
            item["description"] = "Administrators only (403 for everyone else)."
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{([^}]+)}", op.path)
        ]
        if op.query is not None:
            params += _query_parameters(op.query)
        if params:
            item["parameters"] = params
        if op.body is not None:
            item["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _ref(op.body)}},
            }
        for status, model in sorted(op.responses.items()):
            response: dict[str, Any] = {"description": _status_text(status)}
            if model is not None:
                response["content"] = {"application/json": {"schema": _ref(model)}}
            item["responses"][str(status)] = response
        item["responses"]["default"] = {
            "description": "Error",
            "content": {"application/json": {"schema": _ref(ErrorResponse)}},
        }
        if op.auth:
            item["security"] = [{"bearer": []}, {"session": []}]
            if op.scope:
                item["security"].append({"serviceKey": [op.scope]})
        else:
            item["security"] = []
        paths.setdefault(op.prefix + op.path, {})[op.method] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "brk_… API token, or a JWT of the configured OpenID Connect "
                    "issuer",
                },
                "serviceKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "bsk_… service key of the app's backend, with the app's user "
                    "in the On-Behalf-Of header; needs the scope listed",
                },
                "session": {"type": "apiKey", "in": "cookie", "name": "session"},
            },
        },
    }


def _is_request(model: type[BaseModel]) -> bool:
    return any(model in (op.body, op.query) for op in OPERATIONS)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _status_text(status: int) -> str:
    from http import HTTPStatus

    return HTTPStatus(status).phrase

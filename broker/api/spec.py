"""Declare JSON endpoints once: the same pydantic models validate requests and build OpenAPI.

    @endpoint(bp, "POST", "/uploads", body=CreateUpload, responses={201: UploadCreated},
              errors=(TOO_MANY_PENDING, *UPSTREAM), headers={201: (LOCATION,)})
    def create_upload(body: CreateUpload) -> Response: ...

The wrapper parses and validates the JSON body (400 for malformed JSON, 415 for another media
type, 422 naming each bad field) and the query string, passes them as `body=` / `query=`,
requires a logged-in user unless `auth=False`, and serialises a returned model. An unsafe
route (POST, PUT, PATCH, DELETE) runs as one unit of work (`broker.api.unit_of_work`): its view
never commits; the wrapper commits once the view returned, or rolls back and undoes.

`openapi_document()` renders every declared operation as an OpenAPI 3.1 document that says all
a client needs, from the declarations alone:
- a request body is required only when its model has required fields (an absent body means
  every default);
- `errors` are the `ErrorCase`s a route answers, each with its status, code, example and headers
  (a domain `Refusal` is one too: its declaration is the case); the ones a declaration implies
  are added (401 with auth, 403 for admins or a missing CSRF
  token, 400/413/415/422 with a body, 422 with a query);
- headers: `X-Request-ID` on every request and response, success headers per status, and what
  the view's own decorators add (`declare`, e.g. `@idempotent` adds `Idempotency-Key`);
- examples: each model's `examples` (in its `json_schema_extra`), each error case's own body;
- enums known only once an app runs (the declared `variant`s): a field marked with
  `dynamic_enum(name)` lists the values of the source registered with `enum_source`, so the
  document is built per app.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    has_app_context,
    has_request_context,
    jsonify,
    request,
)
from flask_login import current_user
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema

from broker.api import unit_of_work
from broker.platform import bearer, routing
from broker.platform.errors import ApiError, Refusal, from_validation_error
from broker.platform.json_input import text_problem

# --- Headers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """A documented HTTP header: in a request (a parameter) or in a response."""

    name: str
    description: str
    schema: Mapping[str, Any]
    example: Any
    required: bool = True  # a response header: always sent with its status

    def as_response_header(self, required: bool | None = None) -> dict[str, Any]:
        """Render it for a response's `headers`."""
        return {
            "description": self.description,
            "required": self.required if required is None else required,
            "schema": dict(self.schema),
            "example": self.example,
        }

    def as_parameter(self) -> dict[str, Any]:
        """Render it as a request header parameter."""
        return {
            "name": self.name,
            "in": "header",
            "required": self.required,
            "description": self.description,
            "schema": dict(self.schema),
            "example": self.example,
        }


REQUEST_ID = Header(
    "X-Request-ID",
    "Identifies the request in the broker's logs. Send your own (1 to 128 of `A-Z a-z 0-9 . _ : -`)"
    " to correlate with your app's logs; the answer carries it back, or a fresh one.",
    {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[A-Za-z0-9._:-]+$"},
    "7d3f0c1e9b2a4c55",
    required=False,
)
RESPONSE_REQUEST_ID = Header(
    "X-Request-ID",
    "The request's id in the broker's logs (yours, if you sent a plain one): quote it in reports.",
    {"type": "string", "minLength": 1, "maxLength": 128},
    "7d3f0c1e9b2a4c55",
)
RETRY_AFTER = Header(
    "Retry-After",
    "Seconds to wait before sending the request again.",
    {"type": "integer", "minimum": 0},
    30,
)
LOCATION = Header(
    "Location",
    "The URL of the created resource.",
    {"type": "string"},
    "/api/v1/uploads/" + "9f86d081884c7d659a2feaa0c55ad015",
)
WWW_AUTHENTICATE = Header(
    "WWW-Authenticate",
    "How to authenticate: a bearer token.",
    {"type": "string"},
    bearer.REALM,
)
NO_STORE = Header(
    "Cache-Control",
    "The answer holds a secret: never cached.",
    {"type": "string"},
    "no-store",
)


def example(value: Any, *, forbid_extra: bool = False) -> ConfigDict:
    """A model config whose JSON schema carries `value` as its example (for the document);
    `forbid_extra` refuses unknown fields, as every request model does."""
    config = ConfigDict(json_schema_extra={"examples": [value]})
    if forbid_extra:
        config["extra"] = "forbid"
    return config


# --- Errors ------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """The body of every API error: all three keys, always."""

    code: str = Field(description="Stable snake_case code: branch on this, not on the message.")
    message: str = Field(description="For people; may change.")
    # Required in the schema (never left out), but nullable.
    details: Any = Field(
        description="null when there is nothing more to say; for 422 a list of "
        "`{field, message, type}`; some errors carry an object (e.g. `{reason}`)."
    )


class ErrorResponse(BaseModel):
    """`{"error": {...}}`: the one error shape of the API."""

    model_config = example({"error": {"code": "not_found", "message": "No such upload."}})

    error: ErrorDetail


@dataclass(frozen=True)
class ErrorCase:
    """One error a route can answer: its status, code, an example message and details, and the
    headers that come with it (e.g. `Retry-After`)."""

    status: int
    code: str
    message: str
    details: Any = None
    headers: tuple[Header, ...] = ()

    def error(
        self,
        message: str | None = None,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> ApiError:
        """Return this case as an ApiError to raise (the message and details as they are now)."""
        return ApiError(self.status, self.code, message or self.message, details, headers)

    def example(self) -> dict[str, Any]:
        """Return the example body of this error."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}

    @classmethod
    def of(cls, refusal: ErrorCase | Refusal) -> ErrorCase:
        """The case of a declared domain refusal (its example message; a case as it is)."""
        if isinstance(refusal, ErrorCase):
            return refusal
        message = refusal.sample_message()
        details = None
        if refusal.field is not None:
            details = [{"field": refusal.field, "message": message, "type": "value_error"}]
        headers = (RETRY_AFTER,) if refusal.retry_after else ()
        return cls(refusal.status, refusal.code, message, details, headers)


def not_found(what: str) -> ErrorCase:
    """The 404 of a route whose path names one `what` (another user's counts as none)."""
    return ErrorCase(404, "not_found", f"No such {what}.")


def field_error(status: int, code: str, message: str, field: str, kind: str) -> ErrorCase:
    """An error naming one request field in `details`, as every 422 does."""
    return ErrorCase(status, code, message, [{"field": field, "message": message, "type": kind}])


UNAUTHORIZED = ErrorCase(
    401,
    "unauthorized",
    bearer.UNAUTHORIZED_MESSAGE,
    headers=(WWW_AUTHENTICATE,),
)


def _bearer_refusal(refusal: bearer.BearerRefusal) -> ErrorCase:
    """A refused bearer credential (RFC 6750 `invalid_token`): its own code in the body, the
    same words in `WWW-Authenticate`'s `error_description`."""
    header = Header(
        "WWW-Authenticate",
        "Why the bearer credential was refused (RFC 6750).",
        {"type": "string"},
        refusal.challenge,
    )
    return ErrorCase(401, refusal.code, refusal.description, headers=(header,))


BEARER_REFUSALS = tuple(_bearer_refusal(r) for r in bearer.REFUSALS.values())
FORBIDDEN = ErrorCase(403, "forbidden", "This needs an administrator account.")
CSRF_FAILED = ErrorCase(
    403,
    "csrf_failed",
    "The CSRF token is missing or invalid; reload the page and try again.",
)
INVALID_JSON = ErrorCase(400, "invalid_json", "The request body is not valid JSON.")
UNSUPPORTED_MEDIA_TYPE = ErrorCase(
    415, "unsupported_media_type", "Send the body as application/json."
)
BODY_TOO_LARGE = ErrorCase(
    413,
    "request_entity_too_large",
    "The data value transmitted exceeds the capacity limit.",
)
VALIDATION = ErrorCase(
    422,
    "validation_error",
    "The request is not valid.",
    [{"field": "expires_in", "message": "Input should be a valid integer", "type": "int_type"}],
)
RATE_LIMITED = ErrorCase(
    429,
    "too_many_requests",
    "10 per 1 minute",
    headers=(RETRY_AFTER,),
)
INSUFFICIENT_SCOPE = ErrorCase(
    403, "insufficient_scope", "This route needs the scope uploads:write."
)
ON_BEHALF_OF_REQUIRED = ErrorCase(
    400,
    "on_behalf_of_required",
    "A service key acts for one of your users: name them in the On-Behalf-Of header.",
)
# What authenticating the request itself may answer, on any route that needs a user.
AUTHENTICATION_ERRORS = (
    ErrorCase(
        400,
        "invalid_on_behalf_of",
        "On-Behalf-Of names your user by an id of 1-255 printable characters.",
    ),
    ErrorCase(403, "account_deactivated", "This account is deactivated."),
)
# Only where an OpenID Connect issuer is configured (the document is built per app).
IDENTITY_PROVIDER_UNAVAILABLE = ErrorCase(
    503,
    "identity_provider_unavailable",
    "The identity provider's keys cannot be fetched right now; try again shortly.",
    headers=(RETRY_AFTER,),
)
# Any route may meet a database that does not answer (broker.platform.outages).
DATABASE_UNAVAILABLE = ErrorCase(
    503,
    "database_unavailable",
    "The database cannot be reached right now; try again shortly.",
    headers=(RETRY_AFTER,),
)
_SAFE_METHODS = ("get", "head", "options")

# --- Declarations ------------------------------------------------------------------------------

DECLARED = "__api_declared__"


@dataclass(frozen=True)
class Declared:
    """What a decorator adds to a view's contract; `endpoint` documents it."""

    request_headers: tuple[Header, ...] = ()
    success_headers: tuple[Header, ...] = ()
    errors: tuple[ErrorCase, ...] = ()


def declare(
    view: Callable[..., Any],
    *,
    request_headers: Iterable[Header] = (),
    success_headers: Iterable[Header] = (),
    errors: Iterable[ErrorCase | Refusal] = (),
) -> Callable[..., Any]:
    """Record on `view` the headers and errors a decorator adds to it (kept by functools.wraps)."""
    before: Declared = getattr(view, DECLARED, Declared())
    setattr(
        view,
        DECLARED,
        Declared(
            before.request_headers + tuple(request_headers),
            before.success_headers + tuple(success_headers),
            before.errors + tuple(ErrorCase.of(e) for e in errors),
        ),
    )
    return view


ENUM_MARK = "x-broker-enum"
_ENUM_SOURCES: dict[str, Callable[[], list[str]]] = {}


def dynamic_enum(name: str) -> dict[str, Any]:
    """Mark a string field (its `json_schema_extra`) as one of the values of source `name`."""
    return {ENUM_MARK: name}


def enum_source(name: str, values: Callable[[], list[str]]) -> None:
    """Register where the values of `dynamic_enum(name)` come from (read in an app context)."""
    _ENUM_SOURCES[name] = values


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
    errors: tuple[ErrorCase, ...] = ()
    headers: dict[int, tuple[Header, ...]] = field(default_factory=dict)
    path_schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    request_headers: tuple[Header, ...] = ()
    description: str | None = None
    prefix: str = ""
    scope: str | None = None

    def error_cases(self) -> list[ErrorCase]:
        """Every error this operation can answer: declared and implied, each code once."""
        implied: list[ErrorCase] = [DATABASE_UNAVAILABLE]
        if self.body is not None:
            implied += [INVALID_JSON, BODY_TOO_LARGE, UNSUPPORTED_MEDIA_TYPE, VALIDATION]
        if self.query is not None:
            implied.append(VALIDATION)
        if self.auth:
            implied += [UNAUTHORIZED, *BEARER_REFUSALS]
            implied += [INSUFFICIENT_SCOPE, *AUTHENTICATION_ERRORS]
            if has_app_context() and current_app.extensions.get("oidc") is not None:
                implied.append(IDENTITY_PROVIDER_UNAVAILABLE)
            if self.scope and not self.admin:
                implied.append(ON_BEHALF_OF_REQUIRED)
            if self.method not in _SAFE_METHODS:
                implied.append(CSRF_FAILED)
        if self.admin:
            implied.append(FORBIDDEN)
        seen: dict[tuple[int, str], ErrorCase] = {}
        for case in (*implied, *self.errors):
            seen.setdefault((case.status, case.code), case)
        return sorted(seen.values(), key=lambda c: (c.status, c.code))


OPERATIONS: list[Operation] = []
UPLOAD_ID = "9f86d081884c7d659a2feaa0c55ad015"

_CONVERTER = re.compile(r"<(?:([a-z]+):)?([A-Za-z_][A-Za-z0-9_]*)>")
# What a path parameter's URL converter accepts (anything else is a 404); the default: a string.
_CONVERTER_SCHEMAS: dict[str, dict[str, Any]] = {
    "id": {"type": "integer", "minimum": 0, "maximum": routing.MAX_ROW_ID},
}

# The ids that appear in paths: what each is and what one looks like.
PATH_PARAMETERS: dict[str, tuple[str, Any]] = {
    "upload_id": ("The upload's `id` (not its Cloudflare `image_id`).", UPLOAD_ID),
    "public_id": ("A user's public id.", "u_3a7bd3e2360a3d29eea436fc"),
    "endpoint_id": ("A webhook endpoint's `id`.", "we_5d41402abc4b2a76b9719d91"),
    "delivery_id": ("A webhook delivery's `id`.", 42),
    "token_id": ("An API token's `id`.", "tok_7c4a8d09ca3762af61e59520"),
    "key_id": ("A service key's `id`.", "svk_2f1e0d9c8b7a6f5e4d3c2b1a"),
}


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
    # The JSON reader's text rule holds here too: a NUL can match no stored value.
    details = [
        {"field": name, "message": problem, "type": "unicode"}
        for name, value in request.args.items(multi=True)
        if (problem := text_problem(value))
    ]
    if details:
        raise ApiError(422, "validation_error", "The request is not valid.", details)
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
        raise bearer.unauthorized()


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
        raise INSUFFICIENT_SCOPE.error(f"This route needs {needed}.")
    if not admin and not current_user.is_authenticated:
        raise ON_BEHALF_OF_REQUIRED.error()


def require_admin() -> None:
    """Refuse a caller who is not an administrator with the API's JSON 403."""
    if not current_user.is_admin:
        raise ApiError(FORBIDDEN.status, FORBIDDEN.code, FORBIDDEN.message)


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
    errors: Iterable[ErrorCase | Refusal] = (),
    headers: Mapping[int, tuple[Header, ...]] | None = None,
    tags: tuple[str, ...] = (),
    summary: str | None = None,
    description: str | None = None,
    scope: str | None = None,
    guard: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
    reads_only: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a JSON view on `bp` and document it in the OpenAPI registry.

    `responses` are the success answers (status → model, None for no body); `errors` the
    error cases (or domain refusals) beyond those the declaration implies; `headers` the headers
    of a success status. An unsafe `method` makes the view one unit of work.
    `admin=True` refuses non-admins with 403 before the body is even read. `scope` is what a
    service key needs to call the route (see `require_scope`). `guard` (a decorator, e.g. rate
    limits) wraps the whole route, so it runs before the body is read. `reads_only=True` says
    an unsafe method only reads (a POST whose body is a query): like a GET, a first call by an
    app's user creates no account for them.
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
            if unsafe:
                return to_response(unit_of_work.run(lambda: view(**kwargs)))
            return to_response(view(**kwargs))

        unsafe = method.lower() not in _SAFE_METHODS
        registered = guard(wrapped) if guard else wrapped
        bp.add_url_rule(
            rule,
            view_func=routing.only_reads(registered) if reads_only else registered,
            methods=[method],
        )
        declared: Declared = getattr(view, DECLARED, Declared())
        success = dict(headers or {})
        for status in responses:
            success[status] = (*success.get(status, ()), *declared.success_headers)
        OPERATIONS.append(
            Operation(
                method=method.lower(),
                path=_CONVERTER.sub(r"{\2}", rule),
                path_schemas={
                    name: _CONVERTER_SCHEMAS.get(converter, {"type": "string"})
                    for converter, name in _CONVERTER.findall(rule)
                },
                summary=summary or (view.__doc__ or view.__name__).strip().splitlines()[0],
                operation_id=view.__name__,
                tags=tags or (bp.name,),
                body=body,
                query=query,
                responses=responses,
                auth=auth or admin,
                admin=admin,
                errors=(*declared.errors, *(ErrorCase.of(e) for e in errors)),
                headers=success,
                request_headers=declared.request_headers,
                description=description,
                prefix=bp.url_prefix or "",
                scope=scope,
            )
        )
        return wrapped

    return decorator


# --- The document ------------------------------------------------------------------------------

INTRODUCTION = """\
Lets your app's users upload images straight to Cloudflare Images: ask the broker for a
one-time upload URL, send the file there, tell the broker you are done, then show the image
through signed URLs.

**Authentication**: `Authorization: Bearer brk_…` (a token from `POST /api/v1/auth/tokens`).
Browser pages use their session cookie instead, plus an `X-CSRFToken` header on writes.

**Errors** always look like `{"error": {"code": "snake_case", "message": "…", "details": …}}`;
branch on `code`. A 422 names each bad field in `details` as `{field, message, type}`.

**Retrying**: decide by `code`, not by status. `idempotency_in_progress` (409): retry the same
request after a second; `not_ready` (409): finish the upload first (while it is `pending`
the answer's `Retry-After` says when to ask again); `image_id_taken` (409):
choose another id. 429 and 503 carry `Retry-After`: wait that long. `upstream_unavailable`,
`upstream_error` (502) and `upstream_timeout` (504): retry with a growing pause. A 401's code
says whether a new token helps (`token_expired`, `token_revoked`). Retry a create with the
same `Idempotency-Key`, so a lost answer never makes a second upload. Other 4xx answers will
not change by themselves: fix the request first.
"""

TAGS = [
    {"name": "uploads", "description": "Ask for upload URLs and follow your uploads."},
    {"name": "images", "description": "Signed delivery URLs for showing private images."},
    {"name": "auth", "description": "Bearer tokens for mobile apps; who am I."},
    {"name": "admin", "description": "Administrators only: upload limits and webhooks."},
]


def openapi_document(title: str = "Upload broker API", version: str = "1") -> dict[str, Any]:
    """Build the OpenAPI 3.1 document of every declared operation, for the current app."""
    models: set[type[BaseModel]] = {ErrorResponse}
    for op in OPERATIONS:
        models.update(m for m in (op.body, *op.responses.values()) if m is not None)
    ordered = sorted(models, key=lambda m: m.__name__)
    _, defs = models_json_schema(
        [(m, "validation" if _is_request(m) else "serialization") for m in ordered],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = _with_enums(defs.get("$defs", {}))
    for model in ordered:
        if _is_request(model) and model.__name__ in schemas:
            _optional_without_default(schemas[model.__name__])
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        paths.setdefault(op.prefix + op.path, {})[op.method] = _operation(op, schemas)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": INTRODUCTION},
        "tags": TAGS,
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token `brk_…` from `POST /api/v1/auth/tokens`, or a "
                    "JWT of the configured OpenID Connect issuer.",
                },
                "serviceKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`bsk_…` service key of the app's backend, with the app's user "
                    "in the `On-Behalf-Of` header; needs the scope listed.",
                },
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "session",
                    "description": "The browser session of a logged-in user; writes also "
                    "need the page's CSRF token in an `X-CSRFToken` header.",
                },
            },
            "parameters": {"RequestId": REQUEST_ID.as_parameter()},
            "headers": {"RequestId": RESPONSE_REQUEST_ID.as_response_header()},
        },
    }
    if has_request_context():
        document["servers"] = [{"url": request.host_url.rstrip("/"), "description": "This broker"}]
    return document


def _operation(op: Operation, schemas: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": list(op.tags),
    }
    description = [op.description] if op.description else []
    if op.admin:
        description.append("Administrators only (403 for everyone else).")
    if description:
        item["description"] = "\n\n".join(description)
    params: list[dict[str, Any]] = []
    for name in re.findall(r"{([^}]+)}", op.path):
        text, example = PATH_PARAMETERS.get(name, (f"The `{name}`.", "x"))
        params.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "description": text,
                "schema": dict(op.path_schemas.get(name, {"type": "string"})),
                "example": example,
            }
        )
    if op.query is not None:
        params += _query_parameters(op.query)
    params += [h.as_parameter() for h in op.request_headers]
    params.append({"$ref": "#/components/parameters/RequestId"})
    item["parameters"] = params
    if op.body is not None:
        schema = schemas[op.body.__name__]
        item["requestBody"] = {
            "required": bool(schema.get("required")),
            "description": op.body.__doc__.strip().splitlines()[0] if op.body.__doc__ else "",
            "content": {"application/json": _media(op.body, schemas)},
        }
    responses: dict[str, Any] = {}
    for status, model in sorted(op.responses.items()):
        response: dict[str, Any] = {"description": _describe(status, model)}
        response["headers"] = _headers(op.headers.get(status, ()))
        if model is not None:
            response["content"] = {"application/json": _media(model, schemas)}
        responses[str(status)] = response
    for status, cases in _by_status(op.error_cases()).items():
        responses[str(status)] = _error_response(status, cases)
    item["responses"] = dict(sorted(responses.items()))
    item["security"] = [{"bearer": []}, {"session": []}] if op.auth else []
    if op.scope:
        item["security"].append({"serviceKey": [op.scope]})
    return item


def _headers(headers: Iterable[Header], partial: Iterable[Header] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {RESPONSE_REQUEST_ID.name: {"$ref": "#/components/headers/RequestId"}}
    for header in headers:
        out[header.name] = header.as_response_header()
    for header in partial:
        out.setdefault(header.name, header.as_response_header(required=False))
    return out


def _by_status(cases: list[ErrorCase]) -> dict[int, list[ErrorCase]]:
    grouped: dict[int, list[ErrorCase]] = {}
    for case in cases:
        grouped.setdefault(case.status, []).append(case)
    return grouped


def _error_response(status: int, cases: list[ErrorCase]) -> dict[str, Any]:
    always = [h for h in cases[0].headers if all(h in c.headers for c in cases)]
    sometimes = [h for c in cases for h in c.headers if h not in always]
    codes = ", ".join(f"`{c.code}`" for c in cases)
    return {
        "description": f"{HTTPStatus(status).phrase}: {codes}.",
        "headers": _headers(always, sometimes),
        "content": {
            "application/json": {
                "schema": _ref(ErrorResponse),
                "examples": {c.code: {"summary": c.message, "value": c.example()} for c in cases},
            }
        },
    }


def _media(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": _ref(model)}
    examples = schemas.get(model.__name__, {}).get("examples")
    if examples:
        media["example"] = examples[0]
    return media


def _describe(status: int, model: type[BaseModel] | None) -> str:
    if model is not None and model.__doc__:
        return model.__doc__.strip().splitlines()[0]
    return HTTPStatus(status).phrase


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = _with_enums(model.model_json_schema(ref_template="#/components/schemas/{model}"))
    required = set(schema.get("required", []))
    params = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        param: dict[str, Any] = {"name": name, "in": "query", "required": name in required}
        if "description" in prop:
            param["description"] = prop.pop("description")
        examples = prop.pop("examples", None)
        if examples:
            param["example"] = examples[0]
        param["schema"] = prop
        params.append(param)
    return params


def _with_enums(schema: Any) -> Any:
    """Copy `schema`, giving each `dynamic_enum` field its source's values (none without an app)."""
    schema = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            name = node.pop(ENUM_MARK, None)
            if name is not None and has_app_context() and name in _ENUM_SOURCES:
                node["enum"] = list(_ENUM_SOURCES[name]())
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


def _optional_without_default(schema: dict[str, Any]) -> None:
    """Drop `default` from a request body's optional fields, saying it in words instead.

    Generators read a property with a `default` as always present (openapi-typescript at its
    defaults types it required): a client would have to send `"id": null` to create an upload.
    Not in `required` is what makes a field optional; the broker fills the default itself.
    """
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        if name in required or "default" not in prop:
            continue
        default = prop.pop("default")
        if default is not None:
            said = json.dumps(default)
            prop["description"] = f"{prop.get('description', '')} Default: `{said}`.".strip()


def _is_request(model: type[BaseModel]) -> bool:
    return any(model in (op.body, op.query) for op in OPERATIONS)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}

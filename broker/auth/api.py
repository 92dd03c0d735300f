"""API authentication: create, list and revoke bearer tokens; who am I."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Self, TypeVar

from flask_login import current_user
from pydantic import BaseModel, Field

from broker.api import bp
from broker.api.spec import (
    NO_STORE,
    RATE_LIMITED,
    RETRY_AFTER,
    ErrorCase,
    Header,
    endpoint,
    example,
    not_found,
)
from broker.auth import current_api_token, passwords, rate_limits, service_keys, tokens, users
from broker.auth.models import ApiToken, ServiceKey
from broker.platform.config import current_settings
from broker.platform.db import db
from broker.platform.extensions import csrf

TAGS = ("auth",)
INVALID_CREDENTIALS = ErrorCase(401, "invalid_credentials", "Invalid username or password.")
NOT_A_TOKEN_REQUEST = ErrorCase(404, "not_found", "This request was not made with an API token.")
NO_TOKEN = not_found("token")
HASHING_BUSY = ErrorCase(503, passwords.BUSY_CODE, passwords.BUSY_MESSAGE, headers=(RETRY_AFTER,))
DEVICE = Header(
    rate_limits.DEVICE_HEADER,
    "This device's proof of a past correct login as this user. Send it back as the "
    f"`{rate_limits.DEVICE_HEADER}` request header on later token requests for the same username: "
    "they are then counted against this device's own attempt budget, so someone guessing the "
    "user's password cannot lock this device out. Valid one year.",
    {"type": "string"},
    "eyJ1IjoiYW5hIiwiZCI6IjFhMmIzYyJ9.Zk3pQw.3yZ8...",
)
_TOKEN_EXAMPLE = {
    "id": "tok_7c4a8d09ca3762af61e59520",
    "device_name": "Ana's iPhone",
    "prefix": "brk_q1Zx",
    "created_at": "2026-05-04T09:00:00Z",
    "expires_at": "2026-08-02T09:00:00Z",
    "last_used_at": None,
    "current": False,
}


class CreateToken(BaseModel):
    """Credentials and a device name; the answer carries the token once."""

    model_config = example(
        {"username": "ana", "password": "correct horse battery", "device_name": "Ana's iPhone"},
        forbid_extra=True,
    )

    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)
    device_name: str = Field(min_length=1, max_length=100, description="Shown in token lists.")
    expires_in_days: int | None = Field(
        default=None, ge=1, le=365, description="Default: BROKER_API_TOKEN_TTL_DAYS."
    )


class TokenOut(BaseModel):
    """An API token as listed (never the secret)."""

    model_config = example(_TOKEN_EXAMPLE)

    id: str
    device_name: str
    prefix: str = Field(description="The first characters of the token.")
    created_at: datetime
    expires_at: datetime
    last_used_at: datetime | None
    current: bool = Field(description="True for the token that authenticated this request.")


class TokenCreated(TokenOut):
    """A new token: `token` is shown only in this answer."""

    model_config = example(
        {**_TOKEN_EXAMPLE, "token": "brk_q1Zx8m3kVb9Lr2TgW7yN0cPaHs4uEoJd6fQ5iXzK"}
    )

    token: str = Field(description="The bearer token `brk_…`; store it now, it is not shown again.")


class TokenList(BaseModel):
    """The caller's usable tokens, newest first."""

    model_config = example({"tokens": [{**_TOKEN_EXAMPLE, "current": True}]})

    tokens: list[TokenOut]


class Me(BaseModel):
    """The authenticated user."""

    model_config = example(
        {
            "public_id": "u_3a7bd3e2360a3d29eea436fc",
            "username": "ana",
            "namespace": "local",
            "is_admin": False,
        }
    )

    public_id: str | None = Field(
        description="Cloudflare's `creator` of your uploads; null for one of your app's users "
        "who has not written anything yet (a read creates no account)."
    )
    username: str
    namespace: str = Field(
        description="`local` for the broker's own accounts, else who vouches for the user (an "
        "OpenID Connect issuer, or a service key's namespace)."
    )
    is_admin: bool


_Out = TypeVar("_Out", bound=TokenOut)


def _out(row: ApiToken, current_id: int | None, cls: type[_Out], **extra: Any) -> _Out:
    return cls(
        id=row.public_id,
        device_name=row.name,
        prefix=row.prefix,
        created_at=row.created_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        current=row.id == current_id,
        **extra,
    )


def _current_id() -> int | None:
    token = current_api_token()
    return token.id if token is not None else None


@endpoint(
    bp,
    "POST",
    "/auth/tokens",
    body=CreateToken,
    responses={201: TokenCreated},
    errors=(INVALID_CREDENTIALS, RATE_LIMITED, HASHING_BUSY),
    headers={201: (NO_STORE, DEVICE)},
    auth=False,
    tags=TAGS,
    guard=rate_limits.credential_checks,
)
def create_token(body: CreateToken) -> tuple[TokenCreated, int, dict[str, str]]:
    """Exchange a username and password for a bearer token (shown once)."""
    user = users.authenticate(db.session, body.username, body.password)
    if user is None:
        raise INVALID_CREDENTIALS.error()
    days = body.expires_in_days or current_settings().api_token_ttl_days
    issued = tokens.issue(
        db.session, user, body.device_name.strip() or "device", ttl=timedelta(days=days)
    )
    out = _out(issued.token, None, TokenCreated, token=issued.secret)
    device = rate_limits.device_credential(user.username_key)
    return out, 201, {"Cache-Control": "no-store", rate_limits.DEVICE_HEADER: device}


# Credentials in the body, no cookie is used: nothing for a cross-site request to ride on.
csrf.exempt(create_token)


@endpoint(bp, "GET", "/auth/tokens", responses={200: TokenList}, tags=TAGS)
def list_tokens() -> TokenList:
    """List the caller's usable API tokens."""
    current_id = _current_id()
    user = current_user._get_current_object()
    rows = tokens.active_tokens(db.session, user)
    return TokenList(tokens=[_out(t, current_id, TokenOut) for t in rows])


@endpoint(
    bp,
    "DELETE",
    "/auth/tokens/current",
    responses={204: None},
    errors=(NOT_A_TOKEN_REQUEST,),
    tags=TAGS,
)
def revoke_current_token() -> tuple[str, int]:
    """Revoke the token this request was made with (log the device out)."""
    token = current_api_token()
    if token is None:
        raise NOT_A_TOKEN_REQUEST.error()
    tokens.revoke(token)
    return "", 204


@endpoint(
    bp, "DELETE", "/auth/tokens/<token_id>", responses={204: None}, errors=(NO_TOKEN,), tags=TAGS
)
def revoke_token(token_id: str) -> tuple[str, int]:
    """Revoke one of the caller's tokens (another user's token: 404)."""
    token = tokens.find_own(db.session, current_user._get_current_object(), token_id)
    if token is None:
        raise NO_TOKEN.error()
    tokens.revoke(token)
    return "", 204


@endpoint(bp, "GET", "/me", responses={200: Me}, tags=TAGS, scope="uploads:read")
def me() -> Me:
    """Return the authenticated user."""
    user = current_user._get_current_object()
    return Me(
        public_id=user.public_id,
        username=user.username,
        namespace=user.namespace,
        is_admin=user.is_admin,
    )


# --- Service keys (administrators) ----------------------------------------------------------

NO_SERVICE_KEY = not_found("service key")
_SERVICE_KEY_EXAMPLE = {
    "id": "svk_2f1e0d9c8b7a6f5e4d3c2b1a",
    "name": "app backend",
    "prefix": "bsk_3Jd9",
    "scopes": ["uploads:write"],
    "issuer": "service-keys",
    "created_at": "2026-05-04T09:00:00Z",
    "last_used_at": None,
    "revoked_at": None,
}


class CreateServiceKey(BaseModel):
    """A name, the scopes, and optionally the namespace of the external user ids it acts for."""

    model_config = example({"name": "app backend", "scopes": ["uploads:write"]}, forbid_extra=True)

    name: str = Field(min_length=1, max_length=100, description="What the key is for.")
    scopes: list[str] = Field(
        min_length=1,
        max_length=len(service_keys.SCOPES),
        description="Any of: " + "; ".join(f"`{k}`: {v}" for k, v in service_keys.SCOPES.items()),
        # The document names the values (generated clients get an enum); the view still says
        # which ones are unknown when a caller sends others.
        json_schema_extra={"items": {"type": "string", "enum": list(service_keys.SCOPES)}},
    )
    issuer: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="Namespace of the external user ids the key acts for (default "
        f"`{service_keys.DEFAULT_ISSUER}`; your OpenID Connect issuer shares its accounts).",
    )


class ServiceKeyOut(BaseModel):
    """A service key as listed (never the secret)."""

    model_config = example(_SERVICE_KEY_EXAMPLE)

    id: str
    name: str
    prefix: str = Field(description="The first characters of the key.")
    scopes: list[str]
    issuer: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: ServiceKey, **extra: Any) -> Self:
        """Render a ServiceKey row."""
        return cls(
            id=row.public_id,
            name=row.name,
            prefix=row.prefix,
            scopes=sorted(service_keys.scopes_of(row)),
            issuer=row.issuer,
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            revoked_at=row.revoked_at,
            **extra,
        )


class ServiceKeyCreated(ServiceKeyOut):
    """A new service key: `key` is shown only in this answer."""

    model_config = example({**_SERVICE_KEY_EXAMPLE, "key": "bsk_3Jd9qL0xVb7mT2nR8wPz5kYc"})

    key: str = Field(description="The key `bsk_…`; store it now, it is not shown again.")


class ServiceKeyList(BaseModel):
    """Every service key, revoked ones included, newest first."""

    model_config = example({"keys": [_SERVICE_KEY_EXAMPLE]})

    keys: list[ServiceKeyOut]


@endpoint(
    bp,
    "POST",
    "/service-keys",
    body=CreateServiceKey,
    responses={201: ServiceKeyCreated},
    errors=(service_keys.INVALID_SCOPE, service_keys.INVALID_ISSUER),
    headers={201: (NO_STORE,)},
    admin=True,
    tags=("admin",),
)
def create_service_key(body: CreateServiceKey) -> tuple[ServiceKeyCreated, int, dict[str, str]]:
    """Create a service key for the app's backend (admins only; shown once)."""
    issued = service_keys.issue(db.session, body.name.strip(), body.scopes, issuer=body.issuer)
    service_keys.record_issued(db.session, issued.key)
    out = ServiceKeyCreated.of(issued.key, key=issued.secret)
    return out, 201, {"Cache-Control": "no-store"}


@endpoint(
    bp,
    "GET",
    "/service-keys",
    responses={200: ServiceKeyList},
    admin=True,
    tags=("admin",),
)
def list_service_keys() -> ServiceKeyList:
    """List every service key (admins only)."""
    return ServiceKeyList(keys=[ServiceKeyOut.of(k) for k in service_keys.all_keys(db.session)])


@endpoint(
    bp,
    "DELETE",
    "/service-keys/<key_id>",
    responses={204: None},
    errors=(NO_SERVICE_KEY,),
    admin=True,
    tags=("admin",),
)
def revoke_service_key(key_id: str) -> tuple[str, int]:
    """Revoke a service key; its next request is refused (admins only)."""
    key = service_keys.find(db.session, key_id)
    if key is None:
        raise NO_SERVICE_KEY.error()
    service_keys.revoke_recorded(db.session, key)
    return "", 204

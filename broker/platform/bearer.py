"""Why a bearer credential is refused (RFC 6750), declared once for the API's document and the
authentication that answers it.

Each reason has its own error code in the JSON body and the same words in the challenge,
`WWW-Authenticate: Bearer realm="api", error="invalid_token", error_description="…"`. The
holder of the credential learns what to do (get a new token, fix the audience); nothing is said
about anyone else's. Descriptions stay within RFC 6750's characters (printable ASCII, no `"`
or `\\`).
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import g

from broker.platform.errors import ApiError

REALM = 'Bearer realm="api"'


@dataclass(frozen=True)
class BearerRefusal:
    """One reason a bearer credential is refused: its error code and what the holder should do."""

    code: str
    description: str

    @property
    def challenge(self) -> str:
        """The `WWW-Authenticate` value answering this refusal."""
        return f'{REALM}, error="invalid_token", error_description="{self.description}"'


# By the reason the credential's checker gives (`broker.auth.tokens`, `broker.auth.oidc`).
REFUSALS = {
    "invalid": BearerRefusal(
        "token_invalid", "The bearer token is not valid: no such token, or a bad signature."
    ),
    "expired": BearerRefusal("token_expired", "The bearer token has expired: get a new one."),
    "revoked": BearerRefusal(
        "token_revoked", "The bearer token was revoked or its account deactivated."
    ),
    "wrong_audience": BearerRefusal(
        "token_wrong_audience", "The bearer token was issued for another audience."
    ),
    "wrong_issuer": BearerRefusal(
        "token_wrong_issuer", "The bearer token comes from an issuer this broker does not trust."
    ),
}

UNAUTHORIZED_MESSAGE = "Authentication required: send 'Authorization: Bearer <token>' or log in."


def refuse(reason: str) -> None:
    """Remember why this request's bearer credential was refused (a key of REFUSALS)."""
    g.bearer_refusal = reason


def unauthorized() -> ApiError:
    """The API's 401 for this request: why its bearer credential was refused, or, without one,
    the plain challenge (RFC 6750 §3.1: no error code when no credential was sent)."""
    refused = REFUSALS.get(g.get("bearer_refusal", ""))
    if refused is None:
        return ApiError(
            401, "unauthorized", UNAUTHORIZED_MESSAGE, headers={"WWW-Authenticate": REALM}
        )
    headers = {"WWW-Authenticate": refused.challenge}
    return ApiError(401, refused.code, refused.description, headers=headers)

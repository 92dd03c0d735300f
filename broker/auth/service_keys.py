"""Service keys: the app's backend calls the API for its own users, within the key's scopes.

A key is `bsk_` + 43 URL-safe characters, created by an administrator, shown once and stored
only as its SHA-256 (like API tokens, `broker.auth.tokens`). It acts for one of the app's users
at a time, named by the `On-Behalf-Of` header: the account of that external id in the key's
`issuer` namespace (created on first use, `broker.auth.external`). Revocation takes effect on
the next request: every request looks the key up again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa

from broker.audit import log as audit
from broker.auth import tokens
from broker.auth.models import ServiceKey
from broker.platform.db import Session, utcnow
from broker.platform.errors import DomainError, Kind, Refusal

PREFIX = "bsk_"
# The request header naming the app's user a key acts for.
ON_BEHALF_OF = "On-Behalf-Of"
# What each scope allows; a route without a scope refuses every service key.
SCOPES: dict[str, str] = {
    "uploads:write": "create uploads, complete and delete them",
    "uploads:read": "list and show uploads, and who the user is (`/me`)",
    "images:urls": "mint signed delivery URLs",
    "webhooks:manage": "register and manage webhook endpoints and deliveries (no user needed)",
    "users:erase": "erase the app's users, by their id (no user needed)",
}
# The namespace of external ids when the key names none: every key of this broker shares it,
# so a new key that replaces an old one acts for the same accounts.
DEFAULT_ISSUER = "service-keys"
# What the audit log keeps of a key (never its hash).
AUDITED = ("name", "scopes", "issuer", "revoked_at")


INVALID_SCOPE = Refusal(
    Kind.INVALID,
    "invalid_scope",
    "{problem}",
    {"problem": "Unknown scope(s) x."},
    field="scopes",
)
INVALID_ISSUER = Refusal(
    Kind.INVALID, "invalid_issuer", "The issuer is 1-255 characters.", field="issuer"
)


class ServiceKeyError(DomainError):
    """A service key cannot be created as asked."""


@dataclass(frozen=True)
class IssuedKey:
    """A freshly created key: the secret (shown once) and its stored row."""

    secret: str = field(repr=False)  # a repr may end up in a log line
    key: ServiceKey


def issue(session: Session, name: str, scopes: list[str], *, issuer: str | None) -> IssuedKey:
    """Create a service key (added to the session; the caller commits)."""
    unknown = sorted(set(scopes) - SCOPES.keys())
    if unknown or not scopes:
        raise ServiceKeyError(
            INVALID_SCOPE,
            problem=f"Unknown scope(s) {', '.join(unknown)}; choose from {', '.join(SCOPES)}."
            if unknown
            else f"Give the key at least one scope: {', '.join(SCOPES)}.",
        )
    issuer = (issuer or DEFAULT_ISSUER).strip()
    if not issuer or len(issuer) > 255:
        raise ServiceKeyError(INVALID_ISSUER)
    secret = tokens.new_secret(PREFIX)
    key = ServiceKey(
        name=name,
        token_hash=tokens.digest(secret),
        prefix=secret[: len(PREFIX) + 6],
        scopes=" ".join(sorted(set(scopes))),
        issuer=issuer,
    )
    session.add(key)
    session.flush()
    return IssuedKey(secret, key)


def scopes_of(key: ServiceKey) -> frozenset[str]:
    """Return the scopes `key` grants."""
    return frozenset(key.scopes.split())


def authenticate(session: Session, secret: str, now: datetime | None = None) -> ServiceKey | None:
    """Return the unrevoked key whose secret this is, else None; stamps its last use (at most
    once a minute; the caller commits)."""
    now = now or utcnow()
    key = tokens.find_by_secret(session, ServiceKey, secret, PREFIX)
    if key is None or key.revoked_at is not None:
        return None
    tokens.stamp_used(key, now)
    return key


def all_keys(session: Session) -> list[ServiceKey]:
    """Return every service key, revoked ones included, newest first."""
    return list(
        session.scalars(
            sa.select(ServiceKey).order_by(ServiceKey.created_at.desc(), ServiceKey.id.desc())
        )
    )


def find(session: Session, public_id: str) -> ServiceKey | None:
    """Return the service key with this public id (svk_…), or None."""
    return session.scalar(sa.select(ServiceKey).where(ServiceKey.public_id == public_id))


def revoke(key: ServiceKey, now: datetime | None = None) -> None:
    """Revoke a key; it stops working on the next request (the caller commits)."""
    if key.revoked_at is None:
        key.revoked_at = now or utcnow()


def record_issued(session: Session, key: ServiceKey) -> None:
    """Write the audit entry of a key just issued (its id, name, scopes: never the secret)."""
    session.flush()
    audit.record(session, "service_key.created", key.public_id, after=audit.snapshot(key, AUDITED))


def revoke_recorded(session: Session, key: ServiceKey) -> None:
    """Revoke a key and write its audit entry, in the caller's transaction."""
    before = audit.snapshot(key, ("revoked_at",))
    revoke(key)
    audit.changed(session, "service_key.revoked", key.public_id, before, key)

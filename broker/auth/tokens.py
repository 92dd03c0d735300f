"""API bearer tokens: issue (shown once), look up by SHA-256, expire, revoke.

A token is `brk_` + 43 URL-safe characters (256 random bits). Only its SHA-256 is stored, so a
copy of the database cannot be replayed; lookups go by that hash (an index hit that reveals
nothing about the secret), and the match is confirmed with a constant-time comparison.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

import sqlalchemy as sa

from broker.auth.models import ApiToken, ServiceKey, User
from broker.platform.db import Session, utcnow

PREFIX = "brk_"
DEFAULT_TTL = timedelta(days=90)
# last_used_at is written at most this often, so each API call does not cost a write.
LAST_USED_RESOLUTION = timedelta(seconds=60)
# Longer than any secret we issue: refused before it is even hashed.
MAX_SECRET_LENGTH = 200

# What is looked up by its secret's hash: API tokens and service keys.
_Hashed = TypeVar("_Hashed", ApiToken, ServiceKey)


@dataclass(frozen=True)
class IssuedToken:
    """A freshly issued token: the secret (shown once) and its stored row."""

    secret: str = field(repr=False)  # a repr may end up in a log line
    token: ApiToken


def digest(secret: str) -> str:
    """Return the hex SHA-256 stored for `secret`."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret(prefix: str) -> str:
    """Return a fresh secret: `prefix` and 256 random bits, URL-safe."""
    return prefix + secrets.token_urlsafe(32)


def find_by_secret(
    session: Session, model: type[_Hashed], secret: str, prefix: str
) -> _Hashed | None:
    """Return the row of `model` stored for `secret`, else None.

    Looked up by the hash (an index hit that reveals nothing about the secret) and confirmed
    with a constant-time comparison.
    """
    if not secret.startswith(prefix) or len(secret) > MAX_SECRET_LENGTH:
        return None
    hashed = digest(secret)
    row = session.scalar(sa.select(model).where(model.token_hash == hashed))
    if row is None or not hmac.compare_digest(row.token_hash, hashed):
        return None
    return row


def stamp_used(row: ApiToken | ServiceKey, now: datetime) -> None:
    """Record that `row` was used now, at most once per LAST_USED_RESOLUTION."""
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        row.last_used_at = now


def issue(
    session: Session,
    user: User,
    name: str,
    *,
    ttl: timedelta = DEFAULT_TTL,
    now: datetime | None = None,
) -> IssuedToken:
    """Create a token for `user` (added to the session; the caller commits)."""
    now = now or utcnow()
    secret = new_secret(PREFIX)
    token = ApiToken(
        user_id=user.id,
        name=name,
        token_hash=digest(secret),
        prefix=secret[: len(PREFIX) + 6],
        created_at=now,
        expires_at=now + ttl,
    )
    session.add(token)
    session.flush()
    return IssuedToken(secret, token)


def is_usable(token: ApiToken, now: datetime | None = None) -> bool:
    """Tell whether `token` is neither revoked nor expired."""
    now = now or utcnow()
    return token.revoked_at is None and token.expires_at > now


def authenticate(session: Session, secret: str, now: datetime | None = None) -> ApiToken | None:
    """Return the usable token whose secret this is, else None; stamps when it was last used
    (at most once a minute, so most requests write nothing; the caller commits)."""
    now = now or utcnow()
    token = find_by_secret(session, ApiToken, secret, PREFIX)
    if token is None or not is_usable(token, now) or not token.user.is_active:
        return None
    stamp_used(token, now)
    return token


def refusal_reason(session: Session, secret: str, now: datetime | None = None) -> str:
    """Say why `authenticate` refused `secret`: `expired`, `revoked` (also: its account was
    deactivated) or `invalid` (no such token). Told only to whoever holds the secret."""
    token = find_by_secret(session, ApiToken, secret, PREFIX)
    if token is None:
        return "invalid"
    if token.revoked_at is not None or not token.user.is_active:
        return "revoked"
    return "expired" if not is_usable(token, now) else "invalid"


def active_tokens(session: Session, user: User, now: datetime | None = None) -> list[ApiToken]:
    """Return `user`'s tokens that are neither revoked nor expired, newest first."""
    now = now or utcnow()
    return list(
        session.scalars(
            sa.select(ApiToken)
            .where(
                ApiToken.user_id == user.id,
                ApiToken.revoked_at.is_(None),
                ApiToken.expires_at > now,
            )
            .order_by(ApiToken.created_at.desc(), ApiToken.id.desc())
        )
    )


def all_tokens(session: Session, user: User) -> list[ApiToken]:
    """Return every token of `user`, revoked and expired ones too, newest first."""
    return list(
        session.scalars(
            sa.select(ApiToken)
            .where(ApiToken.user_id == user.id)
            .order_by(ApiToken.created_at.desc(), ApiToken.id.desc())
        )
    )


def token_state(token: ApiToken, now: datetime | None = None) -> str:
    """Say whether `token` is `active`, `revoked` or `expired`."""
    if token.revoked_at is not None:
        return "revoked"
    return "active" if is_usable(token, now) else "expired"


def find_own(session: Session, user: User, public_id: str) -> ApiToken | None:
    """Return `user`'s unrevoked token with this public id (another user's token: None)."""
    return session.scalar(
        sa.select(ApiToken).where(
            ApiToken.public_id == public_id,
            ApiToken.user_id == user.id,
            ApiToken.revoked_at.is_(None),
        )
    )


def revoke(token: ApiToken, now: datetime | None = None) -> None:
    """Revoke one token (the caller commits)."""
    if token.revoked_at is None:
        token.revoked_at = now or utcnow()


def revoke_all(session: Session, user: User, now: datetime | None = None) -> int:
    """Revoke every token of `user` (the caller commits); return how many were revoked."""
    result = session.execute(
        sa.update(ApiToken)
        .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=now or utcnow())
    )
    return cast(sa.CursorResult[Any], result).rowcount or 0

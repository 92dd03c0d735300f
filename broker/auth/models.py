"""Accounts and bearer tokens, as typed SQLAlchemy models.

Every change here needs an Alembic migration (`flask --app broker db migrate -m "…"`);
tests fail when the migrations and the models drift apart.
"""

from __future__ import annotations

import secrets
from datetime import datetime

import sqlalchemy as sa
from flask_login import UserMixin
from sqlalchemy.orm import Mapped, mapped_column, relationship

from broker.platform.db import Model, UTCDateTime, utcnow


def _public_id() -> str:
    """A stable, non-guessable user id that is safe to hand to Cloudflare as `creator`."""
    return "u_" + secrets.token_hex(12)


def _session_token() -> str:
    """A fresh value for the id flask-login keeps in the session; rotating it ends sessions."""
    return secrets.token_urlsafe(24)


# The namespace of the broker's own accounts (an external account's is its issuer).
LOCAL_NAMESPACE = "local"


class User(UserMixin, Model):
    """An end user (or admin) of the broker."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(sa.String(32), unique=True, default=_public_id)
    username: Mapped[str] = mapped_column(sa.String(64))
    # casefolded username: the unique key, so "Alice" and "alice" cannot both exist.
    username_key: Mapped[str] = mapped_column(sa.String(64), unique=True)
    email: Mapped[str | None] = mapped_column(sa.String(254))
    password_hash: Mapped[str] = mapped_column(sa.String(255))
    is_admin: Mapped[bool] = mapped_column(default=False)
    active: Mapped[bool] = mapped_column(default=True)
    session_token: Mapped[str] = mapped_column(sa.String(64), unique=True, default=_session_token)
    max_pending_uploads: Mapped[int | None] = mapped_column()
    max_uploads_per_day: Mapped[int | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # An account of the app's own user (broker.auth.external): who vouches for it (an OpenID
    # Connect issuer or a service key's namespace) and its id there. Null for local accounts.
    external_issuer: Mapped[str | None] = mapped_column(sa.String(255))
    external_subject: Mapped[str | None] = mapped_column(sa.String(255))

    __table_args__ = (sa.UniqueConstraint("external_issuer", "external_subject"),)

    @property
    def is_active(self) -> bool:
        """Tell flask-login whether this user may be logged in."""
        return self.active

    @property
    def namespace(self) -> str:
        """Where the account's name lives: `local`, or who vouches for an external account."""
        return self.external_issuer or LOCAL_NAMESPACE

    def get_id(self) -> str:
        """Return the rotating session token, not the primary key (so sessions can be ended)."""
        return self.session_token

    # Deleted with the user, and by end_sessions (delete-orphan).
    remember_tokens: Mapped[list[RememberToken]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, lazy="select"
    )

    def end_sessions(self) -> None:
        """Invalidate every session and remember cookie of this user."""
        self.session_token = _session_token()
        self.remember_tokens.clear()


def _token_public_id() -> str:
    """A non-guessable id to name an API token in URLs (never the secret itself)."""
    return "tok_" + secrets.token_hex(12)


class ApiToken(Model):
    """A bearer token of a user's device; only the SHA-256 of the secret is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(sa.String(32), unique=True, default=_token_public_id)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    # hex SHA-256 of the whole token: a stolen database cannot be replayed as tokens.
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    # the first characters of the token, shown in lists so a user can tell tokens apart.
    prefix: Mapped[str] = mapped_column(sa.String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship(lazy="joined")


def _service_key_public_id() -> str:
    """A non-guessable id to name a service key in URLs and lists (never the secret itself)."""
    return "svk_" + secrets.token_hex(12)


class ServiceKey(Model):
    """A key of the app's backend acting for the app's users; only its SHA-256 is stored."""

    __tablename__ = "service_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(
        sa.String(32), unique=True, default=_service_key_public_id
    )
    name: Mapped[str] = mapped_column(sa.String(100))
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    prefix: Mapped[str] = mapped_column(sa.String(16))
    # Space-separated scopes (broker.auth.service_keys.SCOPES).
    scopes: Mapped[str] = mapped_column(sa.String(255))
    # The namespace of the external user ids the key acts for (User.external_issuer).
    issuer: Mapped[str] = mapped_column(sa.String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RememberToken(Model):
    """One login's "remember me": only the SHA-256 of the cookie is stored, with the moment it
    stops counting (at most 30 days after that login), so each login has its own cookie."""

    __tablename__ = "remember_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AuthVersion(Model):
    """One row whose number moves whenever a token or an account stops being usable.

    Each web process keeps the tokens it checked in memory while this number stays where it
    was; a revocation, deactivation or password change moves it in its own transaction, so
    every process drops what it kept on its next request.
    """

    __tablename__ = "auth_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(sa.BigInteger)

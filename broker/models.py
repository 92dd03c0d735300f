"""The broker's tables, as typed SQLAlchemy 2.x models.

Every change here needs an Alembic migration (`flask --app broker db migrate -m "…"`);
tests/test_migrations.py fails when the migrations and these models drift apart.
"""

from __future__ import annotations

import secrets
from datetime import datetime

import sqlalchemy as sa
from flask_login import UserMixin
from sqlalchemy.orm import Mapped, mapped_column, relationship

from broker.db import UTCDateTime, db, utcnow


def _public_id() -> str:
    """A stable, non-guessable user id that is safe to hand to Cloudflare as `creator`."""
    return "u_" + secrets.token_hex(12)


def _session_token() -> str:
    """A fresh value for the id flask-login keeps in the session; rotating it ends sessions."""
    return secrets.token_urlsafe(24)


class User(UserMixin, db.Model):  # type: ignore[name-defined,misc]
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

    @property
    def is_active(self) -> bool:  # type: ignore[override]
        """Tell flask-login whether this user may be logged in."""
        return self.active

    def get_id(self) -> str:
        """Return the rotating session token, not the primary key (so sessions can be ended)."""
        return self.session_token

    def end_sessions(self) -> None:
        """Invalidate every session and remember cookie of this user."""
        self.session_token = _session_token()


def _token_public_id() -> str:
    """A non-guessable id to name an API token in URLs (never the secret itself)."""
    return "tok_" + secrets.token_hex(12)


class ApiToken(db.Model):  # type: ignore[name-defined,misc]
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


class SigningKey(db.Model):  # type: ignore[name-defined,misc]
    """A delivery URL signing key mirrored from Cloudflare (`GET /v1/keys`); the value is secret.

    The key that signs is the newest one not retired; a retired key stays (and keeps verifying
    the URLs it signed) until `delete_after`, when it is deleted upstream and here.
    """

    __tablename__ = "signing_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(32), unique=True)
    value: Mapped[str] = mapped_column(sa.String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delete_after: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return f"<SigningKey {self.name!r} retired={self.retired_at is not None}>"


# -- uploads (broker/uploads.py) and the upstream budget (broker/budget.py) --------------------


def _upload_id() -> str:
    """The broker's own id of an upload: what the API shows, distinct from Cloudflare's id."""
    return secrets.token_hex(16)


class Upload(db.Model):  # type: ignore[name-defined,misc]
    """One direct upload slot and, once the file arrived, the image behind it.

    `status` moves pending → ready | expired | rejected, and any → deleted; change it only
    through broker.uploads (which records the transition times and refuses to go backwards).
    """

    __tablename__ = "uploads"
    __table_args__ = (
        sa.Index("ix_uploads_user_created", "user_id", "created_at", "id"),
        sa.Index("ix_uploads_user_status", "user_id", "status"),
        sa.Index("ix_uploads_status_next_check", "status", "next_check_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=_upload_id)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"))
    # Cloudflare's image id (system UUID or a custom id, which may be up to 1024 chars).
    image_id: Mapped[str] = mapped_column(sa.String(1024), unique=True)
    status: Mapped[str] = mapped_column(sa.String(16), default="pending")
    require_signed_urls: Mapped[bool] = mapped_column(default=True)
    # The metadata as sent to Cloudflare, the broker's own keys included.
    meta: Mapped[dict | None] = mapped_column(sa.JSON)  # type: ignore[type-arg]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    status_changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    filename: Mapped[str | None] = mapped_column(sa.String(255))
    uploaded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    variants: Mapped[list | None] = mapped_column(sa.JSON)  # type: ignore[type-arg]
    reject_reason: Mapped[str | None] = mapped_column(sa.String(255))
    # When the worker should next ask Cloudflare whether the file arrived.
    next_check_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    check_attempts: Mapped[int] = mapped_column(default=0)
    # When Cloudflare last said "still a draft": later than the client's file POST means the
    # file never arrived (rather than "not verified yet").
    last_checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(sa.String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship(lazy="joined")


class UploadReservation(db.Model):  # type: ignore[name-defined,misc]
    """A slot of a user's upload limits held while Cloudflare is asked for a draft.

    Taken under the user's lock before the upstream call and replaced by the Upload row (same
    id) in the transaction that stores it, or removed when the call fails: concurrent creates
    cannot overshoot the limits, and no lock is held while Cloudflare answers. A reservation
    left by a killed process stops counting at `expires_at`.
    """

    __tablename__ = "upload_reservations"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class IdempotencyKey(db.Model):  # type: ignore[name-defined,misc]
    """A client's `Idempotency-Key` and the answer it got, replayed for 24 hours."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (sa.UniqueConstraint("user_id", "key", name="uq_idempotency_keys_user_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(sa.String(255))
    # method + path + SHA-256 of the body: the same key with another request is refused.
    fingerprint: Mapped[str] = mapped_column(sa.String(64))
    # None while the first request is still running.
    response_status: Mapped[int | None] = mapped_column()
    response_body: Mapped[str | None] = mapped_column(sa.Text)
    response_headers: Mapped[dict | None] = mapped_column(sa.JSON)  # type: ignore[type-arg]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class UpstreamBudgetState(db.Model):  # type: ignore[name-defined,misc]
    """One row per budget scope: the lock every process takes, and the 429 pause."""

    __tablename__ = "upstream_budget_state"

    scope: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    # Bumped by every acquire: the write that serialises acquires across processes.
    seq: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    paused_until_ms: Mapped[int] = mapped_column(sa.BigInteger, default=0)


class UpstreamBudgetBucket(db.Model):  # type: ignore[name-defined,misc]
    """Calls made in one slice of the budget window (the window is a sum of slices)."""

    __tablename__ = "upstream_budget_buckets"

    scope: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    start: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    calls: Mapped[int] = mapped_column(default=0)


# -- outgoing webhooks (broker/webhooks.py) ---------------------------------------------------


def _endpoint_id() -> str:
    return "we_" + secrets.token_hex(12)


def _message_id() -> str:
    """The `webhook-id` of an event: stable across retries so receivers can deduplicate."""
    return "msg_" + secrets.token_urlsafe(18)


class WebhookEndpoint(db.Model):  # type: ignore[name-defined,misc]
    """A receiver of outgoing events, registered by an admin, with its signing secret(s)."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(sa.String(32), unique=True, default=_endpoint_id)
    url: Mapped[str] = mapped_column(sa.String(2048))
    description: Mapped[str] = mapped_column(sa.String(255), default="")
    # Space-separated event types this endpoint subscribes to.
    events: Mapped[str] = mapped_column(sa.String(255))
    # whsec_… secrets; HMAC needs the raw value, so they cannot be stored hashed.
    secret: Mapped[str] = mapped_column(sa.String(128))
    previous_secret: Mapped[str | None] = mapped_column(sa.String(128))
    previous_secret_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    active: Mapped[bool] = mapped_column(default=True)
    disabled_reason: Mapped[str | None] = mapped_column(sa.String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookEvent(db.Model):  # type: ignore[name-defined,misc]
    """An outgoing event (outbox row), written in the transaction of the change it reports."""

    __tablename__ = "webhook_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    msg_id: Mapped[str] = mapped_column(sa.String(40), unique=True, default=_message_id)
    type: Mapped[str] = mapped_column(sa.String(40))
    # The exact JSON bytes that are signed and sent, so every retry sends the same body.
    payload: Mapped[str] = mapped_column(sa.Text)
    subject: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookDelivery(db.Model):  # type: ignore[name-defined,misc]
    """One event on its way to one endpoint: status, retry schedule and the worker's lease."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        sa.UniqueConstraint("event_id", "endpoint_id", name="uq_webhook_deliveries_event_endpoint"),
        sa.Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[int] = mapped_column(
        sa.ForeignKey("webhook_events.id", ondelete="CASCADE"), index=True
    )
    endpoint_id: Mapped[int] = mapped_column(
        sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[str] = mapped_column(sa.String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(sa.String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(sa.String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookAttempt(db.Model):  # type: ignore[name-defined,misc]
    """The log line of one delivery attempt: when, how long, what answered."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[int] = mapped_column(
        sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column()
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    duration_ms: Mapped[int] = mapped_column(default=0)
    status_code: Mapped[int | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(sa.String(500))

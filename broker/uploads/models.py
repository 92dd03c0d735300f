"""Uploads, quota reservations and the shared verification turn, as typed SQLAlchemy models.

Every change here needs an Alembic migration (`flask --app broker db migrate -m "…"`);
tests fail when the migrations and the models drift apart.
"""

from __future__ import annotations

import enum
import secrets
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from broker.auth.models import User
from broker.platform.columns import StrEnumText
from broker.platform.db import Model, UTCDateTime, partial_index, utcnow


def _upload_id() -> str:
    """The broker's own id of an upload: what the API shows, distinct from Cloudflare's id."""
    return secrets.token_hex(16)


class UploadStatus(enum.StrEnum):
    """Where an upload stands: pending → ready | expired | rejected, and any → deleted."""

    PENDING = "pending"
    READY = "ready"
    EXPIRED = "expired"
    REJECTED = "rejected"
    DELETED = "deleted"


# Every status, in the order operators' views list them (zero counts included).
# Plain strings: click's Choice would offer an enum's member *names* (PENDING).
UPLOAD_STATUSES: tuple[str, ...] = tuple(status.value for status in UploadStatus)


class Upload(Model):
    """One direct upload slot and, once the file arrived, the image behind it.

    `status` moves pending → ready | expired | rejected, and any → deleted; change it only
    through broker.uploads (which records the transition times and refuses to go backwards).
    """

    __tablename__ = "uploads"
    __table_args__ = (
        # The last column of these two is what a create's quota counts filter on besides the
        # key (broker.uploads.quotas): they count from the index alone, not the table.
        sa.Index("ix_uploads_user_created", "user_id", "created_at", "id", "profile"),
        sa.Index("ix_uploads_user_status", "user_id", "status"),
        sa.Index("ix_uploads_status_next_check", "status", "next_check_at"),
        sa.Index("ix_uploads_user_profile_status", "user_id", "profile", "status", "expires_at"),
        # A custom id is Cloudflare's to give out again once its image is gone: only live
        # uploads (a draft waiting, or an image kept) hold their image id.
        partial_index(
            "uq_uploads_live_image_id",
            "image_id",
            unique=True,
            where="status IN ('pending', 'ready')",
        ),
    )

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=_upload_id)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"))
    # Cloudflare's image id (system UUID or a custom id, which may be up to 1024 chars).
    image_id: Mapped[str] = mapped_column(sa.String(1024))
    # The upload profile whose rules it was made under (broker.uploads.profiles).
    profile: Mapped[str] = mapped_column(sa.String(32), default="default", server_default="default")
    status: Mapped[UploadStatus] = mapped_column(
        StrEnumText(UploadStatus, 16), default=UploadStatus.PENDING
    )
    require_signed_urls: Mapped[bool] = mapped_column(default=True)
    # The metadata as sent to Cloudflare, the broker's own keys included.
    meta: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    status_changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    filename: Mapped[str | None] = mapped_column(sa.String(255))
    uploaded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    variants: Mapped[list[str] | None] = mapped_column(sa.JSON)
    reject_reason: Mapped[str | None] = mapped_column(sa.String(255))
    # When the worker should next ask Cloudflare whether the file arrived.
    next_check_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    check_attempts: Mapped[int] = mapped_column(default=0)
    # check_attempts when the client first called `/complete` (None: not yet): its Retry-After
    # grows with the checks after it, not with those made before the file was sent.
    checks_before_complete: Mapped[int | None] = mapped_column()
    # When Cloudflare last said "still a draft": later than the client's file POST means the
    # file never arrived (rather than "not verified yet").
    last_checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Why Cloudflare refused the last file sent to the upload URL (`{code, message}`, from its
    # notification; a hint shown to the client, never a state change: the URL stays usable).
    upstream_refusal: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    # An expired draft whose deletion upstream was postponed (budget spent, Cloudflare down):
    # when the worker tries again. None once it is gone.
    draft_delete_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    # Which worker holds the lease (the column keeps its first name, lease_owner).
    lease_holder: Mapped[str | None] = mapped_column("lease_owner", sa.String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Replace mode: the newer upload of the same user and profile that replaces this one, and
    # when the worker deletes this one's image upstream (after the profile's grace).
    replaced_by: Mapped[str | None] = mapped_column(sa.String(32))
    replace_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)

    user: Mapped[User] = relationship(lazy="joined")


class UploadReservation(Model):
    """A slot of a user's upload limits held while Cloudflare is asked for a draft.

    Taken under the user's lock before the upstream call and replaced by the Upload row (same
    id) in the transaction that stores it, or removed when the call fails: concurrent creates
    cannot overshoot the limits, and no lock is held while Cloudflare answers. A reservation
    left by a killed process stops counting at `expires_at`. On SQLite the Upload row's INSERT
    deletes it (the trigger `uploads_take_reservation`, migration b3f1d8e2c6a4); on PostgreSQL
    that INSERT carries the DELETE (`broker.uploads.create`).
    """

    __tablename__ = "upload_reservations"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    profile: Mapped[str] = mapped_column(sa.String(32), default="default", server_default="default")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class UploadUsage(Model):
    """A user's uploads in one profile by status, kept by triggers on `uploads` (migration
    d5e1a7c3b9f2), so a create's quota check reads one row instead of walking the user's
    history: `pending` drafts (live or not: the check subtracts those past their expiry) and
    `ready` images. On PostgreSQL it lags by the user's `UploadUsageChange` rows, which a
    create folds in (broker.uploads.quotas). No foreign key: a user's deletion deletes its
    uploads, whose triggers bring these counts to zero."""

    __tablename__ = "upload_usage"

    user_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    profile: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    pending: Mapped[int] = mapped_column(default=0)
    ready: Mapped[int] = mapped_column(default=0)


class UploadUsageHour(Model):
    """How many uploads a user created in one profile in one hour (`hour`: whole hours since
    the epoch), kept like `UploadUsage`: the daily quota sums the hours inside the last 24 and
    counts the one it starts in exactly. Hours older than a day are pruned (broker.retention)."""

    __tablename__ = "upload_usage_hours"

    user_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    profile: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    hour: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    created: Mapped[int] = mapped_column(default=0)


class UploadUsageChange(Model):
    """One change to `UploadUsage` and `UploadUsageHour` not folded in yet (PostgreSQL).

    There the triggers on `uploads` append these instead of updating the counts: an update
    would hold the counts' row lock until the write commits, and every write of the user would
    wait for it. The user's next create folds them in (broker.uploads.quotas), or the worker
    for users who stopped creating; readers add the ones left. Unused on SQLite, whose one
    writer at a time updates the counts directly."""

    __tablename__ = "upload_usage_changes"
    __table_args__ = (sa.Index("ix_upload_usage_changes_user_profile", "user_id", "profile"),)

    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column()
    profile: Mapped[str] = mapped_column(sa.String(32))
    hour: Mapped[int] = mapped_column(sa.BigInteger)
    pending: Mapped[int] = mapped_column(default=0)
    ready: Mapped[int] = mapped_column(default=0)
    created: Mapped[int] = mapped_column(default=0)


class VerifyTurn(Model):
    """When the next listing for silent clients may be made, shared by every worker.

    One row (`name` = "listing"): a worker lists only after advancing `next_at` with a
    compare-and-set, so N workers make one listing per interval, as one worker would.
    """

    __tablename__ = "verify_turns"

    name: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    next_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Which worker took the turn last (the column keeps its first name, owner).
    holder: Mapped[str | None] = mapped_column("owner", sa.String(64))

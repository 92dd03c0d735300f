"""The upload state machine: create drafts at Cloudflare, then move them forward, never back.

    pending → ready | expired | rejected,   and any → deleted

Views, CLI commands and the worker call these functions and own the commit. Every transition
goes through `_transition`, which records the time; each `mark_*` then writes its outgoing
event in the same transaction (the outbox, `broker.webhooks.outbox`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import json
import logging
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from broker.auth.models import User
from broker.platform import health, leases
from broker.platform.db import Session, UTCDateTime, utcnow
from broker.platform.errors import DomainError, Refusal
from broker.uploads.models import Upload, UploadReservation, UploadStatus, _upload_id
from broker.upstream.cloudflare import CloudflareImages, CloudflareNotFound, Image, Priority
from broker.webhooks import outbox

log = logging.getLogger("broker.uploads")

PENDING, READY, EXPIRED, REJECTED, DELETED = "pending", "ready", "expired", "rejected", "deleted"
STATUSES = (PENDING, READY, EXPIRED, REJECTED, DELETED)
# Allowed moves; staying in the same state is a no-op, anything else is refused.
TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING: frozenset({READY, EXPIRED, REJECTED, DELETED}),
    READY: frozenset({DELETED}),
    EXPIRED: frozenset({DELETED}),
    REJECTED: frozenset({DELETED}),
    DELETED: frozenset(),
}

MIN_EXPIRY = 120
MAX_EXPIRY = 21600
# Cloudflare checks the bounds when the request arrives, not when we computed it: stay a few
# seconds inside them so latency or clock skew cannot turn a valid request into a 400.
EXPIRY_MARGIN = 5
MAX_METADATA_BYTES = 1024
# The broker's own key in every image's metadata: lets a v2 listing or a notification be
# matched to its upload without a lookup by image id.
BROKER_META_KEY = "broker_upload_id"
# When the worker first checks whether a silent client's file arrived; after that it checks
# 10 s, 20 s, then every 30 s later (broker.uploads.completion.check_delay).
FIRST_CHECK_DELAY = timedelta(seconds=5)
DAY = timedelta(hours=24)
# How long a create's reservation holds a slot: no create lives this long (upstream timeout
# times retries), so only a killed process's reservation ever reaches it.
RESERVATION_TTL = timedelta(minutes=2)


class UploadError(DomainError):
    """A new upload, or a listing, that the rules refuse (invalid input or a spent limit)."""


class InvalidTransition(Exception):
    """An upload was asked to move backwards (or out of a final state)."""


@dataclass(frozen=True)
class UploadParams:
    """What a caller may choose about a new upload (validated shapes; rules checked here)."""

    metadata: dict[str, Any] | None = None
    require_signed_urls: bool = True
    expires_in: int = 1800
    custom_id: str | None = None


# ---------------------------------------------------------------------------------------------
# Pure rules


def metadata_size(meta: dict[str, Any]) -> int:
    """Bytes of `meta` as compact UTF-8 JSON, the measure of Cloudflare's 1024-byte limit."""
    return len(json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode())


def build_metadata(user_meta: dict[str, Any] | None, upload_id: str) -> dict[str, Any]:
    """Add the broker's keys to the caller's metadata, refusing reserved keys and overflow."""
    user_meta = dict(user_meta or {})
    if BROKER_META_KEY in user_meta:
        raise UploadError(
            Refusal.INVALID,
            "validation_error",
            f"'{BROKER_META_KEY}' is reserved",
            field="metadata",
        )
    meta = {**user_meta, BROKER_META_KEY: upload_id}
    size = metadata_size(meta)
    if size > MAX_METADATA_BYTES:
        room = MAX_METADATA_BYTES - metadata_size({BROKER_META_KEY: upload_id})
        raise UploadError(
            Refusal.INVALID,
            "validation_error",
            f"metadata is {metadata_size(user_meta)} bytes as JSON; at most {room} bytes "
            "fit beside the broker's own keys",
            field="metadata",
        )
    return meta


def public_metadata(meta: dict[str, Any] | None) -> dict[str, Any]:
    """The caller's metadata without the broker's own keys."""
    return {k: v for k, v in (meta or {}).items() if k != BROKER_META_KEY}


def public_fields(upload: Upload, *, owner: str | None = None) -> dict[str, Any]:
    """The upload as its owner sees it: API answers and webhook events share this one shape.

    `owner` is the owner's public id when the caller has it at hand (a create does): the user
    row is then not loaded again.
    """
    return {
        "id": upload.id,
        "image_id": upload.image_id,
        "owner": owner if owner is not None else upload.user.public_id,
        "status": upload.status,
        "require_signed_urls": upload.require_signed_urls,
        "metadata": public_metadata(upload.meta),
        "created_at": upload.created_at,
        "expires_at": upload.expires_at,
        "status_changed_at": upload.status_changed_at,
        "completed_at": upload.completed_at,
        "filename": upload.filename,
        "uploaded_at": upload.uploaded_at,
        "variants": upload.variants or [],
        "reject_reason": upload.reject_reason,
        "last_checked_at": upload.last_checked_at,
    }


def _emit(session: Session, upload: Upload, event_type: str, now: datetime | None) -> None:
    """Write `event_type` about `upload` to the outbox, in the caller's transaction."""
    fields = public_fields(upload)
    # An event reports a state change; when the broker last polled is no part of it.
    del fields["last_checked_at"]
    data = {"upload": {name: outbox.iso(value) for name, value in fields.items()}}
    outbox.emit(session, event_type, data, subject=upload.id, now=now)


def effective_expiry(now: datetime, expires_in: int) -> datetime:
    """The moment sent to Cloudflare as `expiry`: whole seconds, inside its bounds."""
    if not MIN_EXPIRY <= expires_in <= MAX_EXPIRY:
        raise UploadError(
            Refusal.INVALID,
            "validation_error",
            f"expires_in must be between {MIN_EXPIRY} and {MAX_EXPIRY} seconds",
            field="expires_in",
        )
    seconds = min(max(expires_in, MIN_EXPIRY + EXPIRY_MARGIN), MAX_EXPIRY - EXPIRY_MARGIN)
    # Round up to whole seconds (RFC 3339 without fractions): never shorter than asked.
    start = now.replace(microsecond=0) + timedelta(seconds=1 if now.microsecond else 0)
    return start + timedelta(seconds=seconds)


_UUID = re.compile(
    r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$", re.IGNORECASE
)


# The same rules as one ECMA-262 pattern, for the OpenAPI document (clients can check before
# sending); custom_id_problem stays the check, as it says which rule an id breaks.
CUSTOM_ID_PATTERN = (
    r"^(?![0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{12}$)"
    r"(?!(?:.*/)?\.{0,2}(?:/|$))"
    r"[^/\x00-\x1f?#\\\x7f](?:[^\x00-\x1f?#\\\x7f]*[^/\x00-\x1f?#\\\x7f])?$"
)


def custom_id_problem(custom_id: str) -> str | None:
    """Say what breaks Cloudflare's custom id rules, or None when the id is acceptable."""
    if not custom_id:
        return "id must not be empty"
    if len(custom_id) > 1024:
        return "id must be at most 1024 characters"
    if custom_id.startswith("/") or custom_id.endswith("/"):
        return "id cannot start or end with /"
    if _UUID.match(custom_id):
        return "id cannot be a UUID"
    if any(segment in ("", ".", "..") for segment in custom_id.split("/")):
        return "id cannot contain empty, . or .. path segments"
    # Category Cc: the C0 controls, DEL and the C1 controls (U+0080..U+009F).
    if any(unicodedata.category(c) == "Cc" or c in "?#\\" for c in custom_id):
        return "id contains characters that cannot appear in a URL path"
    return None


def check_custom_id(custom_id: str, require_signed_urls: bool) -> None:
    """Apply Cloudflare's custom id rules before spending an upstream call on them."""
    problem = custom_id_problem(custom_id)
    if problem:
        raise UploadError(Refusal.INVALID, "validation_error", problem, field="id")
    if require_signed_urls:
        raise UploadError(
            Refusal.INVALID,
            "validation_error",
            "a custom id cannot be used with signed URLs; send require_signed_urls: false",
            field="id",
        )


# ---------------------------------------------------------------------------------------------
# Limits


def limits_for(user: User, config: Any) -> tuple[int, int]:
    """Return the user's (pending drafts, uploads per 24 h) limits, overrides first."""
    pending = user.max_pending_uploads
    daily = user.max_uploads_per_day
    return (
        int(config["MAX_PENDING_UPLOADS"] if pending is None else pending),
        int(config["MAX_UPLOADS_PER_DAY"] if daily is None else daily),
    )


@functools.cache
def _usage_query() -> sa.Select[int, int, int]:
    """One statement counting a user's live drafts, last-24-h uploads and live reservations.

    Built once: constructing SQLAlchemy statements costs more than running this one. Upload
    counts stop at `cap_*` so they stay cheap however many rows a user has.
    """
    user_id = sa.bindparam("user_id", type_=sa.Integer)
    now = sa.bindparam("now", type_=UTCDateTime())
    pending = (
        sa.select(Upload.id)
        .where(Upload.user_id == user_id, Upload.status == PENDING, Upload.expires_at > now)
        .limit(sa.bindparam("cap_pending", type_=sa.Integer))
        .subquery()
    )
    recent = (
        sa.select(Upload.id)
        .where(
            Upload.user_id == user_id,
            Upload.created_at > sa.bindparam("since", type_=UTCDateTime()),
        )
        .limit(sa.bindparam("cap_daily", type_=sa.Integer))
        .subquery()
    )
    reserved = sa.select(sa.func.count()).where(
        UploadReservation.user_id == user_id, UploadReservation.expires_at > now
    )
    return sa.select(
        sa.select(sa.func.count()).select_from(pending).scalar_subquery(),
        sa.select(sa.func.count()).select_from(recent).scalar_subquery(),
        reserved.scalar_subquery(),
    )


def _check_limits(
    session: Session,
    user_id: int,
    max_pending: int,
    max_daily: int,
    now: datetime,
    *,
    own_reservation: str,
) -> None:
    """Refuse when the user's uploads plus reservations exceed the limits.

    `own_reservation` is the caller's own (already counted) reservation: its slot is allowed
    as long as the total stays within the limit, and it is never the slot a retry waits for.
    """
    since = now - DAY
    pending, today, reservations = session.execute(
        _usage_query(),
        {
            "user_id": user_id,
            "now": now,
            "since": since,
            "cap_pending": max(max_pending, 0),
            "cap_daily": max(max_daily, 0),
        },
    ).one()
    others = reservations - 1  # the caller's own reservation is among those counted
    if pending + others >= max_pending:
        live_pending = (
            sa.select(Upload.expires_at.label("moment"))
            .where(Upload.user_id == user_id, Upload.status == PENDING, Upload.expires_at > now)
            .union_all(
                _live_reservations(user_id, now, UploadReservation.expires_at, own_reservation)
            )
            .subquery()
        )
        # A slot frees for sure when the oldest live draft's URL (or a reservation) expires.
        first_expiry = session.scalar(sa.select(sa.func.min(live_pending.c.moment)))
        retry = _seconds_until(first_expiry, now)
        raise UploadError(
            Refusal.LIMIT_REACHED,
            "too_many_pending_uploads",
            f"You have {max_pending} upload{'' if max_pending == 1 else 's'} waiting for a "
            "file, your limit; finish or delete one first.",
            retry_after=retry,
        )
    if today + others >= max_daily:
        recent = (
            sa.select(Upload.created_at.label("moment"))
            .where(Upload.user_id == user_id, Upload.created_at > since)
            .union_all(
                _live_reservations(user_id, now, UploadReservation.created_at, own_reservation)
            )
            .subquery()
        )
        oldest = session.scalar(sa.select(sa.func.min(recent.c.moment)))
        retry = _seconds_until(oldest + DAY if oldest else None, now)
        raise UploadError(
            Refusal.LIMIT_REACHED,
            "daily_upload_limit",
            f"You created {max_daily} uploads in the last 24 hours, your limit.",
            retry_after=retry,
        )


def _live_reservations(
    user_id: int, now: datetime, column: Any, own_reservation: str
) -> sa.Select[Any]:
    """Select `column` of the user's other live reservations (a refused request's own short
    reservation frees nothing the caller could wait for)."""
    return sa.select(column.label("moment")).where(
        UploadReservation.user_id == user_id,
        UploadReservation.expires_at > now,
        UploadReservation.id != own_reservation,
    )


def reserve_slot_and_commit(
    session: Session, user: User, config: Any, upload_id: str, now: datetime, *, budget: Any = None
) -> bool:
    """Hold one slot of `user`'s limits for `upload_id` (committed), or raise UploadError 429.

    The check and the reservation are one transaction serialised per user: on PostgreSQL by
    the user's row lock, on SQLite by the database's write lock, which the first DELETE takes
    before anything is counted. It is committed before the caller goes upstream, so no lock
    is held while Cloudflare answers. With `budget` (an UpstreamBudget) the upstream call is
    paid for in the same transaction when possible (one write instead of two per create);
    returns whether it was (BudgetExhausted when it is spent: nothing is reserved then).
    """
    user_id = user.id
    max_pending, max_daily = limits_for(user, config)
    if session.get_bind().dialect.name == "sqlite":
        # A write must start from the latest snapshot: end the read transaction (of the
        # authentication) first. On PostgreSQL every statement reads the latest committed rows
        # (READ COMMITTED), so that transaction simply goes on, without a round trip to end it.
        session.rollback()
    else:
        # FOR NO KEY UPDATE: serialises this user's reservations without blocking the foreign
        # key checks (KEY SHARE) of the user's other creates inserting their rows meanwhile.
        session.execute(
            sa.select(User.id).where(User.id == user_id).with_for_update(key_share=True)
        )
    # Under the lock: a killed process's reservations are dropped here, keeping the table small.
    session.execute(
        sa.delete(UploadReservation).where(
            UploadReservation.user_id == user_id, UploadReservation.expires_at <= now
        )
    )
    session.add(
        UploadReservation(
            id=upload_id, user_id=user_id, created_at=now, expires_at=now + RESERVATION_TTL
        )
    )
    try:
        session.flush()
        _check_limits(session, user_id, max_pending, max_daily, now, own_reservation=upload_id)
        # Last: on PostgreSQL the budget's row lock is shared by every process; hold it briefly.
        acquire_in = getattr(budget, "acquire_in", None)
        prepaid = bool(acquire_in and acquire_in(session.connection(), Priority.INTERACTIVE))
    except BaseException:
        session.rollback()
        raise
    session.commit()
    return prepaid


def release_slot_and_commit(session: Session, upload_id: str) -> None:
    """Give back the slot of a create that failed (commits; best effort, it expires anyway)."""
    try:
        session.rollback()
        session.execute(sa.delete(UploadReservation).where(UploadReservation.id == upload_id))
        session.commit()
    except Exception:  # never mask the create's own error; the reservation expires by itself
        session.rollback()
        log.warning("could not release the reservation of upload %s", upload_id, exc_info=True)


def _seconds_until(moment: datetime | None, now: datetime) -> int:
    if moment is None:
        return 60
    return max(1, int((moment - now).total_seconds() + 0.999))


# ---------------------------------------------------------------------------------------------
# Create


def new_upload_id() -> str:
    """Return a fresh broker upload id."""
    return _upload_id()


@dataclass(frozen=True)
class NewUpload:
    """A create that passed the rules: its id, owner, Cloudflare's `expiry`, full metadata."""

    id: str
    user_id: int
    creator: str
    params: UploadParams
    expiry: datetime
    meta: dict[str, Any]
    now: datetime


def plan_upload(user: User, params: UploadParams, *, now: datetime | None = None) -> NewUpload:
    """Check a create against the rules (custom id, expiry, metadata) before anything is held.

    The owner's ids are read now: once the reservation commits, touching `user` would reload it
    and hold a connection in a transaction while Cloudflare answers.
    """
    now = now or utcnow()
    if params.custom_id is not None:
        check_custom_id(params.custom_id, params.require_signed_urls)
    upload_id = new_upload_id()
    return NewUpload(
        id=upload_id,
        user_id=user.id,
        creator=user.public_id,
        params=params,
        expiry=effective_expiry(now, params.expires_in),
        meta=build_metadata(params.metadata, upload_id),
        now=now,
    )


def create_upload(
    session: Session,
    new: NewUpload,
    client: CloudflareImages,
    *,
    prepaid: bool = False,
) -> tuple[Upload, str]:
    """Ask Cloudflare for the direct upload URL of `new` and add its pending Upload row.

    Call it after `reserve_slot_and_commit(…, new.id, …)`; the row takes over the reservation's
    slot in the caller's transaction. Returns the (uncommitted) upload and its one-time URL.
    When the caller's unit of work fails, the slot goes back with `release_slot_and_commit` and
    the draft with `discard_draft`, so no row ever claims a draft that does not exist.
    """
    params = new.params
    draft = client.direct_upload(
        creator=new.creator,
        expiry=new.expiry,
        metadata=new.meta,
        require_signed_urls=params.require_signed_urls,
        custom_id=params.custom_id,
        priority=Priority.INTERACTIVE,
        prepaid=prepaid,
    )
    upload = Upload(
        id=new.id,
        user_id=new.user_id,
        image_id=draft.id,
        status=PENDING,
        require_signed_urls=params.require_signed_urls,
        meta=new.meta,
        created_at=new.now,
        expires_at=new.expiry,
        status_changed_at=new.now,
        next_check_at=new.now + FIRST_CHECK_DELAY,
        check_attempts=0,
    )
    # Before `add`: the row's INSERT then happens in the caller's flush, after this DELETE.
    session.execute(sa.delete(UploadReservation).where(UploadReservation.id == new.id))
    session.add(upload)
    log.info("upload created id=%s image=%s user=%s", new.id, draft.id, new.creator)
    return upload, draft.upload_url


def discard_draft(client: CloudflareImages, image_id: str) -> None:
    """Best effort: delete a draft whose row could not be stored (it would expire anyway)."""
    try:
        client.delete_image(image_id, priority=Priority.BACKGROUND)
    except Exception:  # the draft expires by itself; never mask the original error
        log.warning("could not discard orphan draft image=%s", image_id)


# ---------------------------------------------------------------------------------------------
# Transitions


def _transition(upload: Upload, new: str, now: datetime | None) -> bool:
    """Move `upload` to `new`; False when it is already there; InvalidTransition if backwards."""
    if upload.status == new:
        return False
    if new not in TRANSITIONS.get(upload.status, frozenset()):
        raise InvalidTransition(f"upload {upload.id}: {upload.status} → {new} is not allowed")
    upload.status = UploadStatus(new)
    upload.status_changed_at = now or utcnow()
    upload.next_check_at = None
    leases.release(upload)
    return True


def mark_ready(
    session: Session, upload: Upload, image: Image, *, now: datetime | None = None
) -> bool:
    """Record that the file arrived: filename, upload time and variants from Cloudflare."""
    if image.draft:
        raise ValueError("the image is still a draft")
    now = now or utcnow()
    changed = _transition(upload, READY, now)
    if changed:
        upload.completed_at = now
        upload.filename = image.filename
        upload.uploaded_at = image.uploaded
        upload.variants = list(image.variants)
        _emit(session, upload, "upload.completed", now)
    return changed


def mark_expired(session: Session, upload: Upload, *, now: datetime | None = None) -> bool:
    """Record that the upload URL expired without a file."""
    changed = _transition(upload, EXPIRED, now)
    if changed:
        _emit(session, upload, "upload.expired", now)
    return changed


def mark_rejected(
    session: Session, upload: Upload, reason: str, *, now: datetime | None = None
) -> bool:
    """Record that Cloudflare refused the file (too large, bad format, …)."""
    changed = _transition(upload, REJECTED, now)
    if changed:
        upload.reject_reason = reason[:255]
        _emit(session, upload, "upload.rejected", now)
    return changed


def mark_deleted(session: Session, upload: Upload, *, now: datetime | None = None) -> bool:
    """Record that the image is gone at Cloudflare."""
    changed = _transition(upload, DELETED, now)
    if changed:
        _emit(session, upload, "upload.deleted", now)
    return changed


def delete_upload(
    session: Session, upload: Upload, client: CloudflareImages, *, now: datetime | None = None
) -> bool:
    """Delete the image at Cloudflare (gone already is fine), then mark the upload deleted."""
    if upload.status == DELETED:
        return False
    with contextlib.suppress(CloudflareNotFound):  # already gone is what we want
        client.delete_image(upload.image_id, priority=Priority.INTERACTIVE)
    return mark_deleted(session, upload, now=now)


# ---------------------------------------------------------------------------------------------
# Queries


def status_counts(session: Session) -> dict[str, int]:
    """Count uploads by status (for operators)."""
    rows = session.execute(sa.select(Upload.status, sa.func.count()).group_by(Upload.status))
    return {status: count for status, count in rows}


def metric_lines(session: Session) -> list[str]:
    """The uploads gauge of `/metrics`: every status, zero included."""
    counts = status_counts(session)
    by_status = {status: counts.get(status, 0) for status in STATUSES}
    return health.gauge("broker_uploads", "Uploads by status.", by_status)


def find_upload(session: Session, user: User, upload_id: str) -> Upload | None:
    """Return the upload if `user` may see it (owner, or an admin); else None (→ 404)."""
    if len(upload_id) > 64:
        return None
    upload = session.get(Upload, upload_id)
    if upload is None or (upload.user_id != user.id and not user.is_admin):
        return None
    return upload


def encode_cursor(upload: Upload) -> str:
    """An opaque cursor pointing just after `upload` in newest-first order."""
    raw = json.dumps([upload.created_at.isoformat(), upload.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Read a cursor made by `encode_cursor`; UploadError 422 when it is not one."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, upload_id = json.loads(raw)
        moment = datetime.fromisoformat(created)
        if moment.tzinfo is None or not isinstance(upload_id, str):
            raise ValueError
        return moment, upload_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise UploadError(
            Refusal.INVALID, "validation_error", "invalid cursor", field="cursor"
        ) from None


def list_uploads(
    session: Session,
    *,
    user_id: int | None,
    status: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
    include_deleted: bool = True,
) -> tuple[list[Upload], str | None]:
    """Return a page of uploads (newest first) and the cursor of the next page, if any."""
    query = sa.select(Upload)
    if user_id is not None:
        query = query.where(Upload.user_id == user_id)
    if status is not None:
        query = query.where(Upload.status == status)
    if not include_deleted:
        query = query.where(Upload.status != "deleted")
    if cursor:
        created, upload_id = decode_cursor(cursor)
        query = query.where(
            sa.or_(
                Upload.created_at < created,
                sa.and_(Upload.created_at == created, Upload.id < upload_id),
            )
        )
    query = query.order_by(Upload.created_at.desc(), Upload.id.desc()).limit(limit + 1)
    rows = list(session.scalars(query))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1]) if more and rows else None

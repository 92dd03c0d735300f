"""Reading uploads: one upload as its owner may see it, pages of uploads, counts by status.

Offers `find_upload` (object-level access: the owner or an admin, anyone else gets None, which
the routes answer 404 so that existence is not revealed), `list_uploads` with an opaque cursor
(`encode_cursor` / `decode_cursor`; newest first, stable under concurrent inserts as it pages
on `(created_at, id)`), `status_counts` and `metric_lines` (the `/metrics` gauge, every status
listed, zero included). Nothing here writes.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

import sqlalchemy as sa

from broker.auth.models import User
from broker.platform import health
from broker.platform.db import Session
from broker.platform.errors import Kind, Refusal
from broker.uploads.lifecycle import DELETED, STATUSES
from broker.uploads.models import Upload
from broker.uploads.policy import UploadError

INVALID_CURSOR = Refusal(Kind.INVALID, "validation_error", "invalid cursor", field="cursor")


def status_counts(session: Session) -> dict[str, int]:
    """Count uploads by status (for operators)."""
    rows = session.execute(sa.select(Upload.status, sa.func.count()).group_by(Upload.status))
    return {status: count for status, count in rows}


def profile_usage(session: Session) -> dict[str, dict[str, int]]:
    """Count uploads by profile and status, and the users of each profile (for operators)."""
    usage: dict[str, dict[str, int]] = {}
    rows = session.execute(
        sa.select(Upload.profile, Upload.status, sa.func.count()).group_by(
            Upload.profile, Upload.status
        )
    )
    for profile, status, count in rows:
        usage.setdefault(profile, {})[status] = count
    users = session.execute(
        sa.select(Upload.profile, sa.func.count(sa.distinct(Upload.user_id))).group_by(
            Upload.profile
        )
    )
    for profile, count in users:
        usage.setdefault(profile, {})["users"] = count
    return usage


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
        raise UploadError(INVALID_CURSOR) from None


def list_uploads(
    session: Session,
    *,
    user_id: int | None,
    status: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
    include_deleted: bool = True,
    profile: str | None = None,
) -> tuple[list[Upload], str | None]:
    """Return a page of uploads (newest first, of one `profile` if given) and the cursor of
    the next page, if any."""
    query = sa.select(Upload)
    if user_id is not None:
        query = query.where(Upload.user_id == user_id)
    if profile is not None:
        query = query.where(Upload.profile == profile)
    if status is not None:
        query = query.where(Upload.status == status)
    if not include_deleted:
        query = query.where(Upload.status != DELETED)
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

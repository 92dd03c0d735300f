"""The upload state machine: an upload moves forward, never back.

    pending → ready | expired | rejected,   and any → deleted

Offers the statuses, `mark_ready` / `mark_expired` / `mark_rejected` / `mark_deleted` /
`mark_replaced`, `mark_erased`, `delete_upload` (at Cloudflare, then the row) and
`public_fields`, the one shape of an upload shared by API answers and webhook events.

Rules it enforces: every transition goes through `_transition`, which refuses a backward move
(`InvalidTransition`), treats staying put as a no-op, records the time and ends any lease on
the row; each `mark_*` (but `mark_erased`, whose owner's erasure has one event for all) writes
its outgoing event in the same transaction (the outbox,
`broker.webhooks.outbox`). Functions here work in the caller's session and never commit.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

from broker.platform import leases
from broker.platform.db import Session, utcnow
from broker.uploads.models import UPLOAD_STATUSES, Upload, UploadStatus
from broker.uploads.policy import public_metadata
from broker.upstream.cloudflare import CloudflareImages, CloudflareNotFound, Image, Priority
from broker.webhooks import outbox

PENDING = UploadStatus.PENDING
READY = UploadStatus.READY
EXPIRED = UploadStatus.EXPIRED
REJECTED = UploadStatus.REJECTED
DELETED = UploadStatus.DELETED
STATUSES = UPLOAD_STATUSES
# Allowed moves; staying in the same state is a no-op, anything else is refused.
TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING: frozenset({READY, EXPIRED, REJECTED, DELETED}),
    READY: frozenset({DELETED}),
    EXPIRED: frozenset({DELETED}),
    REJECTED: frozenset({DELETED}),
    DELETED: frozenset(),
}


class InvalidTransition(Exception):
    """An upload was asked to move backwards (or out of a final state)."""


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
        "profile": upload.profile,
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


def _emit(
    session: Session,
    upload: Upload,
    event_type: str,
    now: datetime | None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write `event_type` about `upload` to the outbox, in the caller's transaction."""
    fields = public_fields(upload)
    # An event reports a state change; when the broker last polled is no part of it.
    del fields["last_checked_at"]
    data = {"upload": {name: outbox.iso(value) for name, value in fields.items()}, **(extra or {})}
    outbox.emit(session, event_type, data, subject=upload.id, now=now)


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
    session: Session,
    upload: Upload,
    reason: str,
    *,
    now: datetime | None = None,
    rule: dict[str, Any] | None = None,
) -> bool:
    """Record that the file was refused (by Cloudflare, or by the profile's rules: `rule` then
    names the rule, the measured value and the limit, carried by the event)."""
    changed = _transition(upload, REJECTED, now)
    if changed:
        upload.reject_reason = reason[:255]
        _emit(session, upload, "upload.rejected", now, {"rule": rule} if rule else None)
    return changed


def mark_replaced(session: Session, upload: Upload, *, now: datetime | None = None) -> bool:
    """Record that a replaced upload's image is gone upstream: `upload.replaced` names the
    upload that replaced it (in place of `upload.deleted`)."""
    changed = _transition(upload, DELETED, now)
    if changed:
        upload.replace_at = None
        _emit(session, upload, "upload.replaced", now, {"replaced_by": upload.replaced_by})
    return changed


def mark_deleted(session: Session, upload: Upload, *, now: datetime | None = None) -> bool:
    """Record that the image is gone at Cloudflare."""
    changed = _transition(upload, DELETED, now)
    if changed:
        upload.replace_at = None
        _emit(session, upload, "upload.deleted", now)
    return changed


def mark_erased(session: Session, upload: Upload, *, now: datetime | None = None) -> bool:
    """Record that the image went with its owner's erasure: no event of its own (the one
    `user.erased` event says it for all of them), and what named the file cleared."""
    changed = _transition(upload, DELETED, now)
    upload.filename = None
    upload.meta = None
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

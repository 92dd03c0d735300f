"""/api/v1/uploads: ask for a direct upload URL, list, show, delete and complete one's uploads.

Another user's upload is 404 on every route (not 403: its existence is not revealed);
admins see every upload.
"""

from __future__ import annotations

import os
import threading
from datetime import datetime
from typing import Any, Literal, cast

from flask import Response, current_app, url_for
from flask_login import current_user
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from broker.api import bp, unit_of_work
from broker.api.idempotency import idempotent
from broker.api.spec import (
    LOCATION,
    RETRY_AFTER,
    UPLOAD_ID,
    ErrorCase,
    endpoint,
    example,
    not_found,
)
from broker.api.upstream_errors import CREATE_UPSTREAM, UPSTREAM
from broker.audit import log as audit
from broker.auth.models import User
from broker.platform.config import current_settings
from broker.platform.db import db
from broker.uploads import completion, create, lifecycle, policy, queries, quotas
from broker.uploads.models import Upload
from broker.upstream.cloudflare import get_client

Status = Literal["pending", "ready", "expired", "rejected", "deleted"]


NO_UPLOAD = not_found("upload")
NO_USER = not_found("user")
ADMINS_ONLY_LISTING = ErrorCase(403, "forbidden", "Only admins may list other users' uploads.")
QUOTA_REFUSALS = (quotas.TOO_MANY_PENDING, quotas.DAILY_QUOTA)


def _custom_id_pattern(schema: dict[str, Any]) -> None:
    """Document the custom id rules on the string branch of the optional `id` (the upload
    policy checks them, saying which rule an id breaks)."""
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "string":
            option["pattern"] = policy.CUSTOM_ID_PATTERN


class CreateUpload(BaseModel):
    """Options for a new upload slot; every field is optional."""

    model_config = example({"metadata": {"album": "summer"}, "expires_in": 600}, forbid_extra=True)

    metadata: dict[str, Any] | None = Field(
        None,
        description="Your key/value data stored with the image (≤ 1024 bytes as JSON, "
        "including the broker's own key).",
    )
    require_signed_urls: StrictBool | None = Field(
        None, description="Serve the image only through signed URLs (default from config)."
    )
    expires_in: int | None = Field(
        None,
        ge=policy.MIN_EXPIRY,
        le=policy.MAX_EXPIRY,
        description="Seconds the upload URL stays valid.",
    )
    id: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="A custom image id: not a UUID, no leading or trailing `/`, no empty, `.` "
        "or `..` segments, none of `? # \\` or control characters; needs "
        "`require_signed_urls: false`.",
        json_schema_extra=_custom_id_pattern,
    )


_UPLOAD_EXAMPLE: dict[str, Any] = {
    "id": UPLOAD_ID,
    "image_id": "2cdc28f0-017a-49c4-9ed7-87056c83901b",
    "owner": "u_3a7bd3e2360a3d29eea436fc",
    "status": "pending",
    "require_signed_urls": True,
    "metadata": {"album": "summer"},
    "created_at": "2026-05-04T09:30:00Z",
    "expires_at": "2026-05-04T09:40:00Z",
    "status_changed_at": "2026-05-04T09:30:00Z",
    "completed_at": None,
    "filename": None,
    "uploaded_at": None,
    "reject_reason": None,
    "last_checked_at": None,
}
_READY_EXAMPLE = {
    **_UPLOAD_EXAMPLE,
    "status": "ready",
    "status_changed_at": "2026-05-04T09:31:12Z",
    "completed_at": "2026-05-04T09:31:12Z",
    "filename": "beach.jpg",
    "uploaded_at": "2026-05-04T09:31:05Z",
    "last_checked_at": "2026-05-04T09:31:12Z",
}


class UploadOut(BaseModel):
    """An upload as the API shows it."""

    model_config = example(_READY_EXAMPLE)

    id: str
    image_id: str
    owner: str = Field(description="The uploader's public user id (Cloudflare's `creator`).")
    status: Status
    require_signed_urls: bool
    metadata: dict[str, Any]
    created_at: datetime
    expires_at: datetime
    status_changed_at: datetime
    completed_at: datetime | None = None
    filename: str | None = None
    uploaded_at: datetime | None = None
    reject_reason: str | None = None
    last_checked_at: datetime | None = Field(
        None,
        description="When Cloudflare last reported the upload still waiting for its file; "
        "`pending` with this later than your file POST means the file did not arrive.",
    )

    @classmethod
    def of(cls, upload: Upload, *, owner: str | None = None) -> UploadOut:
        """Render an Upload row (`owner`: its owner's public id, when known)."""
        fields = lifecycle.public_fields(upload, owner=owner)
        return cls(**{name: fields[name] for name in cls.model_fields})


class UploadCreated(UploadOut):
    """A new upload: POST the file (multipart field `file`) to `upload_url`, once."""

    model_config = example(
        {
            **_UPLOAD_EXAMPLE,
            "upload_url": "https://upload.imagedelivery.net/Vi7wi5KSItxGFsWRG2Us6Q/"
            "2cdc28f0-017a-49c4-9ed7-87056c83901b",
        }
    )

    upload_url: str = Field(description="One-time URL the client posts the file to.")


class UploadPage(BaseModel):
    """A page of uploads, newest first."""

    model_config = example({"items": [_READY_EXAMPLE], "next_cursor": "MjAyNi0wNS0wNFQwOTozMDo"})

    items: list[UploadOut]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")


class ListUploads(BaseModel):
    """Filters and paging of the upload list."""

    model_config = ConfigDict(extra="forbid")

    status: Status | None = Field(None, description="Only uploads in this state.")
    cursor: str | None = Field(
        None, max_length=512, description="The `next_cursor` of the previous page."
    )
    limit: int = Field(50, ge=1, le=200, description="Uploads per page.")
    scope: Literal["mine", "all"] = Field("mine", description="`all` is for admins.")
    user: str | None = Field(None, max_length=32, description="Admins: one user's public id.")


class UserLimits(BaseModel):
    """A user's upload limits; null means the configured default."""

    model_config = example(
        {"max_pending_uploads": 50, "max_uploads_per_day": None}, forbid_extra=True
    )

    max_pending_uploads: int | None = Field(None, ge=0, le=100_000)
    max_uploads_per_day: int | None = Field(None, ge=0, le=1_000_000)


class UserLimitsOut(UserLimits):
    """A user's overrides and the limits that apply."""

    model_config = example(
        {
            "user": "u_3a7bd3e2360a3d29eea436fc",
            "max_pending_uploads": 50,
            "max_uploads_per_day": None,
            "effective_max_pending_uploads": 50,
            "effective_max_uploads_per_day": 500,
        }
    )

    user: str
    effective_max_pending_uploads: int
    effective_max_uploads_per_day: int


def _user() -> User:
    return cast(User, current_user._get_current_object())


def _json_response(payload: BaseModel, status: int, headers: dict[str, str]) -> Response:
    body = current_app.json.dumps(payload.model_dump(mode="json", by_alias=True))
    response = current_app.response_class(body, status=status, mimetype="application/json")
    response.headers.update(headers)
    return response


@endpoint(
    bp,
    "POST",
    "/uploads",
    body=CreateUpload,
    responses={201: UploadCreated},
    errors=(
        policy.RESERVED_METADATA_KEY,
        policy.METADATA_TOO_LARGE,
        policy.EXPIRY_OUT_OF_RANGE,
        policy.CUSTOM_ID_BROKEN,
        policy.CUSTOM_ID_WITH_SIGNED_URLS,
        *QUOTA_REFUSALS,
        *CREATE_UPSTREAM,
    ),
    headers={201: (LOCATION,)},
    tags=("uploads",),
    scope="uploads:write",
    description="Send the file to `upload_url` next (one multipart POST, field `file`, no "
    "token), then `POST /api/v1/uploads/{upload_id}/complete`. Send an `Idempotency-Key` so "
    "that retrying after a lost answer returns the same upload.",
)
@idempotent
def create_upload(body: CreateUpload) -> Response:
    """Create a one-time direct upload URL stamped with the caller as creator."""
    user = _user()
    settings = current_settings()
    params = policy.UploadParams(
        metadata=body.metadata,
        require_signed_urls=(
            settings.require_signed_urls
            if body.require_signed_urls is None
            else body.require_signed_urls
        ),
        expires_in=(settings.upload_default_expiry if body.expires_in is None else body.expires_in),
        custom_id=body.id,
    )
    created = create.create_upload(
        db.session, user, params, get_client(), settings, unit_of_work.current()
    )
    payload = UploadCreated(
        **UploadOut.of(created.upload, owner=created.owner).model_dump(),
        upload_url=created.upload_url,
    )
    headers = {"Location": url_for("api.get_upload", upload_id=created.upload.id)}
    return _json_response(payload, 201, headers)


@endpoint(
    bp,
    "GET",
    "/uploads",
    query=ListUploads,
    responses={200: UploadPage},
    errors=(ADMINS_ONLY_LISTING, queries.INVALID_CURSOR),
    tags=("uploads",),
    scope="uploads:read",
)
def list_uploads(query: ListUploads) -> UploadPage:
    """List your uploads, newest first (admins: `scope=all`, optionally one `user`)."""
    user = _user()
    user_id: int | None = user.id
    if query.scope == "all" or query.user is not None:
        if not user.is_admin:
            raise ADMINS_ONLY_LISTING.error()
        user_id = None
        if query.user is not None:
            listed = db.session.scalar(db.select(User).where(User.public_id == query.user))
            if listed is None:
                return UploadPage(items=[], next_cursor=None)
            user_id = listed.id
    rows, cursor = queries.list_uploads(
        db.session, user_id=user_id, status=query.status, cursor=query.cursor, limit=query.limit
    )
    return UploadPage(items=[UploadOut.of(u) for u in rows], next_cursor=cursor)


def _visible(upload_id: str) -> Upload:
    upload = queries.find_upload(db.session, _user(), upload_id)
    if upload is None:
        raise NO_UPLOAD.error()
    return upload


@endpoint(
    bp,
    "GET",
    "/uploads/<upload_id>",
    responses={200: UploadOut},
    errors=(NO_UPLOAD,),
    tags=("uploads",),
    scope="uploads:read",
)
def get_upload(upload_id: str) -> UploadOut:
    """Show one of your uploads."""
    return UploadOut.of(_visible(upload_id))


@endpoint(
    bp,
    "DELETE",
    "/uploads/<upload_id>",
    responses={200: UploadOut},
    errors=(NO_UPLOAD, *UPSTREAM),
    tags=("uploads",),
    scope="uploads:write",
)
def delete_upload(upload_id: str) -> UploadOut:
    """Delete the image at Cloudflare and mark the upload deleted."""
    upload = _visible(upload_id)
    lifecycle.delete_upload(db.session, upload, get_client())
    return UploadOut.of(upload)


def _quotas_out(user: User) -> UserLimitsOut:
    pending, daily = quotas.quotas_for(user, current_settings())
    return UserLimitsOut(
        user=user.public_id,
        max_pending_uploads=user.max_pending_uploads,
        max_uploads_per_day=user.max_uploads_per_day,
        effective_max_pending_uploads=pending,
        effective_max_uploads_per_day=daily,
    )


def _admin_target(public_id: str) -> User:
    target: User | None = db.session.scalar(db.select(User).where(User.public_id == public_id))
    if target is None:
        raise NO_USER.error()
    return target


@endpoint(
    bp,
    "GET",
    "/users/<public_id>/upload-limits",
    responses={200: UserLimitsOut},
    errors=(NO_USER,),
    admin=True,
    tags=("admin",),
)
def get_upload_limits(public_id: str) -> UserLimitsOut:
    """Show a user's upload limits (admins only)."""
    return _quotas_out(_admin_target(public_id))


@endpoint(
    bp,
    "PUT",
    "/users/<public_id>/upload-limits",
    body=UserLimits,
    responses={200: UserLimitsOut},
    errors=(NO_USER,),
    admin=True,
    tags=("admin",),
)
def set_upload_limits(public_id: str, body: UserLimits) -> UserLimitsOut:
    """Set or clear a user's upload limit overrides (admins only)."""
    target = _admin_target(public_id)
    before = audit.snapshot(target, ("max_pending_uploads", "max_uploads_per_day"))
    target.max_pending_uploads = body.max_pending_uploads
    target.max_uploads_per_day = body.max_uploads_per_day
    audit.changed(db.session, "user.limits_changed", target.public_id, before, target)
    return _quotas_out(target)


# How long a client should wait before asking again (or fetching the upload).
CHECK_AGAIN_AFTER = "1"


@endpoint(
    bp,
    "POST",
    "/uploads/<upload_id>/complete",
    responses={200: UploadOut, 202: UploadOut},
    errors=(NO_UPLOAD,),
    headers={202: (RETRY_AFTER,)},
    description="200 once the upload is no longer `pending` (`ready`, `rejected`, …); 202 while "
    "the broker verifies it with Cloudflare: ask again after `Retry-After` seconds. A draft "
    "whose file never arrived stays `pending` until it expires.",
    tags=("uploads",),
    scope="uploads:write",
)
def complete_upload(upload_id: str) -> tuple[UploadOut, int, dict[str, str]] | Response:
    """Tell the broker the file was sent; 200 with the state once verified, 202 while pending.

    With upstream headroom the upload is verified right here (one details call); under
    pressure it is left to the worker's batched checks.
    """
    upload = _visible(upload_id)
    if upload.status != lifecycle.PENDING:
        return UploadOut.of(upload), 200, {}
    holder = f"complete:{os.getpid()}:{threading.get_ident()}"
    if completion.verify_inline_and_commit(
        db.session, get_client(), current_settings(), upload.id, holder
    ):
        db.session.refresh(upload)
        return UploadOut.of(upload), 200, {}
    db.session.refresh(upload)
    if upload.status != lifecycle.PENDING:
        return UploadOut.of(upload), 200, {}
    completion.hint(upload)  # also wakes an in-process worker
    return UploadOut.of(upload), 202, {"Retry-After": CHECK_AGAIN_AFTER}

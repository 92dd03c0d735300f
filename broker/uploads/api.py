"""/api/v1/uploads: ask for a direct upload URL, list, show, delete and complete one's uploads.

Another user's upload is 404 on every route (not 403: its existence is not revealed);
admins see every upload.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal, cast

from flask import Response, current_app, request, url_for
from flask_login import current_user
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from broker.api import bp
from broker.api.spec import (
    LOCATION,
    RETRY_AFTER,
    UPLOAD_ID,
    ErrorCase,
    Header,
    declare,
    endpoint,
    example,
    field_error,
    not_found,
)
from broker.api.upstream_errors import CREATE_UPSTREAM, UPSTREAM
from broker.auth.models import User
from broker.platform.config import current_settings
from broker.platform.db import commit_or_undo, db, rollback_and_undo, undo_on_failure
from broker.platform.errors import ApiError
from broker.uploads import completion, idempotency, lifecycle
from broker.uploads.models import Upload
from broker.upstream.cloudflare import get_client

Status = Literal["pending", "ready", "expired", "rejected", "deleted"]


NO_UPLOAD = not_found("upload")
NO_USER = not_found("user")
LIMITS = (
    ErrorCase(
        429,
        "too_many_pending_uploads",
        "You have 20 uploads waiting for a file, your limit; finish or delete one first.",
        headers=(RETRY_AFTER,),
    ),
    ErrorCase(
        429,
        "daily_upload_limit",
        "You created 500 uploads in the last 24 hours, your limit.",
        headers=(RETRY_AFTER,),
    ),
)
CUSTOM_ID_REFUSED = field_error(
    422,
    "validation_error",
    "a custom id cannot be used with signed URLs; send require_signed_urls: false",
    "id",
    "value_error",
)
IDEMPOTENCY_KEY = Header(
    "Idempotency-Key",
    "Any unique string of yours (a UUID is best) that makes a retry safe: a repeat with the "
    "same key and body within 24 hours gets the first answer again instead of a second upload.",
    {
        "type": "string",
        "minLength": 1,
        "maxLength": idempotency.MAX_KEY_LENGTH,
        "pattern": "^[!-~]+$",
    },
    "5f0c6f3e-8a57-4bd4-9b0e-2f7e7c1d3a90",
    required=False,
)
IDEMPOTENT_REPLAYED = Header(
    "Idempotent-Replayed",
    "`true` when this is the stored answer to an earlier request with the same "
    "`Idempotency-Key` (its `status` is as it was then: GET the upload for the current one).",
    {"type": "string", "enum": ["true"]},
    "true",
    required=False,
)
IDEMPOTENCY_ERRORS = (
    ErrorCase(
        400,
        "invalid_idempotency_key",
        f"Idempotency-Key must be 1 to {idempotency.MAX_KEY_LENGTH} printable ASCII characters.",
    ),
    ErrorCase(
        409,
        "idempotency_in_progress",
        "A request with this Idempotency-Key is still running; retry shortly.",
    ),
    ErrorCase(
        422,
        "idempotency_key_reused",
        "This Idempotency-Key was used with a different request; use a new key.",
    ),
)


def _custom_id_pattern(schema: dict[str, Any]) -> None:
    """Document the custom id rules on the string branch of the optional `id` (the lifecycle
    checks them, saying which rule an id breaks)."""
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "string":
            option["pattern"] = lifecycle.CUSTOM_ID_PATTERN


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
        ge=lifecycle.MIN_EXPIRY,
        le=lifecycle.MAX_EXPIRY,
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


def idempotent(view: Callable[..., Response]) -> Callable[..., Response]:
    """Own the unit of work of an unsafe view and honour its `Idempotency-Key`.

    With a key: the key is claimed before the view runs (409 while another request holds it),
    a finished request's answer is replayed (`Idempotent-Replayed: true`; 422 for another body),
    and the view's answer is stored in the view's own transaction. Without a key it only owns
    the unit of work: commit once the view returned, or roll back and run its undos.
    """

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Response:
        user = _user()
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            fp = idempotency.fingerprint("POST", request.path, request.get_json(silent=True))
            stored = idempotency.claim_and_commit(db.session, user, key, fp)
            if stored is not None:
                replay = current_app.response_class(
                    stored.body, status=stored.status, mimetype="application/json"
                )
                replay.headers.update(stored.headers)
                replay.headers["Idempotent-Replayed"] = "true"
                return replay
        try:
            response = view(*args, **kwargs)
            if key is not None:
                body = response.get_data(as_text=True)
                headers = dict(response.headers)
                idempotency.store_answer(db.session, user, key, response.status_code, body, headers)
            commit_or_undo()
        except Exception:
            rollback_and_undo()
            if key is not None:
                idempotency.release_and_commit(db.session, user, key)
            raise
        return response

    return declare(
        wrapper,
        request_headers=(IDEMPOTENCY_KEY,),
        success_headers=(IDEMPOTENT_REPLAYED,),
        errors=IDEMPOTENCY_ERRORS,
    )


@endpoint(
    bp,
    "POST",
    "/uploads",
    body=CreateUpload,
    responses={201: UploadCreated},
    errors=(CUSTOM_ID_REFUSED, *LIMITS, *CREATE_UPSTREAM),
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
    config = current_app.config
    params = lifecycle.UploadParams(
        metadata=body.metadata,
        require_signed_urls=(
            bool(config["REQUIRE_SIGNED_URLS"])
            if body.require_signed_urls is None
            else body.require_signed_urls
        ),
        expires_in=int(
            config["UPLOAD_DEFAULT_EXPIRY"] if body.expires_in is None else body.expires_in
        ),
        custom_id=body.id,
    )
    new = lifecycle.plan_upload(user, params)
    client = get_client()
    # Commits the reservation: no lock or open transaction while Cloudflare answers.
    prepaid = lifecycle.reserve_slot_and_commit(
        db.session, user, config, new.id, new.now, budget=client.budget_for("direct_upload")
    )
    undo_on_failure(lambda: lifecycle.release_slot_and_commit(db.session, new.id))
    upload, upload_url = lifecycle.create_upload(db.session, new, client, prepaid=prepaid)
    undo_on_failure(lambda: lifecycle.discard_draft(client, upload.image_id))
    db.session.flush()
    payload = UploadCreated(
        **UploadOut.of(upload, owner=new.creator).model_dump(), upload_url=upload_url
    )
    headers = {"Location": url_for("api.get_upload", upload_id=new.id)}
    return _json_response(payload, 201, headers)


@endpoint(
    bp,
    "GET",
    "/uploads",
    query=ListUploads,
    responses={200: UploadPage},
    errors=(ErrorCase(403, "forbidden", "Only admins may list other users' uploads."),),
    tags=("uploads",),
    scope="uploads:read",
)
def list_uploads(query: ListUploads) -> UploadPage:
    """List your uploads, newest first (admins: `scope=all`, optionally one `user`)."""
    user = _user()
    user_id: int | None = user.id
    if query.scope == "all" or query.user is not None:
        if not user.is_admin:
            raise ApiError(403, "forbidden", "Only admins may list other users' uploads.")
        user_id = None
        if query.user is not None:
            owner = db.session.scalar(db.select(User).where(User.public_id == query.user))
            if owner is None:
                return UploadPage(items=[], next_cursor=None)
            user_id = owner.id
    rows, cursor = lifecycle.list_uploads(
        db.session, user_id=user_id, status=query.status, cursor=query.cursor, limit=query.limit
    )
    return UploadPage(items=[UploadOut.of(u) for u in rows], next_cursor=cursor)


def _visible(upload_id: str) -> Upload:
    upload = lifecycle.find_upload(db.session, _user(), upload_id)
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
    db.session.commit()
    return UploadOut.of(upload)


def _limits_out(user: User) -> UserLimitsOut:
    pending, daily = lifecycle.limits_for(user, current_app.config)
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
    return _limits_out(_admin_target(public_id))


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
    target.max_pending_uploads = body.max_pending_uploads
    target.max_uploads_per_day = body.max_uploads_per_day
    db.session.commit()
    return _limits_out(target)


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
    owner = f"complete:{os.getpid()}:{threading.get_ident()}"
    if completion.verify_inline_and_commit(
        db.session, get_client(), current_settings(), upload.id, owner
    ):
        db.session.refresh(upload)
        return UploadOut.of(upload), 200, {}
    db.session.refresh(upload)
    if upload.status != lifecycle.PENDING:
        return UploadOut.of(upload), 200, {}
    completion.hint(upload)  # also wakes an in-process worker
    db.session.commit()
    return UploadOut.of(upload), 202, {"Retry-After": CHECK_AGAIN_AFTER}

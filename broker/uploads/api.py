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
from broker.api.spec import endpoint, errors
from broker.auth.models import User
from broker.platform.db import commit_or_undo, db, rollback_and_undo, undo_on_failure
from broker.platform.errors import ApiError
from broker.uploads import completion, idempotency, lifecycle
from broker.uploads.models import Upload
from broker.upstream.cloudflare import get_client

Status = Literal["pending", "ready", "expired", "rejected", "deleted"]


# Upstream trouble: 502 auth/failure, 503 budget or Cloudflare's 429, 504 timeout.
UPSTREAM = (502, 503, 504)
ERRORS = errors(401, 404, 422)


class CreateUpload(BaseModel):
    """Options for a new upload slot; every field is optional."""

    model_config = ConfigDict(extra="forbid")

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
        description="A custom image id (not a UUID, no leading/trailing '/'); "
        "needs require_signed_urls: false.",
    )


class UploadOut(BaseModel):
    """An upload as the API shows it."""

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
    def of(cls, upload: Upload) -> UploadOut:
        """Render an Upload row."""
        fields = lifecycle.public_fields(upload)
        return cls(**{name: fields[name] for name in cls.model_fields})


class UploadCreated(UploadOut):
    """A new upload: POST the file (multipart field `file`) to `upload_url`, once."""

    upload_url: str = Field(description="One-time URL the client posts the file to.")


class UploadPage(BaseModel):
    """A page of uploads, newest first."""

    items: list[UploadOut]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")


class ListUploads(BaseModel):
    """Filters and paging of the upload list."""

    model_config = ConfigDict(extra="forbid")

    status: Status | None = None
    cursor: str | None = Field(None, max_length=512)
    limit: int = Field(50, ge=1, le=200)
    scope: Literal["mine", "all"] = Field("mine", description="`all` is for admins.")
    user: str | None = Field(None, max_length=32, description="Admins: one user's public id.")


class UserLimits(BaseModel):
    """A user's upload limits; null means the configured default."""

    model_config = ConfigDict(extra="forbid")

    max_pending_uploads: int | None = Field(None, ge=0, le=100_000)
    max_uploads_per_day: int | None = Field(None, ge=0, le=1_000_000)


class UserLimitsOut(UserLimits):
    """A user's overrides and the limits that apply."""

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

    return wrapper


@endpoint(
    bp,
    "POST",
    "/uploads",
    body=CreateUpload,
    responses={
        201: UploadCreated,
        **errors(400, 401, 409, 422, 429, *UPSTREAM),
    },
    tags=("uploads",),
    scope="uploads:write",
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
    payload = UploadCreated(**UploadOut.of(upload).model_dump(), upload_url=upload_url)
    headers = {"Location": url_for("api.get_upload", upload_id=new.id)}
    return _json_response(payload, 201, headers)


@endpoint(
    bp,
    "GET",
    "/uploads",
    query=ListUploads,
    responses={200: UploadPage, **errors(401, 403, 422)},
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
        raise ApiError(404, "not_found", "No such upload.")
    return upload


@endpoint(
    bp,
    "GET",
    "/uploads/<upload_id>",
    responses={200: UploadOut, **errors(401, 404)},
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
    responses={200: UploadOut, **errors(401, 404, *UPSTREAM)},
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
        raise ApiError(404, "not_found", "No such user.")
    return target


@endpoint(
    bp,
    "GET",
    "/users/<public_id>/upload-limits",
    responses={200: UserLimitsOut, **errors(401, 403, 404)},
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
    responses={200: UserLimitsOut, **errors(401, 403, 404, 422)},
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
RETRY_AFTER = "1"


@endpoint(
    bp,
    "POST",
    "/uploads/<upload_id>/complete",
    responses={200: UploadOut, 202: UploadOut, **ERRORS},
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
        db.session, get_client(), current_app.config, upload.id, owner
    ):
        db.session.refresh(upload)
        return UploadOut.of(upload), 200, {}
    db.session.refresh(upload)
    if upload.status != lifecycle.PENDING:
        return UploadOut.of(upload), 200, {}
    completion.hint(upload)  # also wakes an in-process worker
    db.session.commit()
    return UploadOut.of(upload), 202, {"Retry-After": RETRY_AFTER}

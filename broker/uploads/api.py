"""/api/v1/uploads: ask for a direct upload URL, list, show, delete and complete one's uploads;
/api/v1/profiles: the upload profiles' public rules.

Another user's upload is 404 on every route (not 403: its existence is not revealed);
admins see every upload.
"""

from __future__ import annotations

import math
import os
import threading
from datetime import datetime
from typing import Any, Literal, Self, cast

from flask import Response, current_app, g, url_for
from flask_login import current_user
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from broker.api import bp, unit_of_work
from broker.api.idempotency import idempotent
from broker.api.spec import (
    LOCATION,
    RETRY_AFTER,
    UPLOAD_ID,
    ErrorCase,
    dynamic_enum,
    endpoint,
    enum_source,
    example,
    not_found,
)
from broker.api.upstream_errors import CREATE_UPSTREAM, UPSTREAM
from broker.audit import log as audit
from broker.auth.models import User
from broker.platform.config import current_settings
from broker.platform.db import db, utcnow
from broker.uploads import completion, create, lifecycle, policy, profiles, queries, quotas
from broker.uploads.models import Upload
from broker.upstream.cloudflare import get_client

Status = Literal["pending", "ready", "expired", "rejected", "deleted"]
FileState = Literal["awaiting_file", "refused", "url_expired", "received"]


NO_UPLOAD = not_found("upload")
NO_USER = not_found("user")
ADMINS_ONLY_LISTING = ErrorCase(403, "forbidden", "Only admins may list other users' uploads.")
QUOTA_REFUSALS = (quotas.TOO_MANY_PENDING, quotas.DAILY_QUOTA, quotas.STORED_QUOTA)
PROFILE_REFUSALS = (
    profiles.UNKNOWN_PROFILE,
    profiles.PROFILE_NOT_ALLOWED,
    profiles.METADATA_SCHEMA,
    profiles.SIGNED_URLS_FIXED,
)
enum_source("profile", lambda: list(profiles.profiles_of(current_settings()).names))


def _custom_id_pattern(schema: dict[str, Any]) -> None:
    """Document the custom id rules on the string branch of the optional `id` (the upload
    policy checks them, saying which rule an id breaks)."""
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "string":
            option["pattern"] = policy.CUSTOM_ID_PATTERN


def _profile_enum(schema: dict[str, Any]) -> None:
    """List the app's profiles on the string branch of the optional `profile` (null still
    means `default`)."""
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "string":
            option.update(dynamic_enum("profile"))


class CreateUpload(BaseModel):
    """Options for a new upload slot; every field is optional."""

    model_config = example({"metadata": {"album": "summer"}, "expires_in": 600}, forbid_extra=True)

    profile: str | None = Field(
        None,
        max_length=32,
        description="The upload profile whose rules apply (`GET /api/v1/profiles`); default "
        "`default`.",
        json_schema_extra=_profile_enum,
    )
    metadata: dict[str, Any] | None = Field(
        None,
        description="Your key/value data stored with the image (≤ 1024 bytes as JSON, "
        "including the broker's own keys); the profile may give it a JSON Schema.",
    )
    require_signed_urls: StrictBool | None = Field(
        None,
        description="Serve the image only through signed URLs (default from config; a profile "
        "may fix it).",
    )
    expires_in: int | None = Field(
        None,
        ge=policy.MIN_EXPIRY,
        le=policy.MAX_EXPIRY,
        description="Seconds the upload URL stays valid (default: the profile's).",
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
    "profile": "default",
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
    "file_state": "awaiting_file",
    "file_message": "No file yet: POST it to upload_url (multipart field 'file') before "
    "2026-05-04T09:40:00Z.",
    "upstream_refusal": None,
}
_READY_EXAMPLE = {
    **_UPLOAD_EXAMPLE,
    "status": "ready",
    "status_changed_at": "2026-05-04T09:31:12Z",
    "completed_at": "2026-05-04T09:31:12Z",
    "filename": "beach.jpg",
    "uploaded_at": "2026-05-04T09:31:05Z",
    "last_checked_at": "2026-05-04T09:31:12Z",
    "file_state": "received",
    "file_message": "Cloudflare has the file.",
}


class UpstreamRefusal(BaseModel):
    """Cloudflare's own error for a file it refused (its notification said so)."""

    model_config = example({"code": 5413, "message": "Image exceeds the 10 MB size limit"})

    code: int = Field(description="Cloudflare's error code: 5413 too large, 5415/5455 format.")
    message: str


class UploadOut(BaseModel):
    """An upload as the API shows it."""

    model_config = example(_READY_EXAMPLE)

    id: str
    image_id: str
    owner: str = Field(description="The uploader's public user id (Cloudflare's `creator`).")
    status: Status
    profile: str = Field(description="The upload profile it was made under.")
    require_signed_urls: bool
    metadata: dict[str, Any]
    created_at: datetime
    expires_at: datetime
    status_changed_at: datetime
    completed_at: datetime | None = None
    filename: str | None = None
    uploaded_at: datetime | None = None
    reject_reason: str | None = Field(
        None,
        description="Why the file was refused: `<rule>: <what was measured>` for a profile's "
        "rule (e.g. `max_width: image is 4000 px wide; at most 512`).",
    )
    last_checked_at: datetime | None = Field(
        None,
        description="When Cloudflare last reported the upload still waiting for its file; "
        "`pending` with this later than your file POST means the file did not arrive.",
    )
    file_state: FileState | None = Field(
        None,
        description="What the broker knows of the file: `awaiting_file` (none arrived yet), "
        "`refused` (Cloudflare refused the last file sent, see `upstream_refusal`; the URL "
        "takes another until `expires_at`), `url_expired` (no file came in time: create a new "
        "upload), `received`; null once deleted.",
    )
    file_message: str | None = Field(None, description="That state in words: what to do next.")
    upstream_refusal: UpstreamRefusal | None = Field(
        None, description="Cloudflare's error for the last file it refused, when it said so."
    )

    @classmethod
    def of(
        cls,
        upload: Upload,
        *,
        owner: str | None = None,
        now: datetime | None = None,
        **extra: Any,
    ) -> Self:
        """Render an Upload row (`owner`: its owner's public id, when known; `extra`: the
        fields a subclass adds)."""
        fields = lifecycle.public_fields(upload, owner=owner)
        shown = {name: fields[name] for name in cls.model_fields if name in fields}
        state, message = file_state(upload, now or utcnow())
        stored = upload.upstream_refusal if upload.status == lifecycle.PENDING else None
        refusal = UpstreamRefusal.model_validate(stored) if stored else None
        return cls(
            **shown, file_state=state, file_message=message, upstream_refusal=refusal, **extra
        )


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def file_state(upload: Upload, now: datetime) -> tuple[FileState | None, str | None]:
    """Say what the broker knows of an upload's file, and what the client should do next."""
    if upload.status == lifecycle.DELETED:
        return None, "Deleted: the image is gone."
    if upload.status == lifecycle.REJECTED:
        return "received", f"The file was refused: {upload.reject_reason}."
    if upload.status == lifecycle.READY:
        return "received", "Cloudflare has the file."
    if upload.status == lifecycle.EXPIRED or now >= upload.expires_at:
        return "url_expired", (
            f"The upload URL expired at {_iso(upload.expires_at)} with no file: "
            "create a new upload."
        )
    until = f"before {_iso(upload.expires_at)}"
    refusal = upload.upstream_refusal
    if refusal:
        return "refused", (
            f"Cloudflare refused the last file sent ({refusal.get('code')}: "
            f"{refusal.get('message')}): send one within the limits to the same upload_url {until}."
        )
    if upload.last_checked_at is not None:
        return "awaiting_file", (
            f"Cloudflare had no file at {_iso(upload.last_checked_at)}: POST it to upload_url "
            f"(multipart field 'file') {until}."
        )
    return "awaiting_file", f"No file yet: POST it to upload_url (multipart field 'file') {until}."


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
    profile: str | None = Field(
        None,
        max_length=32,
        description="Only uploads of this upload profile.",
        json_schema_extra=_profile_enum,
    )
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


def _actor(user: User) -> profiles.Actor:
    """Who is asking, for a profile's `allow` rule: role, a service key's scopes, JWT claims."""
    return profiles.Actor(
        is_admin=user.is_admin,
        scopes=g.get("credential_scopes"),
        claims=g.get("oidc_claims"),
    )


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
        *PROFILE_REFUSALS,
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
    profile = profiles.profiles_of(settings).get(body.profile)
    profiles.check_may_use(profile, _actor(user))
    params = policy.UploadParams(
        metadata=body.metadata,
        require_signed_urls=profiles.signed_urls(
            profile, body.require_signed_urls, settings.require_signed_urls
        ),
        expires_in=profile.expires_in if body.expires_in is None else body.expires_in,
        custom_id=body.id,
        profile=profile.name,
    )
    created = create.create_upload(
        db.session, user, params, get_client(), settings, unit_of_work.current()
    )
    payload = UploadCreated.of(created.upload, owner=created.owner, upload_url=created.upload_url)
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
        db.session,
        user_id=user_id,
        status=query.status,
        cursor=query.cursor,
        limit=query.limit,
        profile=query.profile,
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
    """Show one of your uploads, with what the broker knows of its file (`file_state`)."""
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
    pending, daily, _, _ = quotas.quotas_for(user, current_settings())
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


# Seconds a client waits before asking `/complete` again: 1, 2, 4 … up to the worker's cap,
# growing with each time Cloudflare said "no file yet" since the client first said it was sent
# (the checks before it, while the person picked a file, say nothing of it), and never past the
# URL's expiry (when the answer becomes final).
RETRY_FIRST = 1


def retry_after(upload: Upload, now: datetime) -> int:
    """Return when to ask again about a pending upload (grows while no file arrives)."""
    late = completion.checks_since_completed(upload)
    grown: int = RETRY_FIRST * 2 ** min(max(late - 1, 0), 8)
    until_expiry = math.ceil((upload.expires_at - now).total_seconds())
    return max(1, min(grown, completion.CHECK_CAP, until_expiry))


@endpoint(
    bp,
    "POST",
    "/uploads/<upload_id>/complete",
    responses={200: UploadOut, 202: UploadOut},
    errors=(NO_UPLOAD,),
    headers={202: (RETRY_AFTER,)},
    description="200 once the upload is no longer `pending` (`ready`, `rejected`, `expired` — "
    "answered as soon as the upload URL has expired with no file); 202 while no file has "
    "arrived: `file_state` and `file_message` say what the broker knows (no file yet, or "
    "refused by Cloudflare and why), and `Retry-After` (growing: 1, 2, 4 … 30 s, never past "
    "`expires_at`) when to ask again.",
    tags=("uploads",),
    scope="uploads:write",
)
def complete_upload(upload_id: str) -> tuple[UploadOut, int, dict[str, str]] | Response:
    """Tell the broker the file was sent; 200 with the state once settled, 202 while pending.

    With upstream headroom the upload is verified right here (one details call); under
    pressure it is left to the worker's batched checks. Past its expiry it is settled now.
    """
    upload = _visible(upload_id)
    if upload.status != lifecycle.PENDING:
        return UploadOut.of(upload), 200, {}
    holder = f"complete:{os.getpid()}:{threading.get_ident()}"
    settings = current_settings()
    profile = profiles.profiles_of(settings).find(upload.profile)
    now = utcnow()
    checked = upload.check_attempts  # before this call's own check, which counts as late
    if now >= upload.expires_at:
        # No file can arrive through a dead URL: settle it now (ready if one came just in
        # time, else expired), not after the worker's grace period.
        completion.expire_due(
            db.session, get_client(), settings, holder, now=now, upload_id=upload.id
        )
    elif completion.verify_inline_and_commit(
        db.session, get_client(), settings, upload.id, holder, now=now, profile=profile
    ):
        db.session.refresh(upload)
        return UploadOut.of(upload, now=now), 200, {}
    db.session.refresh(upload)
    if upload.status != lifecycle.PENDING:
        return UploadOut.of(upload, now=now), 200, {}
    completion.hint(upload)  # also wakes an in-process worker
    completion.client_completed(upload, checked)
    wait = retry_after(upload, now)
    return UploadOut.of(upload, now=now), 202, {"Retry-After": str(wait)}


_PROFILE_EXAMPLE: dict[str, Any] = {
    "name": "avatar",
    "description": "Your profile picture",
    "formats": ["JPEG", "PNG", "WEBP"],
    "max_bytes": 5000000,
    "min_width": None,
    "max_width": 512,
    "min_height": None,
    "max_height": 512,
    "min_pixels": None,
    "max_pixels": None,
    "aspect_ratio": 1.0,
    "aspect_tolerance": 0.01,
    "files_per_pick": 1,
    "max_pending": 2,
    "max_per_day": 20,
    "max_stored": None,
    "expires_in": 600,
    "require_signed_urls": False,
    "default_variant": "public",
    "metadata_schema": None,
    "replace": True,
    "replace_grace": 60,
}


class ProfileOut(BaseModel):
    """One upload profile's public rules (null: no limit); check a file against them before
    creating an upload: the broker checks the original again once it arrives."""

    model_config = example(_PROFILE_EXAMPLE)

    name: str
    description: str
    formats: list[str] = Field(description="Formats allowed (empty: any Cloudflare takes).")
    max_bytes: int | None
    min_width: int | None
    max_width: int | None
    min_height: int | None
    max_height: int | None
    min_pixels: int | None
    max_pixels: int | None
    aspect_ratio: float | None = Field(description="Width divided by height.")
    aspect_tolerance: float | None = Field(description="Relative tolerance of the ratio.")
    files_per_pick: int | None = Field(description="Files one pick may hold.")
    max_pending: int = Field(description="Uploads waiting for a file at once, per user.")
    max_per_day: int = Field(description="Uploads per 24 hours, per user.")
    max_stored: int | None = Field(description="Images kept per user.")
    expires_in: int = Field(description="Default lifetime of the upload URL, seconds.")
    require_signed_urls: bool | None = Field(description="Fixed by the profile, or null.")
    default_variant: str | None
    metadata_schema: dict[str, Any] | None = Field(
        description="The JSON Schema `metadata` must satisfy."
    )
    replace: bool = Field(description="A new upload replaces the user's current image.")
    replace_grace: int | None = Field(
        description="Seconds the replaced image is kept before it is deleted."
    )


class ProfileList(BaseModel):
    """Every upload profile, `default` first."""

    model_config = example({"items": [_PROFILE_EXAMPLE]})

    items: list[ProfileOut]


@endpoint(
    bp,
    "GET",
    "/profiles",
    responses={200: ProfileList},
    tags=("uploads",),
    scope="uploads:read",
)
def list_profiles() -> ProfileList:
    """List the upload profiles and their public rules."""
    known = profiles.profiles_of(current_settings())
    return ProfileList(items=[ProfileOut(**p.public()) for p in known])

"""The create path: one function from "this user wants an upload URL" to a pending upload.

Offers `create_upload`, called by `POST /api/v1/uploads` and by the web process's warm-up
(`broker.uploads.warmup`), and the `UnitOfWork` it runs in.

Rules it enforces, in this order:
1. the upload policy (custom id, expiry, metadata; `broker.uploads.policy`) and the profile's
   metadata schema (`broker.uploads.profiles`) before anything is held;
2. a quota slot of the profile reserved as a step of its own, committed before Cloudflare is asked
   (`broker.uploads.quotas`), so concurrent creates never exceed a quota and no lock or open
   transaction waits on Cloudflare;
3. one `direct_upload` call, stamped with the user's public id as `creator`;
4. the pending row takes the reservation's slot in the caller's transaction; should that
   transaction fail, the unit of work gives the slot back and discards the draft, so no row
   ever claims a draft that does not exist and no draft outlives a failed request for long;
5. a custom id is free again once its upload is deleted, expired or rejected (only live
   uploads hold their image id); a row that still holds it while Cloudflare gave it out
   again is answered as Cloudflare answers a taken id, so probing ids reveals nothing more.
The caller's unit of work commits the row; nothing here commits itself.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar, cast

import sqlalchemy as sa

from broker.auth.models import User
from broker.platform.config import Settings
from broker.platform.db import Finish, Session, utcnow
from broker.uploads import quotas
from broker.uploads.lifecycle import PENDING, READY
from broker.uploads.models import Upload, UploadReservation, _upload_id
from broker.uploads.policy import UploadParams, build_metadata, check_custom_id, effective_expiry
from broker.uploads.profiles import check_metadata, profiles_of
from broker.upstream.cloudflare import Budget, CloudflareConflict, DirectUpload, Priority

log = logging.getLogger("broker.uploads")

# When the worker first checks whether a silent client's file arrived; after that it checks
# 10 s, 20 s, then every 30 s later (broker.uploads.completion.check_delay).
FIRST_CHECK_DELAY = timedelta(seconds=5)
# Cloudflare's own words for a taken custom id (code 5409).
ID_EXISTS = "Resource already exists: an image with this ID exists"

T = TypeVar("T")


class UnitOfWork(Protocol):
    """The transaction a create runs in (a request's: `broker.api.unit_of_work`)."""

    def step_in_one_round_trip(self, work: Callable[[sa.Connection, Finish], T]) -> T:
        """Run Core `work` on a connection of its own, committed before this returns; `work`
        may end its transaction by `finish(statements)`: they and the COMMIT in one round
        trip."""

    def connection(self) -> sa.Connection:
        """The connection for Core writes committed with the unit of work."""

    def on_failure(self, undo: Callable[[], None]) -> None:
        """Register how to undo work done so far should the unit of work fail."""


class Drafts(Protocol):
    """What the create path asks of Cloudflare (`broker.upstream.cloudflare.CloudflareImages`)."""

    def budget_for(self, batch: str | None) -> Budget | None:
        """The budget a call to endpoint `batch` spends now."""

    def direct_upload(self, *args: Any, **kwargs: Any) -> DirectUpload:
        """Create a draft image and its one-time upload URL (`POST /v2/direct_upload`)."""

    def delete_image(self, image_id: str, *, priority: Priority = Priority.INTERACTIVE) -> None:
        """Delete an image (or a draft)."""


@dataclass(frozen=True)
class Created:
    """A new pending upload (inserted, not committed; the object itself is not in the session),
    its one-time URL, its owner's public id."""

    upload: Upload
    upload_url: str
    owner: str


def create_upload(
    session: Session,
    user: User,
    params: UploadParams,
    client: Drafts,
    settings: Settings,
    work: UnitOfWork,
    *,
    now: datetime | None = None,
) -> Created:
    """Ask Cloudflare for a direct upload URL for `user` and add its pending Upload row."""
    now = now or utcnow()
    profile = profiles_of(settings).get(params.profile)
    if params.custom_id is not None:
        check_custom_id(params.custom_id, params.require_signed_urls)
    upload_id = _upload_id()
    expiry = effective_expiry(now, params.expires_in)
    check_metadata(profile, params.metadata)
    meta = build_metadata(params.metadata, upload_id, profile.name)
    # Read now: once the reservation commits, touching `user` would reload it and hold a
    # connection in a transaction while Cloudflare answers.
    user_id, creator = user.id, user.public_id
    limits = quotas.quotas_for(user, settings, profile)
    budget = client.budget_for("direct_upload")
    prepaid = work.step_in_one_round_trip(
        lambda conn, finish: quotas.reserve_slot(
            conn, user_id, limits, upload_id, now, budget=budget, finish=finish
        )
    )
    work.on_failure(lambda: quotas.release_slot(session, upload_id))
    draft = client.direct_upload(
        creator=creator,
        expiry=expiry,
        metadata=meta,
        require_signed_urls=params.require_signed_urls,
        custom_id=params.custom_id,
        priority=Priority.INTERACTIVE,
        prepaid=prepaid,
    )
    work.on_failure(lambda: discard_draft(client, draft.id))
    upload = Upload(
        id=upload_id,
        user_id=user_id,
        image_id=draft.id,
        profile=profile.name,
        status=PENDING,
        require_signed_urls=params.require_signed_urls,
        meta=meta,
        created_at=now,
        expires_at=expiry,
        status_changed_at=now,
        next_check_at=now + FIRST_CHECK_DELAY,
        check_attempts=0,
    )
    conn = work.connection()
    if params.custom_id is not None:
        _take_custom_id(conn, draft.id)
    try:
        _store(conn, upload)
    except sa.exc.IntegrityError:
        if params.custom_id is None:
            raise
        # A live row still holds the id although Cloudflare just gave it out (its image went
        # without the broker seeing it): answer as Cloudflare does for a taken id.
        raise CloudflareConflict(409, 5409, ID_EXISTS) from None
    log.info("upload created id=%s image=%s user=%s", upload_id, draft.id, creator)
    return Created(upload, draft.upload_url, creator)


_STORED = (
    "id",
    "user_id",
    "image_id",
    "profile",
    "status",
    "require_signed_urls",
    "meta",
    "created_at",
    "expires_at",
    "status_changed_at",
    "next_check_at",
    "check_attempts",
)


def _store(conn: sa.Connection, upload: Upload) -> None:
    """Insert the row of `upload` in place of its reservation (same id), in one statement.

    Core on the unit of work's connection, not the ORM: the answer needs nothing a flush would
    give back, and the object stays out of the session. On PostgreSQL the reservation's DELETE
    is a CTE of the INSERT; on SQLite, whose statements cannot carry a DELETE, a trigger on
    `uploads` deletes it (migration b3f1d8e2c6a4), so the write lock is held for one statement.
    """
    values = {name: getattr(upload, name) for name in _STORED}
    conn.execute(_storing(conn.dialect.name), values)


@functools.cache
def _storing(dialect: str) -> sa.Insert:
    """The INSERT of an upload row (`_STORED`'s columns), built once per dialect: building a
    statement costs more than running this one."""
    uploads = cast(sa.Table, Upload.__table__)
    insert = sa.insert(uploads).values({name: sa.bindparam(name) for name in _STORED})
    if dialect != "postgresql":
        return insert
    reservations = cast(sa.Table, UploadReservation.__table__)
    gone = sa.delete(reservations).where(reservations.c.id == sa.bindparam("id"))
    return insert.add_cte(gone.cte("reservation_gone"))


def _take_custom_id(conn: sa.Connection, image_id: str) -> None:
    """Cloudflare gave out `image_id` again: the finished uploads that held it never touch it
    upstream any more (a postponed draft deletion would delete the new image)."""
    conn.execute(_taking_custom_id(), {"taken_id": image_id})


@functools.cache
def _taking_custom_id() -> sa.Update:
    """The UPDATE of `_take_custom_id`, built once."""
    uploads = cast(sa.Table, Upload.__table__)
    return (
        sa.update(uploads)
        .where(
            uploads.c.image_id == sa.bindparam("taken_id"),
            uploads.c.status.notin_((PENDING, READY)),
        )
        .values(draft_delete_at=None)
    )


def discard_draft(client: Drafts, image_id: str) -> None:
    """Best effort: delete a draft whose row could not be stored (it would expire anyway)."""
    try:
        client.delete_image(image_id, priority=Priority.BACKGROUND)
    except Exception:  # the draft expires by itself; never mask the original error
        log.warning("could not discard orphan draft image=%s", image_id)

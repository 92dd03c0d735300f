"""Completion detection: find out, cheaply and quickly, when each pending upload got its file.

Three signals lead to one verification against Cloudflare: the client's `/complete` call and
Cloudflare's notification are *hints* (they only make the upload due now), and the worker's
own capped-exponential schedule covers silent clients. Only the worker changes state, after
verifying:

- many due uploads → one `GET /v2` listing (newest first; drafts are not listed) verifies them
  all at once, and also completes any other pending upload that shows up in it;
- a single due upload → one `GET /v1/{id}`;
- past `expires_at` + grace and still a draft → `expired`, and the draft is deleted upstream.

A due check waits up to `VERIFY_BATCH_WINDOW` seconds (counted from when the oldest due upload
became due) so that the hints arriving meanwhile share its call: the number of calls follows
the number of windows, not of uploads. Every call is made at background priority through the
shared budget, and all workers together make at most one per interval (`listing_interval`: 2 s
with headroom, up to 30 s when the budget is scarce): the worker that moves the shared turn on
(`take_listing_turn_and_commit`) verifies every due upload, the others wait for the next turn.
While the interval is shorter than CHECK_BASE, every pending upload not checked within it is due
too, so a listing per interval covers them all; the schedule is what remains when it is scarce.

`verify_due` and `expire_due` are worker jobs: each owns its transactions (a lease claim, then
one commit per verified batch), as the transaction rule in `broker.platform.db` allows a job.
Everything else here works in the caller's session and never commits.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from broker.platform import leases
from broker.platform.db import Session, in_chunks, utcnow
from broker.platform.wakeup import notify_worker
from broker.uploads import lifecycle
from broker.uploads.models import Upload, VerifyTurn
from broker.upstream.budget import UpstreamBudget
from broker.upstream.cloudflare import (
    CloudflareImages,
    CloudflareNotFound,
    Image,
    Priority,
    UpstreamError,
)

log = logging.getLogger("broker.completion")

# Seconds between checks of a silent client's upload: 5, 10, 20, then every 30 (from creation).
CHECK_BASE = 5
CHECK_CAP = 30
# Verification calls (a listing, or one upload's details) are made at most once per interval by
# all workers together: the budget's window spread over the calls background work may still make
# in it, between LIST_EVERY_MIN (also while the batch host serves them) and CHECK_CAP seconds.
LIST_EVERY_MIN = 2.0
LISTING_TURN = "listing"
LEASE_SECONDS = 60
CLAIM_LIMIT = 500
LIST_PER_PAGE = 1000
# Uploads not covered by a listing page (older than its last image) checked one by one per pass.
MAX_SINGLE_CHECKS = 10
# Seconds before an upload whose result could not be stored is tried again.
POISON_RETRY = 60.0
# Seconds before a postponed draft deletion is tried again (when no Retry-After says otherwise).
DRAFT_DELETE_RETRY = 30.0


def check_delay(attempts: int) -> float:
    """Return seconds until the next check after `attempts` checks (capped exponential)."""
    return float(min(CHECK_CAP, CHECK_BASE * (2 ** min(attempts, 16))))


def hint(upload: Upload, *, now: datetime | None = None) -> bool:
    """Make a pending upload due for verification now (client or Cloudflare said it is done)."""
    if upload.status != lifecycle.PENDING:
        return False
    now = now or utcnow()
    if upload.next_check_at is None or upload.next_check_at > now:
        upload.next_check_at = now
    notify_worker()
    return True


def hint_all(session: Session, *, now: datetime | None = None) -> int:
    """Make every pending upload due now (a notification said some upload finished)."""
    now = now or utcnow()
    result = session.execute(
        sa.update(Upload)
        .where(
            Upload.status == lifecycle.PENDING,
            Upload.expires_at > now,
            sa.or_(Upload.next_check_at.is_(None), Upload.next_check_at > now),
        )
        .values(next_check_at=now)
        .execution_options(synchronize_session=False)
    )
    notify_worker()
    return int(getattr(result, "rowcount", 0) or 0)


# -- policy checks on the original -----------------------------------------------------------


def policy_enabled(config: Any) -> bool:
    """Tell whether any policy check on the original is configured."""
    return bool(
        config.get("UPLOAD_ALLOWED_FORMATS")
        or config.get("UPLOAD_MAX_BYTES")
        or config.get("UPLOAD_MAX_DIMENSION")
    )


def policy_problem(data: bytes, config: Any) -> str | None:
    """Return why the original breaks the configured policy (by decoding it), or None."""
    max_bytes = config.get("UPLOAD_MAX_BYTES")
    if max_bytes and len(data) > int(max_bytes):
        return f"file is {len(data)} bytes; the limit is {int(max_bytes)}"
    allowed = config.get("UPLOAD_ALLOWED_FORMATS")
    max_dim = config.get("UPLOAD_MAX_DIMENSION")
    if not allowed and not max_dim:
        return None
    fmt, size = _sniff(data)
    if allowed:
        wanted = {f.strip().upper() for f in str(allowed).replace(",", " ").split() if f.strip()}
        wanted |= {"JPEG"} if "JPG" in wanted else set()
        wanted |= {"HEIF"} if "HEIC" in wanted else set()
        if fmt is None or fmt not in wanted:
            return f"format {fmt or 'unknown'} is not allowed ({', '.join(sorted(wanted))})"
    if max_dim and size is not None and max(size) > int(max_dim):
        return f"image is {size[0]}x{size[1]}; the limit is {int(max_dim)} px per side"
    return None


def _sniff(data: bytes) -> tuple[str | None, tuple[int, int] | None]:
    """Decode the real format and size (never trusting the name); SVG is recognised by text."""
    import pillow_heif
    from PIL import Image as PILImage

    # HEIC (iPhone photos, accepted by Cloudflare) decodes once pillow-heif is registered.
    if "HEIF" not in PILImage.OPEN:
        pillow_heif.register_heif_opener()

    try:
        with PILImage.open(io.BytesIO(data)) as img:
            img.verify()
            return (img.format or None), img.size
    except Exception:
        head = data[:1024].lstrip().lower()
        if head.startswith(b"<?xml") or head.startswith(b"<svg") or b"<svg" in head:
            return "SVG", None
        return None, None


# -- finishing one upload -------------------------------------------------------------------------


def finish_ready(
    session: Session,
    upload: Upload,
    image: Image,
    client: CloudflareImages,
    config: Any,
    now: datetime,
) -> str:
    """Record a completed image (after the optional policy check); return the new status."""
    if policy_enabled(config):
        try:
            data = client.get_blob(upload.image_id, priority=Priority.BACKGROUND)
        except CloudflareNotFound:
            lifecycle.mark_deleted(session, upload, now=now)
            return upload.status
        problem = policy_problem(data, config)
        if problem:
            with contextlib.suppress(CloudflareNotFound):
                client.delete_image(upload.image_id, priority=Priority.BACKGROUND)
            lifecycle.mark_rejected(session, upload, problem, now=now)
            log.info("upload rejected id=%s: %s", upload.id, problem)
            return upload.status
    lifecycle.mark_ready(session, upload, image, now=now)
    log.info("upload ready id=%s image=%s", upload.id, upload.image_id)
    return upload.status


def _reschedule(session: Session, ids: Sequence[Any], owner: str, now: datetime) -> None:
    """Give back the leases on uploads still drafts and schedule each one's next check by its
    own attempts, in one UPDATE per IN (…) list (a listing may leave hundreds)."""
    attempts = sa.func.coalesce(Upload.check_attempts, 0)
    # Past the cap every delay is CHECK_CAP: one branch per attempt count below it.
    capped = next(n for n in range(64) if check_delay(n + 1) >= CHECK_CAP)
    next_check = sa.case(
        *((attempts == n, now + timedelta(seconds=check_delay(n + 1))) for n in range(capped)),
        else_=now + timedelta(seconds=CHECK_CAP),
    )
    for chunk in in_chunks(ids):
        session.execute(
            sa.update(Upload)
            .where(
                Upload.id.in_(chunk),
                Upload.lease_owner == owner,
                Upload.status == lifecycle.PENDING,
            )
            .values(
                check_attempts=attempts + 1,
                last_checked_at=now,
                next_check_at=next_check,
                lease_owner=None,
                lease_until=None,
            )
            .execution_options(synchronize_session=False)
        )


def _back_off(
    session: Session, ids: Sequence[int | str], owner: str, seconds: float, now: datetime
) -> None:
    """Give back leases after an upstream failure and retry those uploads a little later."""
    if ids:
        session.execute(
            sa.update(Upload)
            .where(Upload.id.in_(list(ids)), Upload.lease_owner == owner)
            .values(
                lease_owner=None,
                lease_until=None,
                next_check_at=now + timedelta(seconds=max(1.0, seconds)),
            )
            .execution_options(synchronize_session=False)
        )
    session.commit()


# -- inline verification (the client's `/complete`) ---------------------------------------------


def has_headroom(client: CloudflareImages, config: Any) -> bool:
    """Tell whether one details call may be spent now, for a person waiting on `/complete`.

    Yes when the batch host carries details calls; else while the global budget is not paused
    and both its use and its pace (what the window will hold if the last minute's traffic goes
    on) stay below `COMPLETE_INLINE_BUDGET` of its limit: when creates pick up, the calls they
    will need are not spent one per upload on checks that a shared listing makes for all.
    """
    route = client.batch_route
    if route is not None and route.uses_batch("image_details"):
        return True
    share = float(config.get("COMPLETE_INLINE_BUDGET") or 0)
    budget = client.budget
    if share <= 0:
        return False
    if not isinstance(budget, UpstreamBudget):
        return budget is None  # a client without a budget (tests, tools) spends freely
    status = budget.status()
    return status.paused_for <= 0 and status.projected < status.limit * share


def verify_inline_and_commit(
    session: Session,
    client: CloudflareImages,
    config: Any,
    upload_id: str,
    owner: str,
    *,
    now: datetime | None = None,
) -> bool:
    """Verify one upload now, when upstream has headroom; True when it is no longer pending.

    Leases the upload (committed) so a worker cannot finish it at the same time, asks Cloudflare
    once, and finishes it in its own transaction (event included). False — nothing changed but
    `last_checked_at` — when there is no headroom, another worker holds it, Cloudflare failed or
    the file has not arrived: the caller then hints the worker as before.
    """
    if policy_enabled(config) or not has_headroom(client, config):
        return False
    now = now or utcnow()
    won = leases.claim_and_commit(
        session,
        Upload,
        where=[Upload.id == upload_id, Upload.status == lifecycle.PENDING],
        order_by=[Upload.id],
        limit=1,
        owner=owner,
        now=now,
        lease_seconds=LEASE_SECONDS,
    )
    if not won:
        return False
    upload = session.get(Upload, upload_id)
    if upload is None:
        return False
    image_id = upload.image_id
    session.commit()
    try:
        image: Image | None = client.get_image(image_id, priority=Priority.INTERACTIVE)
    except CloudflareNotFound:
        image = None
    except UpstreamError as exc:
        log.info("inline verification of %s skipped: %s", upload_id, exc)
        image = None
    upload = session.get(Upload, upload_id)
    if upload is None or upload.lease_owner != owner:
        session.rollback()
        return False
    if image is None or image.draft:
        if image is not None:
            upload.last_checked_at = now
        upload.lease_owner = None
        upload.lease_until = None
        session.commit()
        return False
    try:
        lifecycle.mark_ready(session, upload, image, now=now)
        session.commit()
    except SQLAlchemyError:
        session.rollback()
        log.exception("upload %s could not be finished inline; the worker retries", upload_id)
        return False
    log.info("upload ready id=%s image=%s (inline)", upload_id, image_id)
    return True


# -- the worker's jobs -------------------------------------------------------------------------


def _grace(config: Any) -> timedelta:
    return timedelta(seconds=float(config["EXPIRY_GRACE"]))


# -- the shared listing turn -------------------------------------------------------------------


def listing_interval(client: CloudflareImages) -> float:
    """Return the seconds between verification calls that the upstream's headroom allows now.

    The budget's window divided by the calls a background call may still make in it (what is
    left, spread evenly), kept between LIST_EVERY_MIN and CHECK_CAP; LIST_EVERY_MIN while the
    batch host serves listings, CHECK_CAP while paused after a 429. A burst of creates cannot
    stretch it: the background side keeps its guaranteed share.
    """
    route = client.batch_route
    if route is not None and route.uses_batch("list_v2"):
        return LIST_EVERY_MIN
    budget = client.budget
    if not isinstance(budget, UpstreamBudget):
        return LIST_EVERY_MIN
    status = budget.status()
    left = status.background_left
    if status.paused_for > 0 or left <= 0:
        return float(CHECK_CAP)
    return min(float(CHECK_CAP), max(LIST_EVERY_MIN, status.window / left))


def listing_turn_free(session: Session, now: datetime) -> bool:
    """Tell whether the shared turn may be taken at `now` (a read; `take_listing_turn_and_commit`
    decides)."""
    next_at = session.scalar(sa.select(VerifyTurn.next_at).where(VerifyTurn.name == LISTING_TURN))
    session.commit()
    return next_at is None or next_at <= now


def take_listing_turn_and_commit(session: Session, owner: str, now: datetime, every: float) -> bool:
    """Take the shared turn to verify now, moving the next one `every` seconds on; True if won.

    A compare-and-set on one row: of the workers trying at the same moment exactly one wins
    (PostgreSQL re-checks the condition after the winner's commit; SQLite has one writer).
    """
    turn = cast(sa.Table, VerifyTurn.__table__)
    won = session.execute(
        sa.update(turn)
        .where(turn.c.name == LISTING_TURN, turn.c.next_at <= now)
        .values(next_at=now + timedelta(seconds=every), owner=owner)
    )
    if cast(sa.CursorResult[Any], won).rowcount == 1:
        session.commit()
        return True
    exists = session.scalar(sa.select(turn.c.name).where(turn.c.name == LISTING_TURN))
    if exists is not None:
        session.commit()
        return False
    try:
        session.execute(
            sa.insert(turn).values(
                name=LISTING_TURN, next_at=now + timedelta(seconds=every), owner=owner
            )
        )
        session.commit()
    except IntegrityError:  # another worker created it first, and so took this turn
        session.rollback()
        return False
    return True


def verify_due(
    session: Session,
    client: CloudflareImages,
    config: Any,
    owner: str,
    *,
    now: datetime | None = None,
) -> int:
    """Worker job: verify the uploads that are due (committing as it goes); return how many
    changed state."""
    now = now or utcnow()
    # One verification call per interval for all workers: whoever takes the turn claims every
    # due upload (the others find nothing left to do until the next turn).
    if not listing_turn_free(session, now):
        return 0
    pending = [
        Upload.status == lifecycle.PENDING,
        Upload.expires_at > now - _grace(config),
    ]
    scheduled = [*pending, Upload.next_check_at <= now]
    window = timedelta(seconds=float(config["VERIFY_BATCH_WINDOW"]))
    oldest = session.scalar(
        sa.select(sa.func.min(Upload.next_check_at)).where(
            *scheduled, leases.claimable(Upload, now)
        )
    )
    session.commit()
    interval = listing_interval(client)
    due: list[sa.ColumnElement[bool]] = scheduled
    if interval < CHECK_BASE:
        # Headroom: every pending upload not checked within the interval is due too, so one
        # listing per interval covers them all (the schedule is what is left when it is scarce).
        unchecked_since = sa.func.coalesce(Upload.last_checked_at, Upload.created_at)
        stale = unchecked_since <= now - timedelta(seconds=interval)
        due = [*pending, sa.or_(Upload.next_check_at <= now, stale)]
        if oldest is None or now - oldest < window:
            oldest = None  # the hints' batching window still runs: stale ones alone decide
            if session.scalar(
                sa.select(Upload.id).where(*pending, stale, leases.claimable(Upload, now)).limit(1)
            ):
                oldest = now - window
            session.commit()
    if oldest is None or now - oldest < window:
        return 0
    if not take_listing_turn_and_commit(session, owner, now, interval):
        return 0
    ids = leases.claim_and_commit(
        session,
        Upload,
        where=due,
        order_by=[Upload.next_check_at, Upload.id],
        limit=CLAIM_LIMIT,
        owner=owner,
        now=now,
        lease_seconds=LEASE_SECONDS,
    )
    if not ids:
        return 0
    if len(ids) == 1:
        return _verify_single(session, client, config, owner, ids[0], now)
    return _verify_listing(session, client, config, owner, ids, now)


def _verify_single(
    session: Session,
    client: CloudflareImages,
    config: Any,
    owner: str,
    upload_id: str,
    now: datetime,
) -> int:
    upload = session.get(Upload, upload_id)
    if upload is None:
        return 0
    image_id = upload.image_id
    session.commit()
    try:
        image = client.get_image(image_id, priority=Priority.BACKGROUND)
    except CloudflareNotFound:
        image = None
    except UpstreamError as exc:
        log.warning("verification of %s postponed: %s", upload_id, exc)
        _back_off(session, [upload_id], owner, exc.retry_after or 10, now)
        return 0
    upload = session.get(Upload, upload_id)
    if upload is None or upload.lease_owner != owner:
        session.rollback()
        return 0
    changed = 0
    if image is None:
        # Gone upstream before it was ever completed: nothing will arrive any more.
        changed = int(lifecycle.mark_expired(session, upload, now=now))
    elif image.draft:
        _reschedule(session, [upload_id], owner, now)
    else:
        try:
            finish_ready(session, upload, image, client, config, now)
            session.commit()
        except SQLAlchemyError:
            session.rollback()
            log.exception("upload %s could not be finished; retrying later", upload_id)
            _back_off(session, [upload_id], owner, POISON_RETRY, now)
            return 0
        return 1
    session.commit()
    return changed


def _verify_listing(
    session: Session,
    client: CloudflareImages,
    config: Any,
    owner: str,
    ids: Sequence[str],
    now: datetime,
) -> int:
    try:
        page = client.list_images_v2(
            per_page=LIST_PER_PAGE, sort_order="desc", priority=Priority.BACKGROUND
        )
    except UpstreamError as exc:
        log.warning("batched verification postponed: %s", exc)
        _back_off(session, ids, owner, exc.retry_after or 10, now)
        return 0
    found = {image.id: image for image in page.images}
    # With more pages, only images uploaded after the page's last one are known to be listed.
    covered_since = None
    if page.continuation_token and page.images:
        covered_since = min((i.uploaded for i in page.images if i.uploaded), default=None)
    # Other pending uploads completed meanwhile show up too: take them now, at no extra cost.
    extra_ids: list[Any] = []
    for chunk in in_chunks(list(found)):
        extra_ids += leases.claim_and_commit(
            session,
            Upload,
            where=[
                Upload.status == lifecycle.PENDING,
                Upload.image_id.in_(chunk),
                Upload.id.notin_(list(ids)),
            ],
            order_by=[Upload.id],
            limit=len(chunk),
            owner=owner,
            now=now,
            lease_seconds=LEASE_SECONDS,
        )
    changed = 0
    unsure: list[Any] = []
    not_shown: list[Any] = []
    shown: list[tuple[Any, Image]] = []
    claimed = [*ids, *extra_ids]
    # Sort the claimed uploads first, reading them in one query per chunk (not one each: a
    # listing may claim hundreds), before any commit expires what was read.
    for chunk in in_chunks(claimed):
        for row in session.scalars(sa.select(Upload).where(Upload.id.in_(chunk))).all():
            if row.lease_owner != owner or row.status != lifecycle.PENDING:
                continue
            image = found.get(row.image_id)
            if image is not None and not image.draft:
                shown.append((row.id, image))
            elif covered_since is not None and row.created_at < covered_since:
                unsure.append(row.id)
            else:
                not_shown.append(row.id)
    # Still drafts (or not shown): checked again on their schedule, all in one statement.
    _reschedule(session, not_shown, owner, now)
    session.commit()
    for upload_id, image in shown:
        upload = session.get(Upload, upload_id)
        if upload is None or upload.lease_owner != owner or upload.status != lifecycle.PENDING:
            continue
        try:
            finish_ready(session, upload, image, client, config, now)
            session.commit()
            changed += 1
        except UpstreamError as exc:
            session.rollback()
            _back_off(session, [upload_id], owner, exc.retry_after or 10, now)
        except SQLAlchemyError:
            # Each upload is its own transaction: one that cannot be stored waits alone.
            session.rollback()
            log.exception("upload %s could not be finished; retrying later", upload_id)
            _back_off(session, [upload_id], owner, POISON_RETRY, now)
    for upload_id in unsure[:MAX_SINGLE_CHECKS]:
        changed += _verify_single(session, client, config, owner, upload_id, now)
    _reschedule(session, unsure[MAX_SINGLE_CHECKS:], owner, now)
    session.commit()
    return changed


T = TypeVar("T")


class _Postponed(Exception):
    """Upstream said not now: give back the rest of the claimed uploads for `retry` seconds."""

    def __init__(self, retry: float) -> None:
        super().__init__(retry)
        self.retry = retry


def _walk_claimed(
    session: Session,
    ids: Sequence[Any],
    owner: str,
    now: datetime,
    ask: Callable[[str], T],
    record: Callable[[Upload, T], int],
) -> int:
    """For each claimed upload: `ask` Cloudflare about its image with no transaction open, then
    `record` the answer if the lease is still ours, committing each; return the sum of records.

    `ask` raising `_Postponed` gives back this upload and the rest (`_back_off`) and stops.
    """
    done = 0
    for index, upload_id in enumerate(ids):
        upload = session.get(Upload, upload_id)
        if upload is None:
            continue
        image_id = upload.image_id
        session.commit()
        try:
            answer = ask(image_id)
        except _Postponed as exc:
            _back_off(session, ids[index:], owner, exc.retry, now)
            return done
        upload = session.get(Upload, upload_id)
        if upload is None or upload.lease_owner != owner:
            session.rollback()
            continue
        done += record(upload, answer)
        session.commit()
    return done


def delete_drafts_due(
    session: Session,
    client: CloudflareImages,
    owner: str,
    *,
    now: datetime | None = None,
    limit: int = 50,
) -> int:
    """Worker job: delete upstream the expired drafts whose deletion was postponed (committing
    each); return how many are gone."""
    now = now or utcnow()
    ids = leases.claim_and_commit(
        session,
        Upload,
        where=[Upload.draft_delete_at.is_not(None), Upload.draft_delete_at <= now],
        order_by=[Upload.draft_delete_at, Upload.id],
        limit=limit,
        owner=owner,
        now=now,
        lease_seconds=LEASE_SECONDS,
    )

    def delete(image_id: str) -> float | None:
        """Seconds until the deletion is tried again, or None once the draft is gone."""
        try:
            client.delete_image(image_id, priority=Priority.BACKGROUND)
        except CloudflareNotFound:
            pass
        except UpstreamError as exc:
            return exc.retry_after or DRAFT_DELETE_RETRY
        return None

    def record(upload: Upload, retry: float | None) -> int:
        upload.draft_delete_at = None if retry is None else now + timedelta(seconds=max(1, retry))
        upload.lease_owner = None
        upload.lease_until = None
        return int(retry is None)

    return _walk_claimed(session, ids, owner, now, delete, record)


def expire_due(
    session: Session,
    client: CloudflareImages,
    config: Any,
    owner: str,
    *,
    now: datetime | None = None,
    limit: int = 50,
) -> int:
    """Worker job: expire uploads still drafts past `expires_at` + grace, deleting the draft
    (best effort) and committing each; return how many expired."""
    now = now or utcnow()
    ids = leases.claim_and_commit(
        session,
        Upload,
        where=[Upload.status == lifecycle.PENDING, Upload.expires_at <= now - _grace(config)],
        order_by=[Upload.expires_at, Upload.id],
        limit=limit,
        owner=owner,
        now=now,
        lease_seconds=LEASE_SECONDS,
    )

    def look(image_id: str) -> tuple[Image | None, float | None]:
        """The image (None: gone) and, for a draft whose deletion failed, when to retry it."""
        try:
            image: Image | None = client.get_image(image_id, priority=Priority.BACKGROUND)
        except CloudflareNotFound:
            image = None
        except UpstreamError as exc:
            log.warning("expiry of %s postponed: %s", image_id, exc)
            raise _Postponed(exc.retry_after or 30) from None
        retry_delete: float | None = None
        if image is not None and image.draft:
            try:
                client.delete_image(image_id, priority=Priority.BACKGROUND)
            except CloudflareNotFound:
                pass
            except UpstreamError as exc:
                retry_delete = exc.retry_after or DRAFT_DELETE_RETRY
                log.info("draft %s not deleted upstream yet (%s); retrying later", image_id, exc)
        return image, retry_delete

    def record(upload: Upload, answer: tuple[Image | None, float | None]) -> int:
        image, retry_delete = answer
        if retry_delete is not None:
            upload.draft_delete_at = now + timedelta(seconds=max(1.0, retry_delete))
        if image is not None and not image.draft:
            # The file arrived at the last moment: that is a completion, not an expiry.
            finish_ready(session, upload, image, client, config, now)
        else:
            lifecycle.mark_expired(session, upload, now=now)
            log.info("upload expired id=%s", upload.id)
        return 1

    return _walk_claimed(session, ids, owner, now, look, record)

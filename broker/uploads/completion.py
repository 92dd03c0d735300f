"""Completion detection: where a pending upload becomes `ready`, cheaply and quickly.

An upload becomes ready (or rejected by the policy check, or expired) in exactly one place:
`finish`, called from a leased-work job's `record` step (`broker.platform.leases`), in that
upload's own transaction, which also writes its outgoing webhook event (the outbox) and gives
back the lease; the leased-work unit commits it. No transaction is open while Cloudflare is
asked: the unit reads the upload, ends the transaction, asks, then re-reads the upload and
records only if its lease is still ours.

Three signals lead to that one verification against Cloudflare: the client's `/complete` call
and Cloudflare's notification are *hints* (they only make the upload due now; `/complete` may
also verify right away when the budget has headroom, `verify_inline_and_commit`), and the
worker's own capped-exponential schedule covers silent clients. The worker's jobs:

- `verify_due`: many due uploads → one `GET /v2` listing (newest first; drafts are not listed)
  verifies them all at once, and also completes any other pending upload that shows up in it;
  a single due upload → one `GET /v1/{id}`;
- `expire_due`: past `expires_at` + grace and still a draft → `expired`, and the draft is
  deleted upstream; `delete_drafts_due` retries the deletions that were postponed.

A due check waits up to `VERIFY_BATCH_WINDOW` seconds (counted from when the oldest due upload
became due) so that the hints arriving meanwhile share its call: the number of calls follows
the number of windows, not of uploads. Every call is made at background priority through the
shared budget, and all workers together make at most one per interval (`listing_interval`: 2 s
with headroom, up to 30 s when the budget is scarce): the worker that takes the shared turn
(`leases.take_turn`) verifies every due upload, the others wait for the next turn. While the
interval is shorter than CHECK_BASE, every pending upload not checked within it is due too, so
a listing per interval covers them all; the schedule is what remains when it is scarce.

Nothing here commits or rolls back: the leased-work unit does, between the steps above.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar, cast

import sqlalchemy as sa

from broker.platform import leases
from broker.platform.config import Settings
from broker.platform.db import Session, in_chunks, utcnow
from broker.platform.wakeup import notify_worker
from broker.uploads import lifecycle
from broker.uploads.models import Upload, UploadStatus, VerifyTurn
from broker.uploads.profiles import Profile, Violation, profiles_of, violation
from broker.upstream.cloudflare import (
    CloudflareImages,
    CloudflareNotFound,
    Image,
    ImagePage,
    Priority,
    UpstreamError,
)

log = logging.getLogger("broker.completion")

A = TypeVar("A")
Q = TypeVar("Q")

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
    if upload.status != UploadStatus.PENDING:
        return False
    now = now or utcnow()
    if upload.next_check_at is None or upload.next_check_at > now:
        upload.next_check_at = now
    notify_worker()
    return True


def client_completed(upload: Upload, checked: int | None) -> None:
    """Note the client's first `/complete`, made after `checked` checks: those counted from
    there on say its file is late (the ones before, while a person picked it, do not)."""
    if upload.checks_before_complete is None:
        upload.checks_before_complete = checked or 0


def checks_since_completed(upload: Upload) -> int:
    """Return how many checks found no file since the client's first `/complete`."""
    return max(0, (upload.check_attempts or 0) - (upload.checks_before_complete or 0))


def hint_all(session: Session, *, now: datetime | None = None) -> int:
    """Make every pending upload due now (a notification said some upload finished)."""
    now = now or utcnow()
    result = session.execute(
        sa.update(Upload)
        .where(
            Upload.status == UploadStatus.PENDING,
            Upload.expires_at > now,
            sa.or_(Upload.next_check_at.is_(None), Upload.next_check_at > now),
        )
        .values(next_check_at=now)
        .execution_options(synchronize_session=False)
    )
    notify_worker()
    return int(getattr(result, "rowcount", 0) or 0)


# -- profile checks on the original -----------------------------------------------------------


def policy_problem(data: bytes, profile: Profile) -> Violation | None:
    """Return the rule of `profile` the original breaks (decoding it), or None."""
    if profile.max_bytes and len(data) > profile.max_bytes:
        return violation(profile, len(data), None, None)
    if not profile.checks_original:
        return None
    fmt, size = _sniff(data)
    return violation(profile, len(data), fmt, size)


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


@dataclass(frozen=True)
class Arrival:
    """What Cloudflare showed of one upload's image, and what the profile check found."""

    image: Image
    # The rule of the upload's profile the original breaks (the image is then deleted upstream).
    problem: Violation | None = None
    # The image was deleted upstream before its original could be checked.
    vanished: bool = False
    # The profile it was checked against (None: not checked yet).
    profile: Profile | None = None


def check_arrival(client: CloudflareImages, profile: Profile, image: Image) -> Arrival:
    """Check a completed image's original against its profile (outside any transaction),
    deleting a refused one upstream; a draft, or a profile with no rule on the original, costs
    no call."""
    if image.draft or not profile.checks_original:
        return Arrival(image, profile=profile)
    try:
        data = client.get_blob(image.id, priority=Priority.BACKGROUND)
    except CloudflareNotFound:
        return Arrival(image, vanished=True, profile=profile)
    problem = policy_problem(data, profile)
    if problem:
        with contextlib.suppress(CloudflareNotFound):
            client.delete_image(image.id, priority=Priority.BACKGROUND)
    return Arrival(image, problem, profile=profile)


def finish(session: Session, upload: Upload, arrival: Arrival, now: datetime) -> str:
    """Record a completed image: ready, or rejected or deleted by the profile check, with its
    webhook event in the same transaction; return the new status. In replace mode a ready
    image schedules the user's previous ones of that profile for deletion after the grace."""
    if arrival.vanished:
        lifecycle.mark_deleted(session, upload, now=now)
    elif arrival.problem:
        problem = arrival.problem
        rule = {"rule": problem.rule, "measured": problem.measured, "limit": problem.limit}
        lifecycle.mark_rejected(session, upload, problem.reason, now=now, rule=rule)
        log.info("upload rejected id=%s: %s", upload.id, problem.reason)
    else:
        if lifecycle.mark_ready(session, upload, arrival.image, now=now):
            profile = arrival.profile
            if profile is not None and profile.replace:
                _schedule_replacement(session, upload, profile, now)
        log.info("upload ready id=%s image=%s", upload.id, upload.image_id)
    return upload.status


def _schedule_replacement(
    session: Session, upload: Upload, profile: Profile, now: datetime
) -> None:
    """Replace mode: the user's other ready images of this profile made before `upload` are
    replaced by it (deleted upstream after the grace by `replace_due`); should a newer one be
    ready already, `upload` is the one replaced."""
    mine = (
        Upload.user_id == upload.user_id,
        Upload.profile == upload.profile,
        Upload.status == UploadStatus.READY,
        Upload.id != upload.id,
    )
    newer = session.scalar(
        sa.select(Upload.id)
        .where(*mine, Upload.created_at > upload.created_at)
        .order_by(Upload.created_at.desc())
        .limit(1)
    )
    at = now + timedelta(seconds=profile.replace_grace)
    if newer is not None:
        upload.replaced_by, upload.replace_at = newer, at
        return
    session.execute(
        sa.update(Upload)
        .where(*mine, Upload.created_at <= upload.created_at, Upload.replaced_by.is_(None))
        .values(replaced_by=upload.id, replace_at=at)
        .execution_options(synchronize_session=False)
    )


def _look(client: CloudflareImages, question: Question, priority: Priority) -> Arrival | None:
    """Ask Cloudflare about one upload's image: None when it is gone upstream."""
    image_id, profile = question
    try:
        image = client.get_image(image_id, priority=priority)
    except CloudflareNotFound:
        return None
    return check_arrival(client, profile, image)


class Question(NamedTuple):
    """What the worker asks Cloudflare about one upload: its image, checked against its profile."""

    image_id: str
    profile: Profile


def _question(settings: Settings) -> Callable[[Upload], Question]:
    known = profiles_of(settings)
    return lambda upload: Question(upload.image_id, known.find(upload.profile))


@contextlib.contextmanager
def _not_now(what: str, retry: float) -> Iterator[None]:
    """Turn an upstream failure into `Postpone`: the leased uploads are tried again later."""
    try:
        yield
    except UpstreamError as exc:
        log.warning("%s postponed: %s", what, exc)
        raise leases.Postpone(exc.retry_after or retry) from None


def _delete_draft(client: CloudflareImages, image_id: str) -> float | None:
    """Delete a draft upstream; None once it is gone, else seconds until trying again."""
    try:
        client.delete_image(image_id, priority=Priority.BACKGROUND)
    except CloudflareNotFound:
        pass
    except UpstreamError as exc:
        log.info("draft %s not deleted upstream yet (%s); retrying later", image_id, exc)
        return exc.retry_after or DRAFT_DELETE_RETRY
    return None


def _reschedule(session: Session, ids: Sequence[Any], holder: str, now: datetime) -> None:
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
                Upload.lease_holder == holder,
                Upload.status == UploadStatus.PENDING,
            )
            .values(
                {
                    Upload.check_attempts: attempts + 1,
                    Upload.last_checked_at: now,
                    Upload.next_check_at: next_check,
                    **leases.released(Upload),
                }
            )
            .execution_options(synchronize_session=False)
        )


def _walk(
    session: Session,
    holder: str,
    now: datetime,
    ids: Sequence[Any],
    ask: Callable[[Q], A],
    record: Callable[[Upload, A], int],
    read: Callable[[Upload], Q],
    due: Any = Upload.next_check_at,
) -> int:
    """Take claimed uploads through the leased-work unit: `ask` about what `read` takes of each
    one with no transaction open, then `record` the answer in its own transaction; return what
    it counted. A postponed one is due again by its `due` column."""
    back_off = leases.backing_off(session, Upload, due, holder, now)
    job = leases.Job(Upload, holder, read, ask, record, back_off, POISON_RETRY)
    return leases.work_through(session, job, ids)


def _image_id(upload: Upload) -> str:
    return upload.image_id


def _claim(
    session: Session,
    holder: str,
    now: datetime,
    where: Sequence[sa.ColumnElement[bool]],
    order_by: Sequence[Any],
    limit: int,
) -> list[Any]:
    return leases.claim(
        session,
        Upload,
        where=where,
        order_by=order_by,
        limit=limit,
        holder=holder,
        now=now,
        lease_seconds=LEASE_SECONDS,
    )


# -- inline verification (the client's `/complete`) ---------------------------------------------


def has_headroom(client: CloudflareImages, settings: Settings) -> bool:
    """Tell whether one details call may be spent now, for a person waiting on `/complete`.

    Yes when the batch host carries details calls; else while the global budget is not paused
    and both its use and its pace (what the window will hold at the rate since the current or
    the previous slice of the window began, the current one counted once it holds more than
    one user's pick) stay below `COMPLETE_INLINE_BUDGET` of its limit: when creates pick up, the
    calls they will need are not spent one per upload on checks that a shared listing makes for
    all.
    """
    route = client.batch_route
    if route is not None and route.uses_batch("image_details"):
        return True
    share = settings.complete_inline_budget
    budget = client.budget
    if share <= 0:
        return False
    if budget is None:
        return True  # a client without a budget (tests, tools) spends freely
    status = budget.status()
    if status is None:
        return False  # a budget that keeps no window cannot say it has headroom
    return status.paused_for <= 0 and status.projected < status.limit * share


def verify_inline_and_commit(
    session: Session,
    client: CloudflareImages,
    settings: Settings,
    upload_id: str,
    holder: str,
    *,
    profile: Profile,
    now: datetime | None = None,
) -> bool:
    """Verify one upload now, when upstream has headroom; True when it is no longer pending.

    Leased work (`broker.platform.leases`), so it commits: the lease first, so a worker cannot
    finish the upload at the same time, then the answer of one details call, the upload's new
    state and its event together. False — nothing changed but `last_checked_at` — when there is
    no headroom, another worker holds it, Cloudflare failed or the file has not arrived: the
    caller then hints the worker as before. An upload whose `profile` has rules on the
    original is left to the worker (fetching and decoding it is background work).
    """
    if profile.checks_original or not has_headroom(client, settings):
        return False
    now = now or utcnow()
    won = _claim(
        session,
        holder,
        now,
        where=[Upload.id == upload_id, Upload.status == UploadStatus.PENDING],
        order_by=[Upload.id],
        limit=1,
    )

    def ask(question: Question) -> Arrival | None:
        try:
            return _look(client, question, Priority.INTERACTIVE)
        except UpstreamError as exc:
            log.info("inline verification of %s skipped: %s", upload_id, exc)
            return None

    def record(upload: Upload, seen: Arrival | None) -> int:
        if seen is None or seen.image.draft:
            if seen is not None:
                upload.last_checked_at = now
                # Counted like the worker's checks: `/complete`'s Retry-After grows with it.
                upload.check_attempts = (upload.check_attempts or 0) + 1
            leases.release(upload)
            return 0
        finish(session, upload, seen, now)
        return 1

    return _walk(session, holder, now, won, ask, record, _question(settings)) > 0


# -- the worker's jobs -------------------------------------------------------------------------


def _grace(settings: Settings) -> timedelta:
    return timedelta(seconds=settings.expiry_grace)


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
    status = client.budget.status() if client.budget is not None else None
    if status is None:
        return LIST_EVERY_MIN
    left = status.background_left
    if status.paused_for > 0 or left <= 0:
        return float(CHECK_CAP)
    return min(float(CHECK_CAP), max(LIST_EVERY_MIN, status.window / left))


def listing_turn_free(session: Session, now: datetime) -> bool:
    """Tell whether the shared turn may be taken at `now` (a read; `leases.take_turn` decides)."""
    next_at = session.scalar(sa.select(VerifyTurn.next_at).where(VerifyTurn.name == LISTING_TURN))
    return next_at is None or next_at <= now


def verify_due(
    session: Session,
    client: CloudflareImages,
    settings: Settings,
    holder: str,
    *,
    now: datetime | None = None,
) -> int:
    """Worker job: verify the uploads that are due (leased work, committing as it goes);
    return how many changed state."""
    now = now or utcnow()
    # One verification call per interval for all workers: whoever takes the turn claims every
    # due upload (the others find nothing left to do until the next turn).
    if not listing_turn_free(session, now):
        return 0
    pending = [
        Upload.status == UploadStatus.PENDING,
        Upload.expires_at > now - _grace(settings),
    ]
    scheduled = [*pending, Upload.next_check_at <= now]
    window = timedelta(seconds=settings.verify_batch_window)
    oldest = session.scalar(
        sa.select(sa.func.min(Upload.next_check_at)).where(
            *scheduled, leases.claimable(Upload, now)
        )
    )
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
    if oldest is None or now - oldest < window:
        return 0
    turn = cast(sa.Table, VerifyTurn.__table__)
    if not leases.take_turn(session, turn, LISTING_TURN, holder, now, interval):
        return 0
    ids = _claim(session, holder, now, due, [Upload.next_check_at, Upload.id], CLAIM_LIMIT)
    if len(ids) > 1:
        return _verify_listing(session, client, settings, holder, ids, now)
    return _verify_each(session, client, settings, holder, ids, now)


def _verify_each(
    session: Session,
    client: CloudflareImages,
    settings: Settings,
    holder: str,
    ids: Sequence[Any],
    now: datetime,
) -> int:
    """Verify claimed uploads one details call each; return how many changed state."""

    def ask(question: Question) -> Arrival | None:
        with _not_now(f"verification of {question.image_id}", 10):
            return _look(client, question, Priority.BACKGROUND)

    def record(upload: Upload, seen: Arrival | None) -> int:
        if seen is None:
            # Gone upstream before it was ever completed: nothing will arrive any more.
            return int(lifecycle.mark_expired(session, upload, now=now))
        if seen.image.draft:
            _reschedule(session, [upload.id], holder, now)
            return 0
        finish(session, upload, seen, now)
        return 1

    return _walk(session, holder, now, ids, ask, record, _question(settings))


def _verify_listing(
    session: Session,
    client: CloudflareImages,
    settings: Settings,
    holder: str,
    ids: Sequence[Any],
    now: datetime,
) -> int:
    """Verify claimed uploads with one listing; return how many changed state."""
    back_off = leases.backing_off(session, Upload, Upload.next_check_at, holder, now)

    def ask() -> ImagePage:
        with _not_now("batched verification", 10):
            return client.list_images_v2(
                per_page=LIST_PER_PAGE, sort_order="desc", priority=Priority.BACKGROUND
            )

    page = leases.ask_for_all(session, ids, ask, back_off)
    if page is None:
        return 0
    found = {image.id: image for image in page.images}
    # With more pages, only images uploaded after the page's last one are known to be listed.
    covered_since = None
    if page.continuation_token and page.images:
        covered_since = min((i.uploaded for i in page.images if i.uploaded), default=None)
    # Other pending uploads completed meanwhile show up too: take them now, at no extra cost.
    claimed = list(ids)
    for chunk in in_chunks(list(found)):
        claimed += _claim(
            session,
            holder,
            now,
            [
                Upload.status == UploadStatus.PENDING,
                Upload.image_id.in_(chunk),
                Upload.id.notin_(list(ids)),
            ],
            [Upload.id],
            len(chunk),
        )

    def sort() -> tuple[list[Any], list[Any]]:
        """Reschedule those the listing showed as drafts (or not at all) in one statement per
        IN list; return those it showed complete, and those it may not have covered."""
        shown: list[Any] = []
        unsure: list[Any] = []
        not_shown: list[Any] = []
        for chunk in in_chunks(claimed):
            for row in session.scalars(sa.select(Upload).where(Upload.id.in_(chunk))).all():
                if row.lease_holder != holder or row.status != UploadStatus.PENDING:
                    continue
                image = found.get(row.image_id)
                if image is not None and not image.draft:
                    shown.append(row.id)
                elif covered_since is not None and row.created_at < covered_since:
                    unsure.append(row.id)
                else:
                    not_shown.append(row.id)
        # Beyond MAX_SINGLE_CHECKS, uncovered ones wait for their next check too.
        _reschedule(session, [*not_shown, *unsure[MAX_SINGLE_CHECKS:]], holder, now)
        return shown, unsure[:MAX_SINGLE_CHECKS]

    shown, unsure = leases.record_all(session, sort)

    known = profiles_of(settings)

    def read(upload: Upload) -> Arrival | None:
        if upload.status != UploadStatus.PENDING:
            return None
        return Arrival(found[upload.image_id], profile=known.find(upload.profile))

    def arrive(arrival: Arrival) -> Arrival:
        assert arrival.profile is not None  # read always sets it
        with _not_now(f"verification of {arrival.image.id}", 10):
            return check_arrival(client, arrival.profile, arrival.image)

    def record(upload: Upload, arrival: Arrival) -> int:
        finish(session, upload, arrival, now)
        return 1

    # Each upload is its own transaction: one that cannot be stored waits alone. With no rule
    # on originals in any profile the listing's answer is all there is to know: nothing more
    # is asked.
    ask_each = arrive if known.any_checks_original else None
    job = leases.Job(Upload, holder, read, ask_each, record, back_off, POISON_RETRY)
    changed = leases.work_through(session, job, shown)
    return changed + _verify_each(session, client, settings, holder, unsure, now)


def delete_drafts_due(
    session: Session,
    client: CloudflareImages,
    holder: str,
    *,
    now: datetime | None = None,
    limit: int = 50,
) -> int:
    """Worker job: delete upstream the expired drafts whose deletion was postponed (leased
    work, committing each); return how many are gone."""
    now = now or utcnow()
    ids = _claim(
        session,
        holder,
        now,
        [Upload.draft_delete_at.is_not(None), Upload.draft_delete_at <= now],
        [Upload.draft_delete_at, Upload.id],
        limit,
    )

    def record(upload: Upload, retry: float | None) -> int:
        upload.draft_delete_at = None if retry is None else now + timedelta(seconds=max(1, retry))
        leases.release(upload)
        return int(retry is None)

    def delete(image_id: str) -> float | None:
        return _delete_draft(client, image_id)

    return _walk(session, holder, now, ids, delete, record, _image_id)


def expire_due(
    session: Session,
    client: CloudflareImages,
    settings: Settings,
    holder: str,
    *,
    now: datetime | None = None,
    limit: int = 50,
    upload_id: str | None = None,
) -> int:
    """Worker job: expire uploads still drafts past `expires_at` + grace, deleting the draft
    (best effort; leased work, committing each); return how many expired.

    With `upload_id` (a client's `/complete` after its URL expired): that one upload, with no
    grace, since its client says its file was sent.
    """
    now = now or utcnow()
    where = [Upload.status == UploadStatus.PENDING, Upload.expires_at <= now - _grace(settings)]
    if upload_id is not None:
        where = [Upload.status == UploadStatus.PENDING, Upload.id == upload_id]
        where.append(Upload.expires_at <= now)
    ids = _claim(session, holder, now, where, [Upload.expires_at, Upload.id], limit)

    def look(question: Question) -> tuple[Arrival | None, float | None]:
        """The image (None: gone) and, for a draft whose deletion failed, when to retry it."""
        with _not_now(f"expiry of {question.image_id}", 30):
            seen = _look(client, question, Priority.BACKGROUND)
        if seen is not None and seen.image.draft:
            return seen, _delete_draft(client, question.image_id)
        return seen, None

    def record(upload: Upload, answer: tuple[Arrival | None, float | None]) -> int:
        seen, retry_delete = answer
        if retry_delete is not None:
            upload.draft_delete_at = now + timedelta(seconds=max(1.0, retry_delete))
        if seen is not None and not seen.image.draft:
            # The file arrived at the last moment: that is a completion, not an expiry.
            finish(session, upload, seen, now)
        else:
            lifecycle.mark_expired(session, upload, now=now)
            log.info("upload expired id=%s", upload.id)
        return 1

    return _walk(session, holder, now, ids, look, record, _question(settings))


def replace_due(
    session: Session,
    client: CloudflareImages,
    holder: str,
    *,
    now: datetime | None = None,
    limit: int = 50,
) -> int:
    """Worker job: delete upstream the replaced images whose grace is over and mark each
    replaced (`upload.replaced`; leased work, committing each); return how many went."""
    now = now or utcnow()
    ids = _claim(
        session,
        holder,
        now,
        [
            Upload.status == UploadStatus.READY,
            Upload.replace_at.is_not(None),
            Upload.replace_at <= now,
        ],
        [Upload.replace_at, Upload.id],
        limit,
    )

    def delete(image_id: str) -> None:
        # Gone already is what we want.
        with (
            _not_now(f"replacement of {image_id}", DRAFT_DELETE_RETRY),
            contextlib.suppress(CloudflareNotFound),
        ):
            client.delete_image(image_id, priority=Priority.BACKGROUND)

    def record(upload: Upload, _: None) -> int:
        return int(lifecycle.mark_replaced(session, upload, now=now))

    return _walk(session, holder, now, ids, delete, record, _image_id, Upload.replace_at)

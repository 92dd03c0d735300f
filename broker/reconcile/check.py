"""The steps of a reconciliation: list the account, plan against the database, confirm with
Cloudflare, apply (nothing here commits; `broker.reconcile.run` strings the steps together)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, TypeVar

import sqlalchemy as sa

from broker.auth.models import User
from broker.platform.db import Session, in_chunks
from broker.reconcile.models import ReconcileReport
from broker.uploads import lifecycle
from broker.uploads.models import Upload, UploadStatus
from broker.upstream.budget import BudgetExhausted
from broker.upstream.cloudflare import (
    CloudflareImages,
    CloudflareNotFound,
    CloudflareRateLimited,
    Image,
    ImagePage,
    Priority,
    UpstreamError,
)

T = TypeVar("T")
# A call that failed after the client's own retries is asked again this many times in all.
TRIES = 3
# Pending drafts asked about in one pass (each is one details call).
MAX_DRAFTS = 200
# Ids kept per kind in a report's details.
DETAILS = 25
Mode = Literal["adopt", "delete"]


class NotNow(Exception):
    """The budget is spent (or Cloudflare said 429): the pass ends here, reported."""


def _patiently(call: Callable[[], T]) -> T:
    """Make an upstream call, asking again after a failure; NotNow when told not now."""
    for attempt in range(TRIES):
        try:
            return call()
        except (BudgetExhausted, CloudflareRateLimited) as exc:
            raise NotNow(f"upstream budget spent: retry after {exc.retry_after or 0:.0f}s") from exc
        except CloudflareNotFound:
            raise
        except UpstreamError:
            if attempt == TRIES - 1:
                raise
    raise AssertionError("unreachable")


@dataclass
class Listing:
    """Every image Cloudflare listed, and whether the walk reached the end."""

    images: dict[str, Image] = field(default_factory=dict)
    complete: bool = False
    problem: str | None = None


def list_account(client: CloudflareImages, *, per_page: int = 1000) -> Listing:
    """Walk Cloudflare's v2 listing to its end (continuation tokens), as background work."""
    listing = Listing()
    token: str | None = None

    def page_after(after: str | None) -> Callable[[], ImagePage]:
        return lambda: client.list_images_v2(
            continuation_token=after, per_page=per_page, priority=Priority.BACKGROUND
        )

    try:
        while True:
            page = _patiently(page_after(token))
            listing.images.update((image.id, image) for image in page.images)
            token = page.continuation_token
            if not token:
                listing.complete = True
                return listing
    except NotNow as exc:
        listing.problem = str(exc)
    except UpstreamError as exc:
        listing.problem = f"listing failed: {exc}"
    return listing


@dataclass
class Plan:
    """What the listing and the database disagree on, before Cloudflare confirms it."""

    orphans: list[tuple[int, Image]] = field(default_factory=list)  # (owner's user id, image)
    ready_missing: list[tuple[str, str]] = field(default_factory=list)  # (upload id, image id)
    drafts: list[tuple[str, str]] = field(default_factory=list)
    too_recent: int = 0


def plan(session: Session, listing: Listing, *, grace: float, now: datetime) -> Plan:
    """Compare the listing with the database (reads only)."""
    cutoff = now - timedelta(seconds=grace)
    result = Plan()
    listed = list(listing.images)
    known: set[str] = set()
    for chunk in in_chunks(listed):
        known.update(session.scalars(sa.select(Upload.image_id).where(Upload.image_id.in_(chunk))))
    unknown = [listing.images[i] for i in listed if i not in known]
    creators = sorted({image.creator for image in unknown if image.creator})
    owners: dict[str, int] = {}
    for chunk in in_chunks(creators):
        rows = session.execute(
            sa.select(User.public_id, User.id).where(
                User.public_id.in_(chunk), User.active.is_(True)
            )
        )
        owners.update((public_id, user_id) for public_id, user_id in rows)
    for image in unknown:
        if image.creator not in owners:
            continue  # another app's image, or an erased user's: not ours to judge
        if image.uploaded is None or image.uploaded > cutoff:
            result.too_recent += 1
            continue
        result.orphans.append((owners[image.creator], image))
    if listing.complete:
        ready = session.execute(
            sa.select(Upload.id, Upload.image_id).where(
                Upload.status == UploadStatus.READY, Upload.status_changed_at <= cutoff
            )
        )
        result.ready_missing = [(uid, iid) for uid, iid in ready if iid not in listing.images]
    drafts = session.execute(
        sa.select(Upload.id, Upload.image_id)
        .where(Upload.status == UploadStatus.PENDING, Upload.created_at <= cutoff)
        .order_by(Upload.created_at)
        .limit(MAX_DRAFTS)
    )
    result.drafts = [(upload_id, image_id) for upload_id, image_id in drafts]
    return result


@dataclass
class Confirmed:
    """What Cloudflare said about each candidate of a plan."""

    gone: set[str] = field(default_factory=set)  # upload ids whose image is not found
    orphans_deleted: set[str] = field(default_factory=set)  # image ids
    problem: str | None = None


def _gone(client: CloudflareImages, image_id: str) -> bool:
    try:
        _patiently(lambda: client.get_image(image_id, priority=Priority.BACKGROUND))
    except CloudflareNotFound:
        return True
    return False


def _delete(client: CloudflareImages, image_id: str) -> None:
    with contextlib.suppress(CloudflareNotFound):  # gone already is what we want
        _patiently(lambda: client.delete_image(image_id, priority=Priority.BACKGROUND))


def confirm(client: CloudflareImages, planned: Plan, *, delete_orphans: bool) -> Confirmed:
    """Ask Cloudflare about each candidate (and delete orphans when told to)."""
    confirmed = Confirmed()
    try:
        for upload_id, image_id in [*planned.ready_missing, *planned.drafts]:
            try:
                if _gone(client, image_id):
                    confirmed.gone.add(upload_id)
            except UpstreamError as exc:  # left for the next pass
                confirmed.problem = f"details of {image_id} failed: {exc}"
        if delete_orphans:
            for _, image in planned.orphans:
                try:
                    _delete(client, image.id)
                    confirmed.orphans_deleted.add(image.id)
                except UpstreamError as exc:
                    confirmed.problem = f"deleting {image.id} failed: {exc}"
    except NotNow as exc:
        confirmed.problem = str(exc)
    return confirmed


def apply(
    session: Session,
    report: ReconcileReport,
    planned: Plan,
    confirmed: Confirmed,
    *,
    mode: Mode,
    now: datetime,
) -> None:
    """Record what was confirmed (unless a dry run), and count it all in `report`."""
    details: dict[str, list[str]] = {"orphans": [i.id for _, i in planned.orphans][:DETAILS]}
    report.orphans = len(planned.orphans)
    report.too_recent = planned.too_recent
    gone_ready = [u for u, _ in planned.ready_missing if u in confirmed.gone]
    gone_drafts = [u for u, _ in planned.drafts if u in confirmed.gone]
    details["ready_gone"] = gone_ready[:DETAILS]
    details["drafts_gone"] = gone_drafts[:DETAILS]
    report.details = details
    report.ready_gone = len(gone_ready)
    report.drafts_gone = len(gone_drafts)
    if mode == "delete":
        report.orphans_deleted = len(confirmed.orphans_deleted)
    if report.dry_run:
        return
    for upload_id, was in [(u, UploadStatus.READY) for u in gone_ready] + [
        (u, UploadStatus.PENDING) for u in gone_drafts
    ]:
        upload = session.get(Upload, upload_id)
        if upload is not None and upload.status == was:  # unchanged since the plan
            lifecycle.mark_deleted(session, upload, now=now)
    if mode == "adopt":
        report.adopted = sum(_adopt(session, owner, image, now) for owner, image in planned.orphans)


def _adopt(session: Session, owner: int, image: Image, now: datetime) -> int:
    """Record an orphan as its creator's ready upload (with its `upload.completed` event)."""
    if session.scalar(sa.select(Upload.id).where(Upload.image_id == image.id)) is not None:
        return 0  # recorded meanwhile (its create answer arrived after all)
    moment = image.uploaded or now
    upload = Upload(
        user_id=owner,
        image_id=image.id,
        status=UploadStatus.PENDING,
        require_signed_urls=image.require_signed_urls,
        meta=image.meta or None,
        created_at=moment,
        expires_at=moment,
        status_changed_at=moment,
        check_attempts=0,
    )
    session.add(upload)
    session.flush()
    lifecycle.mark_ready(session, upload, image, now=now)
    return 1


def latest(session: Session) -> ReconcileReport | None:
    """Return the newest report."""
    return session.scalar(sa.select(ReconcileReport).order_by(ReconcileReport.id.desc()).limit(1))

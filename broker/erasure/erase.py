"""Ask for an account's erasure, and work it through (in the caller's session; the commits are
the leased-work unit's, `broker.platform.leases`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa

from broker.audit import log as audit
from broker.audit.models import AuditRecord
from broker.auth import passwords, users
from broker.auth.models import User
from broker.erasure.models import Erasure, ErasureStatus
from broker.platform import leases
from broker.platform.db import Session, utcnow
from broker.uploads import lifecycle
from broker.uploads.models import Upload
from broker.upstream.budget import BudgetExhausted
from broker.upstream.cloudflare import (
    CloudflareImages,
    CloudflareNotFound,
    CloudflareRateLimited,
    Priority,
    UpstreamError,
)
from broker.webhooks import outbox
from broker.webhooks.models import WebhookEvent

T = TypeVar("T")

# Images deleted per turn of one erasure: a turn holds its lease while it deletes.
BATCH = 50
# After a turn in which Cloudflare failed some deletions, wait this long before the next.
RETRY_FAILED = 5.0
ERASED = "[erased]"
# The fields of old audit entries that may name the person.
PERSONAL = ("username", "email", "external_subject")


def _erased_subject(issuer: str, subject: str) -> str:
    """What an erased account keeps of its external id: enough to find it again, not the id."""
    return "erased:" + hashlib.sha256(f"{issuer}\n{subject}".encode()).hexdigest()[:40]


def find_erased(session: Session, issuer: str, subject: str) -> User | None:
    """Return the erased account that had `subject` at `issuer`, or None."""
    return session.scalar(
        sa.select(User).where(
            User.external_issuer == issuer,
            User.external_subject == _erased_subject(issuer, subject),
        )
    )


def erasure_of(session: Session, user: User) -> Erasure | None:
    """Return the account's erasure, if one was asked for."""
    return session.scalar(sa.select(Erasure).where(Erasure.user_id == user.id))


def request_erasure(
    session: Session, user: User, *, now: datetime | None = None
) -> tuple[Erasure, bool]:
    """Lock the account out, remove its personal fields and queue its images' deletion;
    return the erasure and whether it is new (asking again changes nothing)."""
    existing = erasure_of(session, user)
    if existing is not None:
        return existing, False
    now = now or utcnow()
    before = {"active": user.active, "erased": False}
    old_actor = f"user:{user.public_id} ({user.username})"
    users.deactivate(session, user)  # sessions ended, remember-me cookies and tokens revoked
    user.username = "erased"
    user.username_key = f"erased:{user.public_id}"
    user.email = None
    user.password_hash = passwords.NO_PASSWORD
    if user.external_issuer is not None and user.external_subject is not None:
        user.external_subject = _erased_subject(user.external_issuer, user.external_subject)
    _scrub_audit(session, user.public_id, old_actor)
    _scrub_events(session, user.id)
    erasure = Erasure(
        user_id=user.id,
        public_id=user.public_id,
        requested_at=now,
        requested_by=audit.current_actor(),
        status=ErasureStatus.PENDING,
        images_deleted=0,
        failures=0,
        next_at=now,
    )
    session.add(erasure)
    audit.record(
        session,
        "user.erasure_requested",
        user.public_id,
        before=before,
        after={"active": False, "erased": True},
        now=now,
    )
    return erasure, True


def _scrub_audit(session: Session, public_id: str, old_actor: str) -> None:
    """Remove the person's name and address from the audit entries about them or by them."""
    for entry in session.scalars(sa.select(AuditRecord).where(AuditRecord.target == public_id)):
        for side in ("before", "after"):
            fields = getattr(entry, side)
            if fields and any(name in fields for name in PERSONAL):
                setattr(entry, side, {k: ERASED if k in PERSONAL else v for k, v in fields.items()})
    session.execute(
        sa.update(AuditRecord)
        .where(AuditRecord.actor == old_actor)
        .values(actor=f"user:{public_id}")
        .execution_options(synchronize_session=False)
    )


def _scrub_events(session: Session, user_id: int) -> None:
    """Clear what named the person's files (filename, metadata) from the webhook events about
    their uploads, sent or still queued: a delivery still to come goes out without them, as the
    upload itself then shows (`lifecycle.mark_erased`)."""
    theirs = sa.select(Upload.id).where(Upload.user_id == user_id)
    for event in session.scalars(sa.select(WebhookEvent).where(WebhookEvent.subject.in_(theirs))):
        payload = json.loads(event.payload)
        upload = payload.get("data", {}).get("upload")
        if isinstance(upload, dict) and (
            upload.get("filename") is not None or upload.get("metadata")
        ):
            upload.update(filename=None, metadata={})
            event.payload = json.dumps(payload, separators=(",", ":"), sort_keys=True)


# --- the worker's job ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """What one turn of an erasure deletes: upload rows' images, or (none left) a sweep of
    what Cloudflare still lists under the account's `creator`."""

    public_id: str
    uploads: list[tuple[str, str]] = field(default_factory=list)

    @property
    def sweep(self) -> bool:
        """Whether this turn asks Cloudflare's listing instead of the upload rows."""
        return not self.uploads


@dataclass
class Outcome:
    """What Cloudflare answered in one turn."""

    gone: list[str] = field(default_factory=list)  # upload ids whose image is gone
    swept: int = 0  # images found by the listing and deleted
    failed: int = 0
    wait: float | None = None  # the budget or Cloudflare said not now (seconds)


def _read(session: Session, erasure: Erasure) -> Turn | None:
    if erasure.status == ErasureStatus.DONE:
        return None
    rows = session.execute(
        sa.select(Upload.id, Upload.image_id)
        .where(Upload.user_id == erasure.user_id, Upload.status != lifecycle.DELETED)
        .order_by(Upload.id)
        .limit(BATCH)
    ).all()
    return Turn(erasure.public_id, [(row.id, row.image_id) for row in rows])


def _upstream(outcome: Outcome, call: Callable[[], T]) -> T | None:
    """Make one upstream call; None when it failed (counted) or was told not now (the wait)."""
    try:
        return call()
    except (BudgetExhausted, CloudflareRateLimited) as exc:
        outcome.wait = exc.retry_after or RETRY_FAILED
    except UpstreamError:
        outcome.failed += 1
    return None


def _delete(client: CloudflareImages, image_id: str, outcome: Outcome) -> bool:
    """Delete one image; True when it is gone (now, or already before)."""

    def call() -> bool:
        with contextlib.suppress(CloudflareNotFound):  # gone already is what we want
            client.delete_image(image_id, priority=Priority.BACKGROUND)
        return True

    return _upstream(outcome, call) is not None


def _listed(client: CloudflareImages, creator: str) -> list[str]:
    return [i.id for i in client.iter_images_v2(creator=creator, priority=Priority.BACKGROUND)]


def _ask(client: CloudflareImages, turn: Turn) -> Outcome:
    outcome = Outcome()
    if turn.sweep:
        # No row left: what Cloudflare still lists under the account goes too.
        listed = _upstream(outcome, lambda: _listed(client, turn.public_id)) or []
        work: list[tuple[str | None, str]] = [(None, image_id) for image_id in listed]
    else:
        work = list(turn.uploads)
    for upload_id, image_id in work:
        if _delete(client, image_id, outcome):
            if upload_id is None:
                outcome.swept += 1
            else:
                outcome.gone.append(upload_id)
        if outcome.wait is not None:
            break
    return outcome


def _record(session: Session, erasure: Erasure, turn: Turn, outcome: Outcome, now: datetime) -> int:
    """Mark the gone uploads deleted; finish the erasure once the listing found nothing left."""
    leases.release(erasure)
    for upload in session.scalars(sa.select(Upload).where(Upload.id.in_(outcome.gone))):
        lifecycle.mark_erased(session, upload, now=now)
    erasure.images_deleted += len(outcome.gone) + outcome.swept
    erasure.failures += outcome.failed
    if outcome.wait is not None:
        erasure.next_at = now + timedelta(seconds=max(1.0, outcome.wait))
        return len(outcome.gone)
    if outcome.failed:
        erasure.next_at = now + timedelta(seconds=RETRY_FAILED)
        return len(outcome.gone)
    if not turn.sweep or outcome.swept:
        erasure.next_at = now  # more to do: the next pass goes on (the listing is asked again)
        return len(outcome.gone) + outcome.swept
    _finish(session, erasure, now)
    return 1


def _finish(session: Session, erasure: Erasure, now: datetime) -> None:
    # Again: an upload of theirs that settled after the ask wrote its event since (a delivery
    # of it made before this turn carried its name: uploads still emit for an erased owner).
    _scrub_events(session, erasure.user_id)
    erasure.status = ErasureStatus.DONE
    erasure.completed_at = now
    erasure.next_at = None
    outbox.emit(
        session,
        "user.erased",
        {
            "user": {
                "id": erasure.public_id,
                "images_deleted": erasure.images_deleted,
                "requested_at": outbox.iso(erasure.requested_at),
                "completed_at": outbox.iso(now),
            }
        },
        subject=erasure.public_id,
        now=now,
    )
    audit.record(
        session,
        "user.erased",
        erasure.public_id,
        after={"images_deleted": erasure.images_deleted},
        actor="worker",
        now=now,
    )


def erase_due(
    session: Session,
    client: CloudflareImages,
    holder: str,
    *,
    lease_seconds: int,
    now: datetime | None = None,
    stop: threading.Event | None = None,
    limit: int = 10,
) -> int:
    """Take one turn of each due erasure (claimed for `lease_seconds`); return what changed."""
    now = now or utcnow()
    ids = leases.claim(
        session,
        Erasure,
        where=[Erasure.status == ErasureStatus.PENDING, Erasure.next_at <= now],
        order_by=[Erasure.next_at, Erasure.id],
        limit=limit,
        holder=holder,
        now=now,
        lease_seconds=lease_seconds,
    )
    if not ids:
        return 0
    turns: dict[int, Turn] = {}

    def read(erasure: Erasure) -> Turn | None:
        turn = _read(session, erasure)
        if turn is not None:
            turns[erasure.id] = turn
        return turn

    def record(erasure: Erasure, outcome: Outcome) -> int:
        return _record(session, erasure, turns[erasure.id], outcome, now)

    def ask(turn: Turn) -> Any:
        return _ask(client, turn)

    job: leases.Job[Turn, Outcome] = leases.Job(
        model=Erasure,
        holder=holder,
        read=read,
        ask=ask,
        record=record,
        back_off=leases.backing_off(session, Erasure, Erasure.next_at, holder, now),
        retry_broken=RETRY_FAILED,
    )
    return leases.work_through(session, job, ids, stop=stop)

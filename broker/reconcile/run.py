"""One reconciliation pass, step by step, each database step its own transaction: the one
unit of work of this package (it commits between the steps, so no transaction is open while
Cloudflare answers; listed as an owner in tests/platform/test_transaction_rule.py)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import cast

import sqlalchemy as sa

from broker.audit import log as audit
from broker.platform import leases
from broker.platform.config import Settings
from broker.platform.db import Session, utcnow
from broker.reconcile import check
from broker.reconcile.models import ReconcileReport
from broker.uploads.models import VerifyTurn
from broker.upstream.cloudflare import CloudflareImages

log = logging.getLogger("broker.reconcile")


def reconcile(
    session: Session,
    client: CloudflareImages,
    settings: Settings,
    *,
    dry_run: bool = False,
    per_page: int = 1000,
    now: datetime | None = None,
    actor: str | None = None,
) -> ReconcileReport:
    """Walk the account's listing, compare it with the database, fix what Cloudflare confirms
    (unless `dry_run`), and store and return the report."""
    now = now or utcnow()
    session.commit()  # whatever the caller read: nothing stays open while Cloudflare answers
    listing = check.list_account(client, per_page=per_page)
    planned = check.plan(session, listing, grace=settings.reconcile_grace, now=now)
    session.commit()
    mode = settings.reconcile_orphans
    confirmed = check.confirm(client, planned, delete_orphans=mode == "delete" and not dry_run)
    report = ReconcileReport(
        started_at=now,
        dry_run=dry_run,
        complete=listing.complete,
        listed=len(listing.images),
        adopted=0,
        orphans_deleted=0,
        problem=(listing.problem or confirmed.problem or None),
    )
    session.add(report)
    try:
        check.apply(session, report, planned, confirmed, mode=mode, now=now)
        report.finished_at = utcnow()
        if not dry_run:
            audit.record(
                session, "reconcile.applied", None, after=report.counts(), actor=actor, now=now
            )
        session.commit()
    except BaseException:
        session.rollback()
        raise
    if report.problem:
        log.warning("reconciliation ended early or incomplete: %s", report.problem)
    return report


def _due(session: Session, name: str, holder: str, now: datetime, every: float) -> bool:
    """Take the shared turn `name` when due (one worker of many wins it); commit. The first
    turn comes one interval after the first worker starts, not at once."""
    table = cast(sa.Table, VerifyTurn.__table__)
    if not every:
        return False
    if session.scalar(sa.select(table.c.name).where(table.c.name == name)) is None:
        try:
            session.execute(
                sa.insert(table).values(
                    name=name, next_at=now + timedelta(seconds=every), owner=holder
                )
            )
            session.commit()
        except sa.exc.IntegrityError:
            session.rollback()
        return False
    return leases.take_turn(session, table, name, holder, now, every)


def when_due(
    session: Session, client: CloudflareImages, settings: Settings, holder: str, now: datetime
) -> int:
    """The worker's job: refresh the usage and reconcile when their turns come; return what
    changed."""
    from broker.reconcile import usage

    done = 0
    if _due(session, "usage", holder, now, settings.usage_interval):
        usage.refresh(session, client, warn_ratio=settings.usage_warn_ratio, now=now)
        session.commit()
        done += 1
    if _due(session, "reconcile", holder, now, settings.reconcile_interval):
        report = reconcile(session, client, settings, now=now, actor="worker")
        done += report.adopted + report.orphans_deleted + report.ready_gone + report.drafts_gone
    return done

"""What an operator watches beyond the features' own gauges: how far the background work lags,
and whether each worker is alive.

`broker_work_overdue_seconds{queue=…}` is how long the most overdue item of a queue has been
due and not yet done — a completion check of a pending upload (`completion`), an outgoing
webhook attempt (`webhook_delivery`). A healthy worker pool keeps both near the poll interval;
a value that climbs means the workers are gone, stuck or too few (the alert rules in the
operations guide, broker/OPERATIONS.md, fire on it).

`broker_worker_heartbeat_age_seconds{worker=…}` is, per worker, the seconds since its loop last
wrote its `worker_heartbeats` row (`beat`, every HEARTBEAT_EVERY seconds between jobs): a
long pass or a stuck job shows as a growing age, not only a dead process. A worker that stops
cleanly removes its row (`forget`); a killed one's row stays, ageing, until a worker starting
with the same host and process id replaces it (a restarted container) or it is FORGET_AFTER
old. `flask worker health` reads this host's rows.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import InstrumentedAttribute, Mapped, mapped_column

from broker.platform import health
from broker.platform.db import Model, Session, UTCDateTime, utcnow
from broker.uploads.models import Upload
from broker.webhooks.models import WebhookDelivery

# A worker writes its heartbeat at most this often (seconds); ages below it are normal.
HEARTBEAT_EVERY = 10.0
# A row not renewed for this long is dropped: its worker is gone for good (alerts had a day).
FORGET_AFTER = timedelta(days=1)


class WorkerHeartbeat(Model):
    """One running worker: where it runs and when its loop last came round."""

    __tablename__ = "worker_heartbeats"

    worker_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    host: Mapped[str] = mapped_column(sa.String(64), index=True)
    pid: Mapped[int] = mapped_column()
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    beat_at: Mapped[datetime] = mapped_column(UTCDateTime)


def this_host() -> str:
    """Return the name workers on this machine (or container) record as their host."""
    return socket.gethostname()[:40]


def beat(
    session: Session, worker_id: str, started_at: datetime, stale_after: float, now: datetime
) -> None:
    """Record that `worker_id`'s loop came round at `now` (the caller commits).

    Its first beat also drops the stale rows of an earlier process with this host and process
    id (a restarted container's worker), and every beat drops rows FORGET_AFTER old.
    """
    row = session.get(WorkerHeartbeat, worker_id)
    if row is None:
        session.execute(
            sa.delete(WorkerHeartbeat).where(
                WorkerHeartbeat.host == this_host(),
                WorkerHeartbeat.pid == os.getpid(),
                WorkerHeartbeat.beat_at < now - timedelta(seconds=stale_after),
            )
        )
        row = WorkerHeartbeat(
            worker_id=worker_id, host=this_host(), pid=os.getpid(), started_at=started_at
        )
        session.add(row)
    row.beat_at = now
    session.execute(sa.delete(WorkerHeartbeat).where(WorkerHeartbeat.beat_at < now - FORGET_AFTER))


def forget(session: Session, worker_id: str) -> None:
    """Remove a cleanly stopped worker's row (the caller commits)."""
    session.execute(sa.delete(WorkerHeartbeat).where(WorkerHeartbeat.worker_id == worker_id))


def heartbeat_ages(
    session: Session, now: datetime | None = None, host: str | None = None
) -> dict[str, float]:
    """Seconds since each worker's last beat (only `host`'s workers when given), youngest first."""
    now = now or utcnow()
    query = sa.select(WorkerHeartbeat.worker_id, WorkerHeartbeat.beat_at)
    if host is not None:
        query = query.where(WorkerHeartbeat.host == host)
    ages = {
        worker_id: round(max(0.0, (now - beat_at).total_seconds()), 1)
        for worker_id, beat_at in session.execute(query.order_by(WorkerHeartbeat.beat_at.desc()))
    }
    return ages


def _overdue(
    session: Session, due: InstrumentedAttribute[datetime | None], *where: sa.ColumnElement[bool]
) -> float:
    """Seconds since the earliest `due` time at or before now among the rows `where` selects."""
    now = utcnow()
    earliest = session.scalar(sa.select(sa.func.min(due)).where(*where, due <= now))
    if earliest is None:
        return 0.0
    return round(max(0.0, (now - earliest).total_seconds()), 1)


def metric_lines(session: Session) -> list[str]:
    """The overdue-work gauge (one sample per queue) and the heartbeat ages (one per worker)."""
    return health.gauge(
        "broker_work_overdue_seconds",
        "Seconds the most overdue item of a background queue has waited past its due time.",
        {
            "completion": _overdue(session, Upload.next_check_at, Upload.status == "pending"),
            "webhook_delivery": _overdue(
                session, WebhookDelivery.next_attempt_at, WebhookDelivery.status == "pending"
            ),
        },
        label="queue",
    ) + health.gauge(
        "broker_worker_heartbeat_age_seconds",
        "Seconds since each running worker's loop last wrote its heartbeat.",
        heartbeat_ages(session),
        label="worker",
    )

"""What an operator watches beyond the features' own gauges: how far the background work lags.

`broker_work_overdue_seconds{queue=…}` is how long the most overdue item of a queue has been
due and not yet done — a completion check of a pending upload (`completion`), an outgoing
webhook attempt (`webhook_delivery`). A healthy worker pool keeps both near the poll interval;
a value that climbs means the workers are gone, stuck or too few (the alert rules in the
README's operations guide fire on it).
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import InstrumentedAttribute

from broker.platform import health
from broker.platform.db import Session, utcnow
from broker.uploads.models import Upload
from broker.webhooks.models import WebhookDelivery


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
    """The `broker_work_overdue_seconds` gauge of `/metrics`, one sample per queue."""
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
    )

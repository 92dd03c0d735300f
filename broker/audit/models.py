"""Audit entries, as a typed SQLAlchemy model.

Every change here needs an Alembic migration (`flask --app broker db migrate -m "…"`);
tests fail when the migrations and the models drift apart.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from broker.platform.db import Model, UTCDateTime, utcnow


class AuditRecord(Model):
    """One administrative action: who, when, which request, what it changed (never a secret)."""

    __tablename__ = "audit_records"
    __table_args__ = (sa.Index("ix_audit_records_at", "at", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # `user:<public id> (<username>)`, `service-key:<svk_…>`, `cli:<shell user>` or `worker`.
    actor: Mapped[str] = mapped_column(sa.String(200))
    action: Mapped[str] = mapped_column(sa.String(64), index=True)
    # What was acted on: a public id (u_…, svk_…, whe_…), a key's name, a delivery id.
    target: Mapped[str | None] = mapped_column(sa.String(255))
    request_id: Mapped[str | None] = mapped_column(sa.String(64))
    before: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)

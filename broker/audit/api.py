"""`GET /api/v1/audit`: the audit log for administrators, newest first."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field

from broker.api import bp
from broker.api.spec import endpoint, example
from broker.audit import log
from broker.audit.models import AuditRecord
from broker.platform.db import db

_EXAMPLE = {
    "id": 41,
    "at": "2026-05-04T09:00:00Z",
    "actor": "user:u_3a7bd3e2360a3d29eea436fc (root)",
    "action": "user.limits_changed",
    "target": "u_9f1c2b7a6e5d4c3b2a1f0e9d",
    "request_id": "4f1c2b7a6e5d4c3b",
    "before": {"max_pending_uploads": None, "max_uploads_per_day": None},
    "after": {"max_pending_uploads": 5, "max_uploads_per_day": 100},
}


class AuditOut(BaseModel):
    """One administrative action (secrets are never part of `before` or `after`)."""

    model_config = example(_EXAMPLE)

    id: int
    at: datetime
    actor: str = Field(description="`user:<id> (<name>)`, `service-key:<id>`, `cli:<user>`.")
    action: str
    target: str | None
    request_id: str | None = Field(description="The request's X-Request-ID (or the command's).")
    before: dict[str, Any] | None
    after: dict[str, Any] | None

    @classmethod
    def of(cls, row: AuditRecord) -> Self:
        """Render an AuditRecord row."""
        return cls(
            id=row.id,
            at=row.at,
            actor=row.actor,
            action=row.action,
            target=row.target,
            request_id=row.request_id,
            before=row.before,
            after=row.after,
        )


class AuditList(BaseModel):
    """Audit entries, newest first; pass the last `id` as `before` for the next page."""

    model_config = example({"items": [_EXAMPLE]})

    items: list[AuditOut]


class AuditQuery(BaseModel):
    """Filters for the audit log."""

    model_config = ConfigDict(extra="forbid")

    action: str | None = Field(default=None, max_length=64, description="Only this action.")
    target: str | None = Field(default=None, max_length=255, description="Only this target.")
    before: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="Only entries older than this id."
    )
    limit: int = Field(default=50, ge=1, le=500, description="Entries to list.")


@endpoint(
    bp, "GET", "/audit", query=AuditQuery, responses={200: AuditList}, admin=True, tags=("admin",)
)
def list_audit(query: AuditQuery) -> AuditList:
    """List administrative actions, newest first (admins only)."""
    rows = log.recent(
        db.session,
        limit=query.limit,
        action=query.action,
        target=query.target,
        before_id=query.before,
    )
    return AuditList(items=[AuditOut.of(r) for r in rows])

"""Write and read audit entries (in the caller's session; nothing here commits)."""

from __future__ import annotations

import functools
import getpass
import secrets
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from flask import g, has_request_context
from flask_login import current_user

from broker.audit.models import AuditRecord
from broker.platform.db import Session, utcnow
from broker.platform.logs import request_id

# A field whose name holds one of these never reaches the log, whatever the caller passed:
# password hashes, token hashes, webhook secrets, signing keys' values, session tokens.
SECRET_MARKS = ("password", "hash", "secret", "token", "value", "credential")
REDACTED = "[redacted]"


def is_secret(name: str) -> bool:
    """Tell whether a field named `name` may hold a secret (and so is never stored)."""
    lowered = name.lower()
    return any(mark in lowered for mark in SECRET_MARKS)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, dict):
        return {str(k): (REDACTED if is_secret(str(k)) else _plain(v)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def snapshot(row: Any, fields: Iterable[str] | None = None) -> dict[str, Any]:
    """Return `fields` of `row` (default: every column) as JSON-ready data, secrets left out."""
    if fields is None:
        fields = [c.key for c in sa.inspect(type(row)).column_attrs]
    return {name: _plain(getattr(row, name)) for name in fields if not is_secret(name)}


@functools.cache
def _command_run_id() -> str:
    """One id per `flask` process: the entries one command writes can be told apart."""
    return "cli-" + secrets.token_hex(8)


def current_actor() -> str:
    """Say who is acting: the request's service key or user, else the shell's user."""
    if has_request_context():
        key = g.get("service_key")
        if key is not None:
            return f"service-key:{key.public_id}"
        if current_user and current_user.is_authenticated:
            return f"user:{current_user.public_id} ({current_user.username})"
        return "anonymous"
    try:
        who = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's)
        who = "unknown"
    return f"cli:{who}"


def record(
    session: Session,
    action: str,
    target: str | None,
    *,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    actor: str | None = None,
    now: datetime | None = None,
) -> AuditRecord:
    """Add one audit entry for `action` on `target` to the caller's unit of work."""
    entry = AuditRecord(
        at=now or utcnow(),
        actor=(actor or current_actor())[:200],
        action=action,
        target=None if target is None else str(target)[:255],
        request_id=request_id() if has_request_context() else _command_run_id(),
        before=_plain(before) if before is not None else None,
        after=_plain(after) if after is not None else None,
    )
    session.add(entry)
    return entry


def changed(
    session: Session, action: str, target: str | None, before: dict[str, Any], row: Any
) -> AuditRecord:
    """Record `action` with `before` and the same fields of `row` as they are now."""
    return record(session, action, target, before=before, after=snapshot(row, before.keys()))


def recent(
    session: Session,
    *,
    limit: int = 50,
    action: str | None = None,
    target: str | None = None,
    before_id: int | None = None,
) -> list[AuditRecord]:
    """Return audit entries newest first (optionally one action or target, older than an id)."""
    stmt = sa.select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit)
    if action is not None:
        stmt = stmt.where(AuditRecord.action == action)
    if target is not None:
        stmt = stmt.where(AuditRecord.target == target)
    if before_id is not None:
        stmt = stmt.where(AuditRecord.id < before_id)
    return list(session.scalars(stmt))

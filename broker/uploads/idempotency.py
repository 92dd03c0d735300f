"""`Idempotency-Key` for unsafe API requests: the first answer is stored and replayed for 24 h.

A retried request (the phone lost its connection after the broker created the upload) must
get the same upload back, not a second draft. Keys are per user. Flow:

1. `claim_and_commit` claims the key in its own committed row *before* any upstream call, so a
   second request with the same key, arriving while the first runs, is told 409;
2. a finished key with the same request fingerprint is replayed; another body is told 422;
3. `store_answer` stores the answer in the caller's transaction (with the upload row);
   `release_and_commit` drops the claim when the request failed, so the client may retry with
   the same key.

`broker.uploads.api.idempotent` wraps an API view in all of this and owns its unit of work.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from broker.auth.models import User
from broker.platform.db import Session, utcnow
from broker.platform.errors import DomainError, Refusal
from broker.uploads.models import IdempotencyKey

KEEP_FOR = timedelta(hours=24)
# A claim older than this belongs to a request that died (worker killed mid-call): no request
# lives this long (upstream timeout times retries), so it may be taken over.
ABANDONED_AFTER = timedelta(minutes=2)
MAX_KEY_LENGTH = 255
REPLAYED_HEADERS = ("Location",)


class IdempotencyError(DomainError):
    """The key cannot be used for this request: still in progress, reused, or malformed."""


@dataclass(frozen=True)
class StoredResponse:
    """A finished request's answer, to replay."""

    status: int
    body: str
    headers: dict[str, str]


def fingerprint(method: str, path: str, body: Any) -> str:
    """Hash what makes two requests 'the same': method, path and the JSON body's content."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{method.upper()} {path}\n{canonical}".encode()).hexdigest()


def check_key(key: str) -> str:
    """Validate the header's value: 1..255 printable ASCII characters."""
    if not key or len(key) > MAX_KEY_LENGTH or not all(0x20 < ord(c) < 0x7F for c in key):
        raise IdempotencyError(
            Refusal.MALFORMED,
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters.",
        )
    return key


def claim_and_commit(
    session: Session, user: User, key: str, fp: str, *, now: datetime | None = None
) -> StoredResponse | None:
    """Claim `key` for this request (committed at once), or return the answer to replay."""
    now = now or utcnow()
    check_key(key)
    user_id = user.id  # read before the rollback below expires `user`
    for _ in range(3):
        session.rollback()
        row = session.scalar(
            sa.select(IdempotencyKey).where(
                IdempotencyKey.user_id == user_id, IdempotencyKey.key == key
            )
        )
        if row is None:
            session.add(
                IdempotencyKey(
                    user_id=user_id,
                    key=key,
                    fingerprint=fp,
                    created_at=now,
                    expires_at=now + KEEP_FOR,
                )
            )
            try:
                session.commit()
                return None
            except IntegrityError:  # another request claimed it meanwhile: look again
                continue
        if row.expires_at <= now:
            session.delete(row)
            session.commit()
            continue
        if row.fingerprint != fp:
            raise IdempotencyError(
                Refusal.INVALID,
                "idempotency_key_reused",
                "This Idempotency-Key was used with a different request; use a new key.",
            )
        if row.response_status is None:
            if row.created_at > now - ABANDONED_AFTER:
                raise IdempotencyError(
                    Refusal.CONFLICT,
                    "idempotency_in_progress",
                    "A request with this Idempotency-Key is still running; retry shortly.",
                )
            claimed = session.execute(
                sa.update(IdempotencyKey)
                .where(IdempotencyKey.id == row.id, IdempotencyKey.created_at == row.created_at)
                .values(created_at=now)
            )
            session.commit()
            if cast(sa.CursorResult[Any], claimed).rowcount:
                return None
            continue
        return StoredResponse(
            row.response_status, row.response_body or "", row.response_headers or {}
        )
    raise IdempotencyError(
        Refusal.CONFLICT, "idempotency_in_progress", "This Idempotency-Key is busy; retry shortly."
    )


def store_answer(
    session: Session, user: User, key: str, status: int, body: str, headers: dict[str, str]
) -> None:
    """Store the answer with the caller's transaction (the caller commits)."""
    kept = {k: v for k, v in headers.items() if k in REPLAYED_HEADERS}
    session.execute(
        sa.update(IdempotencyKey)
        .where(IdempotencyKey.user_id == user.id, IdempotencyKey.key == key)
        .values(response_status=status, response_body=body, response_headers=kept)
    )


def release_and_commit(session: Session, user: User, key: str) -> None:
    """Drop the claim of a request that failed, so the same key may be retried (commits)."""
    user_id = user.id  # read before the rollback expires `user`
    session.rollback()
    session.execute(
        sa.delete(IdempotencyKey).where(
            IdempotencyKey.user_id == user_id,
            IdempotencyKey.key == key,
            IdempotencyKey.response_status.is_(None),
        )
    )
    session.commit()


def purge_expired(session: Session, now: datetime | None = None) -> int:
    """Delete keys past their 24 hours (the worker calls this; the caller commits)."""
    result = session.execute(
        sa.delete(IdempotencyKey).where(IdempotencyKey.expires_at <= (now or utcnow()))
    )
    return int(cast(sa.CursorResult[Any], result).rowcount or 0)

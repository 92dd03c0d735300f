"""`Idempotency-Key` on unsafe API routes: the first answer is stored and replayed for 24 h.

A retried request (the phone lost its connection after the broker created the upload) must get
the same upload back, not a second draft. Offers `@idempotent` for a view (it declares the
headers and refusals it adds to the route's OpenAPI entry), `claim_key` and `purge_expired`
(a worker job's).

Rules it enforces; keys are per user:
1. the key is claimed as a step of the request's unit of work (`broker.api.unit_of_work`),
   committed *before* the view runs and so before any upstream call: a second request with
   the same key, arriving while the first runs, is told 409 (`idempotency_in_progress`); a
   claim older than `ABANDONED_AFTER` belongs to a request that died and is taken over;
2. a finished key with the same request fingerprint (method, path, JSON body) is replayed with
   `Idempotent-Replayed: true`; another request with it is told 422 (`idempotency_key_reused`);
3. the view's answer is stored in the request's own transaction (with the upload row); when
   the request fails, the unit of work drops the claim, so the client may retry with the key.
Nothing here commits: the unit of work does.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from flask import Response, current_app, request
from flask_login import current_user
from sqlalchemy.exc import IntegrityError

from broker.api import unit_of_work
from broker.api.models import IdempotencyKey
from broker.api.spec import Header, declare, to_response
from broker.platform.db import Session, upsert_insert, utcnow
from broker.platform.errors import DomainError, Kind, Refusal

KEEP_FOR = timedelta(hours=24)
# A claim older than this belongs to a request that died (worker killed mid-call): no request
# lives this long (upstream timeout times retries), so it may be taken over.
ABANDONED_AFTER = timedelta(minutes=2)
MAX_KEY_LENGTH = 255
REPLAYED_HEADERS = ("Location",)
# Attempts at a claim that races other requests for the same key before answering 409.
CLAIM_ATTEMPTS = 3

INVALID_KEY = Refusal(
    Kind.MALFORMED,
    "invalid_idempotency_key",
    f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters.",
)
IN_PROGRESS = Refusal(
    Kind.CONFLICT,
    "idempotency_in_progress",
    "A request with this Idempotency-Key is still running; retry shortly.",
)
KEY_REUSED = Refusal(
    Kind.INVALID,
    "idempotency_key_reused",
    "This Idempotency-Key was used with a different request; use a new key.",
)

IDEMPOTENCY_KEY = Header(
    "Idempotency-Key",
    "Any unique string of yours (a UUID is best) that makes a retry safe: a repeat with the "
    "same key and body within 24 hours gets the first answer again instead of a second upload.",
    {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH, "pattern": "^[!-~]+$"},
    "5f0c6f3e-8a57-4bd4-9b0e-2f7e7c1d3a90",
    required=False,
)
IDEMPOTENT_REPLAYED = Header(
    "Idempotent-Replayed",
    "`true` when this is the stored answer to an earlier request with the same "
    "`Idempotency-Key` (its `status` is as it was then: GET the upload for the current one).",
    {"type": "string", "enum": ["true"]},
    "true",
    required=False,
)


class IdempotencyError(DomainError):
    """The key cannot be used for this request: still in progress, reused, or malformed."""


@dataclass(frozen=True)
class StoredResponse:
    """A finished request's answer, to replay."""

    status: int
    body: str
    headers: dict[str, str]


class _Claim(enum.Enum):
    CLAIMED = "claimed"  # this request holds the key now
    AGAIN = "again"  # the row changed meanwhile: look again in a new transaction


def fingerprint(method: str, path: str, body: Any) -> str:
    """Hash what makes two requests 'the same': method, path and the JSON body's content."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{method.upper()} {path}\n{canonical}".encode()).hexdigest()


def check_key(key: str) -> str:
    """Validate the header's value: 1..255 printable ASCII characters."""
    if not key or len(key) > MAX_KEY_LENGTH or not all(0x20 < ord(c) < 0x7F for c in key):
        raise IdempotencyError(INVALID_KEY)
    return key


def _claim_once(
    session: Session, user_id: int, key: str, fp: str, now: datetime
) -> StoredResponse | _Claim:
    """One attempt at claiming `key`, in a transaction of its own (the caller commits it).

    A new key (the usual case) is one statement: an INSERT that does nothing when the key
    exists; only then is the row read."""
    insert = upsert_insert(session.get_bind().dialect.name)
    inserted = session.execute(
        insert(IdempotencyKey)
        .values(user_id=user_id, key=key, fingerprint=fp, created_at=now, expires_at=now + KEEP_FOR)
        .on_conflict_do_nothing(index_elements=[IdempotencyKey.user_id, IdempotencyKey.key])
        .returning(IdempotencyKey.id)
    ).first()
    if inserted is not None:
        return _Claim.CLAIMED
    row = session.scalar(
        sa.select(IdempotencyKey).where(
            IdempotencyKey.user_id == user_id, IdempotencyKey.key == key
        )
    )
    if row is None:
        return _Claim.AGAIN  # gone since (expired and purged): try the INSERT again
    if row.expires_at <= now:
        session.delete(row)
        return _Claim.AGAIN
    if row.fingerprint != fp:
        raise IdempotencyError(KEY_REUSED)
    if row.response_status is None:
        if row.created_at > now - ABANDONED_AFTER:
            raise IdempotencyError(IN_PROGRESS)
        claimed = session.execute(
            sa.update(IdempotencyKey)
            .where(IdempotencyKey.id == row.id, IdempotencyKey.created_at == row.created_at)
            .values(created_at=now)
        )
        return _Claim.CLAIMED if cast(sa.CursorResult[Any], claimed).rowcount else _Claim.AGAIN
    return StoredResponse(row.response_status, row.response_body or "", row.response_headers or {})


def claim_key(
    work: unit_of_work.UnitOfWork, user_id: int, key: str, fp: str, *, now: datetime | None = None
) -> StoredResponse | None:
    """Claim `key` for this request (a committed step of `work`), or return the answer to replay."""
    now = now or utcnow()
    check_key(key)
    for _ in range(CLAIM_ATTEMPTS):
        try:
            outcome = work.step(lambda: _claim_once(work.session, user_id, key, fp, now))
        except IntegrityError:  # another request claimed it meanwhile: look again
            continue
        if outcome is _Claim.CLAIMED:
            return None
        if outcome is not _Claim.AGAIN:
            return outcome
    raise IdempotencyError(IN_PROGRESS)


def store_answer(
    session: Session, user_id: int, key: str, status: int, body: str, headers: dict[str, str]
) -> None:
    """Store the answer with the request's transaction (its unit of work commits)."""
    kept = {k: v for k, v in headers.items() if k in REPLAYED_HEADERS}
    session.execute(
        sa.update(IdempotencyKey)
        .where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == key)
        .values(response_status=status, response_body=body, response_headers=kept)
    )


def release(session: Session, user_id: int, key: str) -> None:
    """Drop the claim of a request that failed, so the same key may be retried."""
    session.execute(
        sa.delete(IdempotencyKey).where(
            IdempotencyKey.user_id == user_id,
            IdempotencyKey.key == key,
            IdempotencyKey.response_status.is_(None),
        )
    )


def purge_expired(session: Session, now: datetime | None = None) -> int:
    """Delete keys past their 24 hours (the worker calls this; the caller commits)."""
    result = session.execute(
        sa.delete(IdempotencyKey).where(IdempotencyKey.expires_at <= (now or utcnow()))
    )
    return int(cast(sa.CursorResult[Any], result).rowcount or 0)


def idempotent(view: Callable[..., Any]) -> Callable[..., Any]:
    """Honour the `Idempotency-Key` of an unsafe view, inside the request's unit of work."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        key = request.headers.get("Idempotency-Key")
        if key is None:
            return view(*args, **kwargs)
        user_id: int = current_user.id
        fp = fingerprint(request.method, request.path, request.get_json(silent=True))
        work = unit_of_work.current()
        stored = claim_key(work, user_id, key, fp)
        if stored is not None:
            replay = current_app.response_class(
                stored.body, status=stored.status, mimetype="application/json"
            )
            replay.headers.update(stored.headers)
            replay.headers["Idempotent-Replayed"] = "true"
            return replay
        work.on_failure(lambda: release(work.session, user_id, key))
        response: Response = to_response(view(*args, **kwargs))
        body = response.get_data(as_text=True)
        store_answer(work.session, user_id, key, response.status_code, body, dict(response.headers))
        return response

    return declare(
        wrapper,
        request_headers=(IDEMPOTENCY_KEY,),
        success_headers=(IDEMPOTENT_REPLAYED,),
        errors=(INVALID_KEY, IN_PROGRESS, KEY_REUSED),
    )

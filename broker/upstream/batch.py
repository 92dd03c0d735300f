"""The Images batch API: the batch tokens every process shares, and when not to use them.

Calls to Cloudflare's batch host (`https://batch.imagedelivery.net/images/…`, with a batch token
from `GET …/images/v1/batch_token`) do not count toward the global limit of 1200 calls per
5 minutes; each token allows 200 requests per second. The client (broker.upstream.cloudflare)
sends the six endpoints the batch host serves — direct upload, details, list v2, delete, update
and v1 upload — through `BatchRoute` while it says so, and everything else to the global API.

- `BROKER_CLOUDFLARE_BATCH_RATE` is the calls per second in all. Up to what one token allows
  (`BROKER_CLOUDFLARE_BATCH_TOKEN_RATE`, 200) one token carries them; above it the route holds
  ceil(rate / token rate) tokens ("slots"), the rate split between them, and each call takes
  the first slot with room this second, starting at the next slot in turn: the calls spread
  over the tokens and none is ever sent past its own share.
- Each token is fetched once for all processes: it lives in `upstream_batch_tokens` (one row a
  slot: `cloudflare`, `cloudflare.1`, …) with its expiry, and is refreshed before it expires by
  whichever process wins a short lease on that row (the others keep using the old token
  meanwhile), each slot on its own. Each process also keeps them in memory, so a call reads
  the database only around a refresh. A token the batch host refuses (401/403: expired,
  revoked) is dropped for every process and its call sent to the global API at once; the next
  call on that slot fetches another. Only when more tokens are refused than the route holds
  without a batch call succeeding in between (replacements refused too) does the endpoint fall
  back as below.
- Each token's calls per second are shared by every process that calls Cloudflare, counted
  per token: in Redis when `BROKER_RATELIMIT_STORAGE_URI` is `redis://…`, else in the database
  (`DatabaseRate`: 100 ms slices, one statement a call that counts it and reads the window, so
  no lock is held across round trips), or, with `BROKER_CLOUDFLARE_BATCH_RATE_SCOPE=process`,
  in this process's memory (`MemoryRate`: no statement at all; right only when this process is
  the only one calling Cloudflare, which nothing at start can tell, hence a setting).
- A batch host that refuses an endpoint (code 103 "forbidden endpoint", as some accounts see for
  `/images/v2/…`), refuses the replacement tokens too, or fails `ERRORS_BEFORE_FALLBACK` times
  in a row sends that endpoint back to the global API for `BROKER_CLOUDFLARE_BATCH_COOLDOWN`
  seconds, for every process (`upstream_batch_fallbacks`), logged once, shown in `/metrics`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, cast

import sqlalchemy as sa
from flask import Flask
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from broker.platform import health
from broker.platform.config import Settings, settings_of
from broker.platform.db import upsert_insert
from broker.platform.encryption import EXTENSION_KEY as KEYRING_KEY
from broker.platform.encryption import Keyring
from broker.upstream.budget import EXTENSION_KEY as BUDGET_KEY
from broker.upstream.budget import BudgetExhausted, UpstreamBudget
from broker.upstream.cloudflare import (
    Budget,
    CloudflareAuthError,
    CloudflareError,
    CloudflareUnavailable,
    CloudflareUnreachable,
    Priority,
)
from broker.upstream.models import UpstreamBatchFallback, UpstreamBatchToken, UpstreamBudgetBucket

log = logging.getLogger("broker.batch")

EXTENSION_KEY = "batch_route"
# app.extensions key: what stops this many web processes from running (gunicorn.conf.py asks).
WEB_PROCESSES_KEY = "web_processes_problem"
SCOPE = "cloudflare"
# The endpoints Cloudflare documents on the batch host, by the client's names for them.
ENDPOINTS = (
    "direct_upload",
    "image_details",
    "list_v2",
    "image_delete",
    "image_edit",
    "upload_v1",
)
FORBIDDEN_CODE = 103
ERRORS_BEFORE_FALLBACK = 5
# Refresh this long before expiry (or at 3/4 of a shorter lifetime).
REFRESH_BEFORE = timedelta(minutes=5)
REFRESH_LEASE = timedelta(seconds=30)
# The stored (encrypted) token as it is: the route decrypts it with its own keyring, since it
# also runs where no app context is pushed (the column's type needs one).
_STORED_TOKEN = sa.type_coerce(UpstreamBatchToken.token, sa.Text).label("token")
# How long a process without any valid token waits for another process's fetch.
WAIT_FOR_FETCH = 3.0
# How often a process re-reads the fallbacks other processes recorded.
FALLBACK_RELOAD = 5.0
# Seconds a Redis call of the per-token rate may take before Redis counts as down.
STORAGE_TIMEOUT = 1.0
# How long a caller waits for the per-token rate before giving up with BudgetExhausted.
RATE_WAIT = 2.0


class TokenSource(Protocol):
    """Fetches a new batch token from the global API (the Cloudflare client does)."""

    def fetch_batch_token(self, priority: Priority) -> tuple[str, datetime]:
        """Return a fresh batch token and when it expires."""


class _PerSecondRate:
    """What both per-token rates answer alike: no window, nothing spent in a caller's work."""

    def acquire_in(self, conn: Connection, priority: Priority = Priority.INTERACTIVE) -> bool:
        """Never spent inside a caller's transaction (it commits each count at once)."""
        return False

    def pause(self, seconds: float) -> None:
        """Nothing to record: the batch host's 429 is per second and retried after it."""

    def status(self) -> None:
        """A per-second rate keeps no window to report."""


class MemoryRate(_PerSecondRate):
    """`per_second` calls per second counted in this process alone (a moving window, `limits`).

    For a process that is the only one calling Cloudflare; also what `RedisRate` falls back to.
    """

    def __init__(self, per_second: int) -> None:
        from limits import RateLimitItemPerSecond, storage, strategies

        self._item = RateLimitItemPerSecond(per_second)
        self._limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())

    def __repr__(self) -> str:
        return f"<MemoryRate {self._item.amount}/s>"

    def hit(self) -> bool:
        """Count one call; False (not counted) when this second is full."""
        return self._limiter.hit(self._item, "broker-batch", SCOPE)

    def acquire(self, priority: Priority = Priority.INTERACTIVE) -> None:
        """Count one call, or raise BudgetExhausted when this second is full."""
        if not self.hit():
            raise BudgetExhausted(1.0, "batch rate")


class RedisRate(_PerSecondRate):
    """One token's calls per second, counted in Redis (a moving window, `limits`).

    With Redis unreachable the calls are counted in this process instead (the same window, in
    memory: each process then allows the full rate on its own), logged once; Redis is asked
    again every RECHECK seconds and counts again once it answers. `shared` tells which.
    """

    RECHECK = 30.0

    def __init__(
        self,
        uri: str,
        per_second: int,
        *,
        key: str = SCOPE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from limits import RateLimitItemPerSecond, storage, strategies

        self._item = RateLimitItemPerSecond(per_second)
        self._key = key  # each token's calls are counted under a key of their own
        # A call must not wait on a Redis that does not answer.
        redis = storage.storage_from_string(
            uri, socket_timeout=STORAGE_TIMEOUT, socket_connect_timeout=STORAGE_TIMEOUT
        )
        self._limiter = strategies.MovingWindowRateLimiter(redis)
        self._local = MemoryRate(per_second)
        self.clock = clock
        self._down_until: float | None = None  # counting in-process until then
        self._lock = threading.Lock()

    @property
    def shared(self) -> bool:
        """True while the rate counts in Redis, False while this process counts on its own."""
        return self._down_until is None

    def acquire(self, priority: Priority = Priority.INTERACTIVE) -> None:
        """Count one call, or raise BudgetExhausted when this second is full."""
        if not self._hit():
            raise BudgetExhausted(1.0, "batch rate")

    def _hit(self) -> bool:
        down_until = self._down_until
        if down_until is not None and self.clock() < down_until:
            return self._local.hit()
        try:
            counted = self._limiter.hit(self._item, "broker-batch", self._key)
        except Exception as exc:  # any storage failure: Redis down, timed out, refusing
            with self._lock:
                if self._down_until is None:
                    log.warning(
                        "batch API: rate storage unreachable (%s): counting calls in this "
                        "process until it answers again",
                        type(exc).__name__,
                    )
                self._down_until = self.clock() + self.RECHECK
            return self._local.hit()
        if down_until is not None:
            with self._lock:
                if self._down_until is not None:
                    log.warning("batch API: rate storage answers again: counting calls in it")
                self._down_until = None
        return counted


class DatabaseRate(_PerSecondRate):
    """`per_second` calls per second, shared by every process through the database.

    A call is one statement (committed at once): it adds itself to the current 100 ms slice
    and returns that slice's new count with the sum of the other slices overlapping the last
    second; over the limit it takes its count back and is refused. No lock is held across a
    round trip, so callers do not queue behind each other. The current slice's count is exact
    (its row is updated under its lock), so calls within one slice never exceed the limit;
    the other slices are read as committed when the statement began, which can miss only calls
    still in flight in the slice before (on PostgreSQL; SQLite runs writes one at a time), and
    whole slices over-count the window by up to one slice. Two calls racing for the last place
    may both be refused; neither is ever both let through.
    """

    SLICE_MS = 100

    def __init__(
        self,
        engine: Engine,
        per_second: int,
        *,
        scope: str = "batch",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if per_second < 1:
            raise ValueError("the batch rate needs at least one call per second")
        # Each statement commits on its own: the next call must see this one's count.
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.limit = per_second
        self.scope = scope
        self.clock = clock
        self._count = _counting_upsert(engine.dialect.name)

    def __repr__(self) -> str:
        return f"<DatabaseRate {self.limit}/s>"

    def acquire(self, priority: Priority = Priority.INTERACTIVE) -> None:
        """Count one call, or raise BudgetExhausted when the last second is full."""
        now_ms = int(self.clock() * 1000)
        current = now_ms // self.SLICE_MS * self.SLICE_MS
        # Every slice overlapping the last second: whole slices over-count, never under-count.
        first = (now_ms - 1000) // self.SLICE_MS * self.SLICE_MS
        bucket = UpstreamBudgetBucket
        ours = bucket.scope == self.scope
        with self.engine.connect() as conn:
            calls, others = conn.execute(
                self._count, {"scope": self.scope, "start": current, "first": first}
            ).one()
            if calls + others > self.limit:
                conn.execute(
                    sa.update(bucket)
                    .where(ours, bucket.start == current)
                    .values(calls=bucket.calls - 1)
                )
                # The oldest slice counted leaves the window within one slice.
                raise BudgetExhausted(self.SLICE_MS / 1000, "batch rate")
            if calls == 1:  # the slice's first call: a good moment to drop the expired ones
                conn.execute(sa.delete(bucket).where(ours, bucket.start < first))


def _counting_upsert(dialect: str) -> sa.Executable:
    """One statement adding a call to slice `start` of `scope` (creating it): its new count,
    and the calls of the scope's other slices from `first` on."""
    table = cast(sa.Table, UpstreamBudgetBucket.__table__)
    insert = upsert_insert(dialect)
    scope, start = (
        sa.bindparam("scope", type_=sa.String),
        sa.bindparam("start", type_=sa.BigInteger),
    )
    others = (
        sa.select(sa.func.coalesce(sa.func.sum(table.c.calls), 0))
        .where(table.c.scope == scope, table.c.start >= sa.bindparam("first"))
        .where(table.c.start != start)
        .scalar_subquery()
    )
    statement = insert(table).values(scope=scope, start=start, calls=1, background=0)
    upsert = statement.on_conflict_do_update(
        index_elements=[table.c.scope, table.c.start],
        set_={"calls": table.c.calls + 1},
    )
    return cast(sa.Executable, upsert.returning(table.c.calls, others))


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass
class _Token:
    value: str
    expires_at: datetime
    refresh_at: datetime
    fetched_at: datetime


class _Slot:
    """One batch token's place: its row, its own per-second rate, the token as last read."""

    def __init__(self, index: int, rate: Budget) -> None:
        self.index = index
        self.scope = SCOPE if index == 0 else f"{SCOPE}.{index}"
        self.rate = rate
        self.token: _Token | None = None

    def __repr__(self) -> str:
        return f"<batch token slot {self.index} {self.rate!r}>"


@dataclass
class BatchCall:
    """One call's batch token: the slot it came from, the token, and whether its first attempt
    is counted already. `token` hands it out; the client passes it back to `spend` and `failed`.
    """

    value: str
    slot: _Slot
    token: _Token
    paid: bool


class BatchRoute:
    """Decides per endpoint whether a call goes to the batch host, and with which token."""

    def __init__(
        self,
        engine: Engine,
        base: str,
        rate: Budget | Sequence[Budget],
        *,
        keyring: Keyring,
        cooldown: float = 600.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.engine = engine
        self.keyring = keyring  # the tokens are stored encrypted, like every secret at rest
        self.base = base.rstrip("/")
        # One per-second rate per token: one slot each.
        rates = list(rate) if isinstance(rate, Sequence) else [rate]
        if not rates:
            raise ValueError("the batch route needs at least one token's rate")
        self.slots = [_Slot(index, each) for index, each in enumerate(rates)]
        self.cooldown = cooldown
        self.clock = clock
        self._sleep = sleep
        self._turn = itertools.count()  # which slot a call tries first: each in turn
        self._fallbacks: dict[str, datetime] = {}
        self._fallbacks_read = float("-inf")
        self._errors: dict[str, int] = {}
        # Tokens refused since the last batch call that succeeded (slot, when fetched).
        self._refused: set[tuple[int, datetime]] = set()
        self._lock = threading.Lock()
        self._owner = ("", -1)  # (owner, pid it was drawn in)

    def __repr__(self) -> str:
        return f"<BatchRoute {self.base} {len(self.slots)} token(s)>"

    @property
    def owner(self) -> str:
        """This process's name on a refresh lease: drawn anew after a fork, since every web
        process forked from the master holds this same object (and id(self))."""
        owner, pid = self._owner
        if pid != os.getpid():
            owner = uuid.uuid4().hex
            self._owner = (owner, os.getpid())
        return owner

    @property
    def rate(self) -> Budget:
        """The first token's per-second rate (what the create path may prepay: it never
        spends inside a caller's transaction, so nothing is prepaid)."""
        return self.slots[0].rate

    @property
    def shared(self) -> bool:
        """False while some token's rate counts in this process because Redis is unreachable."""
        return all(not isinstance(s.rate, RedisRate) or s.rate.shared for s in self.slots)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def warm_up(self) -> None:
        """Read the fall-backs and the stored tokens now, before a first request waits on them
        (never fetches a token: that is the first call's or the worker's job)."""
        self._reload_fallbacks()
        for slot in self.slots:
            stored = self._read(slot)
            if stored is not None and self._now() < stored.refresh_at:
                slot.token = stored

    # -- which endpoints ---------------------------------------------------------------------

    def uses_batch(self, endpoint: str) -> bool:
        """Tell whether `endpoint` goes to the batch host now (not in a fallback cool-down)."""
        if endpoint not in ENDPOINTS:
            return False
        now = self._now()
        if self.clock() - self._fallbacks_read > FALLBACK_RELOAD:
            self._reload_fallbacks()
        until = self._fallbacks.get(endpoint)
        return until is None or until <= now

    def _reload_fallbacks(self) -> None:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(UpstreamBatchFallback.endpoint, UpstreamBatchFallback.until)
            ).all()
        with self._lock:
            self._fallbacks = {name: _aware(until) or self._now() for name, until in rows}
            self._fallbacks_read = self.clock()

    def fall_back(self, endpoint: str, reason: str) -> None:
        """Send `endpoint` to the global API for the cool-down, for every process."""
        now = self._now()
        until = now + timedelta(seconds=self.cooldown)
        with self._lock:
            self._fallbacks[endpoint] = until
            self._errors.pop(endpoint, None)
        table = cast(sa.Table, UpstreamBatchFallback.__table__)
        with self.engine.begin() as conn:
            current = conn.execute(
                sa.select(UpstreamBatchFallback.until).where(
                    UpstreamBatchFallback.endpoint == endpoint
                )
            ).scalar()
            values = {"until": until, "reason": reason[:255], "since": now}
            if current is None:
                try:
                    with conn.begin_nested():
                        conn.execute(sa.insert(table).values(endpoint=endpoint, **values))
                except IntegrityError:
                    return  # another process recorded it this very moment (and logged it)
            else:
                conn.execute(sa.update(table).where(table.c.endpoint == endpoint).values(**values))
                if (_aware(current) or now) > now:
                    return  # already on the global API: said once already
        log.warning(
            "batch API: %s goes to the global API for %.0fs (%s)", endpoint, self.cooldown, reason
        )

    def failed(self, endpoint: str, error: CloudflareError, call: BatchCall) -> bool:
        """Record a batch-host failure; return True when the call may go to the global API.

        A refusal (code 103, or the token refused) or a connection that never opened means
        nothing was processed, so the call can be sent again to the global API at once; 5xx
        answers and failed connections count toward a fall-back; any other answer (404, 409, …)
        is the endpoint working as it should.
        """
        if error.code == FORBIDDEN_CODE or any(
            e.get("code") == FORBIDDEN_CODE for e in error.errors
        ):
            self.fall_back(endpoint, "forbidden endpoint (code 103)")
            return True
        if isinstance(error, CloudflareAuthError):
            self._token_refused(endpoint, error, call)
            return True
        if not isinstance(error, CloudflareUnavailable):
            self.succeeded(endpoint)
            return False
        with self._lock:
            count = self._errors[endpoint] = self._errors.get(endpoint, 0) + 1
        if count >= ERRORS_BEFORE_FALLBACK:
            self.fall_back(endpoint, f"{count} errors in a row ({error.status})")
        # A connection that never opened carried nothing: the global API may take the call.
        return isinstance(error, CloudflareUnreachable)

    def _token_refused(self, endpoint: str, error: CloudflareError, call: BatchCall) -> None:
        """Drop the refused token (its slot fetches another); fall back only when more tokens
        were refused than the route holds, with no batch call succeeding in between."""
        slot, refused = call.slot, call.token
        self.forget_token(slot.index, refused)
        with self._lock:
            self._refused.add((slot.index, refused.fetched_at))
            count = len(self._refused)
        if count > len(self.slots):
            self.fall_back(endpoint, f"batch token refused ({error.status}), replacements too")
        else:
            log.warning(
                "batch API: token %d refused (%s): its next call fetches another",
                slot.index,
                error.status,
            )

    def succeeded(self, endpoint: str) -> None:
        """Reset the endpoint's run of errors (and the run of refused tokens)."""
        if self._errors.get(endpoint) or self._refused:
            with self._lock:
                self._errors.pop(endpoint, None)
                self._refused.clear()

    # -- the per-token rates -----------------------------------------------------------------

    def _take(self, first: int, *, only: bool = False) -> _Slot:
        """Count one call on the first slot with room this second, trying slot `first` first
        (only that one with `only`); BudgetExhausted when every one tried is full."""
        count = len(self.slots)
        soonest: BudgetExhausted | None = None
        for step in range(1 if only else count):
            slot = self.slots[(first + step) % count]
            try:
                slot.rate.acquire(Priority.INTERACTIVE)
            except BudgetExhausted as exc:
                if soonest is None or (exc.retry_after or 1.0) < (soonest.retry_after or 1.0):
                    soonest = exc
                continue
            return slot
        assert soonest is not None
        raise soonest

    def _waiting(self, take: Callable[[], _Slot]) -> _Slot:
        """Run `take`, waiting up to RATE_WAIT while every token it may use is full."""
        waited = 0.0
        while True:
            try:
                return take()
            except BudgetExhausted as exc:
                pause = min(max(0.05, float(exc.retry_after or 1) / 4), 0.25)
                if waited + pause > RATE_WAIT:
                    raise
                self._sleep(pause)
                waited += pause

    def spend(self, call: BatchCall) -> None:
        """Take one call of the per-second rate of the token `call` carries (nothing for a first
        attempt `token` counted), waiting up to RATE_WAIT."""
        if call.paid:
            call.paid = False
            return
        self._waiting(lambda: self._take(call.slot.index, only=True))

    # -- the tokens --------------------------------------------------------------------------

    def forget_token(self, slot: int | None = None, refused: _Token | None = None) -> None:
        """Drop slot `slot`'s token (every slot's when None) everywhere, the batch host having
        refused it; a newer one another process already stored stays. The next call fetches."""
        slots = self.slots if slot is None else [self.slots[slot]]
        with self._lock:
            for each in slots:
                if refused is None or (each.token is not None and each.token == refused):
                    each.token = None
        table = cast(sa.Table, UpstreamBatchToken.__table__)
        which: sa.ColumnElement[bool] = table.c.scope.in_([each.scope for each in slots])
        if refused is not None:
            which = sa.and_(
                which,
                sa.or_(table.c.fetched_at.is_(None), table.c.fetched_at <= refused.fetched_at),
            )
        with self.engine.begin() as conn:
            conn.execute(sa.update(table).where(which).values(token=None, expires_at=None))

    def token(self, source: TokenSource, priority: Priority) -> BatchCall | None:
        """Return a valid batch token for one call, its call counted on that token's rate (the
        first token with room this second, each in turn first), or None when there is none.
        Fetches or refreshes the token when due; BudgetExhausted when every token stays full.
        """
        slot = self._waiting(lambda: self._take(next(self._turn) % len(self.slots)))
        cached = slot.token
        token = self._token_of(slot, source, priority)
        if token is None:
            return None
        # Not the token in memory: a fetch or a wait may have taken seconds since the count, so
        # the send counts again (twice errs on the safe side; past the share does not).
        return BatchCall(token.value, slot, token, paid=token is cached)

    def _token_of(self, slot: _Slot, source: TokenSource, priority: Priority) -> _Token | None:
        """Slot `slot`'s valid token, fetched or refreshed when due (by one process for all)."""
        now = self._now()
        cached = slot.token
        if cached is not None and now < cached.refresh_at:
            return cached
        stored = self._read(slot)
        if stored is not None and now < stored.refresh_at:
            slot.token = stored
            return stored
        if self._claim_refresh(slot, now):
            # Another process may have stored a fresh token between our read and our claim.
            latest = self._read(slot)
            if latest is not None and now < latest.refresh_at:
                self._release_refresh(slot)
                slot.token = latest
                return latest
            try:
                value, expires = source.fetch_batch_token(priority)
            except Exception:
                self._release_refresh(slot)
                log.warning("batch API: token fetch failed", exc_info=True)
                return stored if stored and now < stored.expires_at else None
            slot.token = self._store(slot, value, _aware(expires) or now, now)
            return slot.token
        if stored is not None and now < stored.expires_at:
            return stored  # another process is refreshing it: the old one still works
        # Another process is fetching this slot's first token: wait a little for it.
        waited = 0.0
        while waited < WAIT_FOR_FETCH:
            self._sleep(0.05)
            waited += 0.05
            stored = self._read(slot)
            if stored is not None and self._now() < stored.expires_at:
                slot.token = stored
                return stored
        return None

    @staticmethod
    def _refresh_at(expires: datetime, fetched: datetime) -> datetime:
        lifetime = expires - fetched
        return expires - min(REFRESH_BEFORE, lifetime / 4)

    def _read(self, slot: _Slot | None = None) -> _Token | None:
        """Slot `slot`'s token as stored (the first slot's when None), or None."""
        slot = slot or self.slots[0]
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    _STORED_TOKEN,
                    UpstreamBatchToken.expires_at,
                    UpstreamBatchToken.fetched_at,
                ).where(UpstreamBatchToken.scope == slot.scope)
            ).first()
        if row is None or not row.token or row.expires_at is None:
            return None
        expires = _aware(row.expires_at) or self._now()
        fetched = _aware(row.fetched_at) or expires
        value = self.keyring.decrypt(row.token)
        return _Token(value, expires, self._refresh_at(expires, fetched), fetched)

    def _claim_refresh(self, slot: _Slot, now: datetime) -> bool:
        """Take the slot's refresh lease (committed), so one process fetches for all."""
        table = cast(sa.Table, UpstreamBatchToken.__table__)
        until = now + REFRESH_LEASE
        with self.engine.begin() as conn:
            won = conn.execute(
                sa.update(table)
                .where(
                    table.c.scope == slot.scope,
                    sa.or_(table.c.lease_until.is_(None), table.c.lease_until <= now),
                )
                .values(lease_until=until, lease_owner=self.owner)
            )
            if won.rowcount:
                return True
            exists = conn.execute(
                sa.select(table.c.scope).where(table.c.scope == slot.scope)
            ).first()
            if exists is not None:
                return False
            try:
                with conn.begin_nested():
                    conn.execute(
                        sa.insert(table).values(
                            scope=slot.scope, lease_until=until, lease_owner=self.owner
                        )
                    )
            except IntegrityError:
                return False
            return True

    def _release_refresh(self, slot: _Slot) -> None:
        table = cast(sa.Table, UpstreamBatchToken.__table__)
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(table)
                .where(table.c.scope == slot.scope, table.c.lease_owner == self.owner)
                .values(lease_until=None, lease_owner=None)
            )

    def _store(self, slot: _Slot, value: str, expires: datetime, now: datetime) -> _Token:
        table = cast(sa.Table, UpstreamBatchToken.__table__)
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(table)
                .where(table.c.scope == slot.scope)
                .values(
                    # Encrypted here, so stored as it is (not again by the column's type).
                    token=sa.type_coerce(self.keyring.encrypt(value), sa.Text),
                    expires_at=expires,
                    fetched_at=now,
                    lease_until=None,
                    lease_owner=None,
                )
            )
        log.info("batch API: new token %d, valid until %s", slot.index, expires.isoformat())
        return _Token(value, expires, self._refresh_at(expires, now), now)

    # -- metrics -----------------------------------------------------------------------------

    def status(self) -> dict[str, float]:
        """Seconds each batch endpoint has left on the global API (0: on the batch host)."""
        self._reload_fallbacks()
        now = self._now()
        return {
            name: round(max(0.0, (self._fallbacks.get(name, now) - now).total_seconds()), 1)
            for name in ENDPOINTS
        }


def token_shares(rate: int, per_token: int) -> list[int]:
    """Split `rate` calls per second over the fewest tokens allowing `per_token` each."""
    count = -(-rate // per_token)
    return [rate // count + (1 if index < rate % count else 0) for index in range(count)]


def route_from_settings(engine: Engine, settings: Settings, keyring: Keyring) -> BatchRoute | None:
    """Build the batch route from BROKER_CLOUDFLARE_BATCH*, or None when it is off."""
    if settings.cloudflare_batch != "auto" or settings.cloudflare_batch_base is None:
        return None
    uri = settings.ratelimit_storage_uri
    rates: list[Budget] = []
    for index, share in enumerate(
        token_shares(settings.cloudflare_batch_rate, settings.cloudflare_batch_token_rate)
    ):
        # Each token's calls counted apart (the first under the names one token always had).
        if settings.cloudflare_batch_rate_scope == "process":
            rates.append(MemoryRate(share))
        elif uri.startswith(("redis://", "rediss://", "redis+")):
            rates.append(RedisRate(uri, share, key=f"{SCOPE}.{index}" if index else SCOPE))
        else:
            rates.append(DatabaseRate(engine, share, scope=f"batch.{index}" if index else "batch"))
    return BatchRoute(
        engine,
        settings.cloudflare_batch_base,
        rates,
        keyring=keyring,
        cooldown=settings.cloudflare_batch_cooldown,
    )


def init_app(app: Flask) -> None:
    """Create the app's batch route (after the budget, whose small engine it shares)."""
    budget: UpstreamBudget = app.extensions[BUDGET_KEY]
    settings = settings_of(app)
    app.extensions[EXTENSION_KEY] = route_from_settings(
        budget.engine, settings, app.extensions[KEYRING_KEY]
    )
    # Called by gunicorn.conf.py in the master, which knows how many web processes it runs.
    app.extensions[WEB_PROCESSES_KEY] = functools.partial(web_processes_problem, settings)


def web_processes_problem(settings: Settings, processes: int) -> str | None:
    """Say why `processes` web processes cannot run with these settings, else None: with the
    per-token rates counted in each process's memory, each would allow the whole rate."""
    in_memory = settings.cloudflare_batch_rate_scope == "process"
    if in_memory and settings.cloudflare_batch == "auto" and processes > 1:
        return (
            f"BROKER_CLOUDFLARE_BATCH_RATE_SCOPE=process counts the batch API's rate in each "
            f"process, and {processes} web processes would each allow the whole "
            f"BROKER_CLOUDFLARE_BATCH_RATE ({settings.cloudflare_batch_rate}/s; Cloudflare "
            f"answers the excess with 429): run one (WEB_CONCURRENCY=1) or count it in the "
            f"shared storage (BROKER_CLOUDFLARE_BATCH_RATE_SCOPE=shared)"
        )
    return None


def metric_lines(session: object) -> list[str]:
    """The batch API's gauge of `/metrics`: seconds each endpoint stays on the global API."""
    from flask import current_app

    route: BatchRoute | None = current_app.extensions.get(EXTENSION_KEY)
    if route is None:
        return []
    return [
        *health.gauge(
            "broker_upstream_batch_fallback_seconds",
            "Seconds a batch-API endpoint stays on the global API after a refusal (0: batch host).",
            route.status(),
            label="endpoint",
        ),
        *health.gauge(
            "broker_upstream_batch_rate_shared",
            "1 while the batch tokens' per-second rates count in the shared storage, 0 while "
            "this process counts them on its own because Redis is unreachable.",
            1 if route.shared else 0,
        ),
    ]

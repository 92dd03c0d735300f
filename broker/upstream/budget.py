"""The upstream request budget, shared by every broker process through the database.

Cloudflare allows 1200 API calls per 5 minutes per token and answers a 429 that blocks *every*
call for the next 5 minutes when that is exceeded. The broker keeps its own, lower budget
(`BROKER_UPSTREAM_BUDGET` calls per `BROKER_UPSTREAM_BUDGET_WINDOW` seconds) so it never gets
there, whatever number of web and worker processes run:

- the window is split into slices (buckets); a call is allowed when the calls of every bucket
  overlapping the last window, plus this one, stay within the limit. Counting whole buckets
  over-counts slightly, never under-counts, so the real sliding-window count stays under it;
- the budget has two sides, each with a guaranteed share: interactive calls (a person waiting
  for an upload URL) may not use the last `BROKER_UPSTREAM_BACKGROUND_SHARE` calls of a window
  for themselves, and background calls (verification, expiry, draft deletion, key sync) may not
  use the last `BROKER_UPSTREAM_BACKGROUND_RESERVE`. A burst of creates therefore delays
  completion by seconds, not minutes, and busy polling never locks users out;
- a 429 from Cloudflare pauses every process until its `Retry-After` has passed.

Spending a call is one statement: a conditional upsert of the current bucket that counts the
window (and reads the pause) in its own WHERE and records the call only if both sides leave
room. Acquires are serialised so that no two count the same window at once: on SQLite by the
database's write lock, which that statement takes before it reads anything; on PostgreSQL,
whose statements read the snapshot they started with, by the scope's state row, written (and
so locked) by the statement before it. Only a refusal reads again, to say when to retry.
Callers must not hold a write transaction of their own across an upstream call (SQLite has one
writer).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import sqlalchemy as sa
from flask import Flask
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from broker.platform import health
from broker.platform.config import Settings, settings_of
from broker.platform.db import (
    ping_when_idle,
    server_pool_options,
    sqlite_pool_options,
    upsert_insert,
)
from broker.platform.sqlite_writes import gate_sqlite_writes
from broker.upstream.cloudflare import BudgetStatus, Priority, UpstreamError

log = logging.getLogger("broker.budget")

EXTENSION_KEY = "budget"
DEFAULT_SCOPE = "cloudflare"
BUCKETS_PER_WINDOW = 10
# The pace is never read over less time than the budget's full pace needs for this many calls:
# that many calls at once read as the whole limit, a handful as a small share of it.
PACE_MIN_CALLS = 20

_state = sa.table(
    "upstream_budget_state",
    sa.column("scope", sa.String),
    sa.column("seq", sa.BigInteger),
    sa.column("paused_until_ms", sa.BigInteger),
)
_buckets = sa.table(
    "upstream_budget_buckets",
    sa.column("scope", sa.String),
    sa.column("start", sa.BigInteger),
    sa.column("calls", sa.Integer),
    sa.column("background", sa.Integer),
)


class BudgetExhausted(UpstreamError):
    """No upstream call may be made now; try again after `retry_after` seconds."""

    def __init__(self, retry_after: float, reason: str = "budget") -> None:
        super().__init__(f"upstream budget {reason}: retry after {retry_after:.0f}s")
        self.retry_after = retry_after
        self.reason = reason  # "budget" (spent) or "paused" (after a 429)


class UpstreamBudget:
    """A sliding-window call budget with priorities and a shared pause, kept in the database."""

    def __init__(
        self,
        engine: Engine,
        *,
        limit: int = 1000,
        window: int = 300,
        reserve: int = 200,
        background_share: int = 0,
        scope: str = DEFAULT_SCOPE,
        clock: Callable[[], float] = time.time,
        min_burst: int = 0,
    ) -> None:
        if limit < 1 or window < 1 or not 0 <= reserve < limit:
            raise ValueError("budget needs limit ≥ 1, window ≥ 1 and 0 ≤ reserve < limit")
        if not 0 <= background_share < limit:
            raise ValueError("budget needs 0 ≤ background_share < limit")
        self.engine = engine
        self.limit = limit
        self.window = window
        self.reserve = reserve
        self.background_share = background_share
        self.scope = scope
        self.clock = clock
        # The calls one user can spend at once (a pick of files: a create and a complete each;
        # `one_pick`): fewer than that in the current slice alone is no sign that traffic picks up.
        self.min_burst = min_burst
        # Bucket keys are exact integers on every backend: whole seconds, or milliseconds for a
        # window shorter than BUCKETS_PER_WINDOW seconds (the batch host's one-second rate), so
        # that one still has ten slices and counts at most a tenth of a window too much.
        self.unit = 1000 if window < BUCKETS_PER_WINDOW else 1
        self.bucket = max(1, math.ceil(window * self.unit / BUCKETS_PER_WINDOW))

    def __repr__(self) -> str:
        return (
            f"<UpstreamBudget {self.limit}/{self.window}s reserve={self.reserve} "
            f"background_share={self.background_share}>"
        )

    def _caps(
        self, rows: Sequence[Any], priority: Priority
    ) -> list[tuple[list[tuple[int, int]], int]]:
        """The limits a call of `priority` must stay within, each with the calls it counts."""
        everything = [(int(start), int(calls)) for start, calls, _ in rows]
        background = [(int(start), int(bg or 0)) for start, _, bg in rows]
        if priority == Priority.INTERACTIVE:
            own = [
                (start, calls - bg)
                for (start, calls), (_, bg) in zip(everything, background, strict=False)
            ]
            return [(everything, self.limit), (own, self.limit - self.background_share)]
        return [(everything, self.limit), (background, self.limit - self.reserve)]

    def _bump(self, conn: Connection) -> int | None:
        """Write the scope's state row (its lock) and return its pause; None when it is missing.

        One round trip (UPDATE … RETURNING, PostgreSQL and SQLite ≥ 3.35): the row is locked
        until the transaction ends, so every statement saved here is time others do not wait.
        """
        paused = conn.execute(_locking(), {"locked_scope": self.scope}).first()
        return None if paused is None else int(paused[0] or 0)

    def _lock(self, conn: Connection) -> int:
        """Take the scope's lock by writing its state row (creating it when missing)."""
        paused = self._bump(conn)
        if paused is not None:
            return paused
        conn.execute(sa.insert(_state).values(scope=self.scope, seq=1, paused_until_ms=0))
        return 0

    def _transaction(self, work: Callable[[Connection], Any]) -> Any:
        """Run `work` in its own short transaction; retry once if two processes create the row."""
        for attempt in (1, 2):
            try:
                with self.engine.begin() as conn:
                    return work(conn)
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _window_start(self, now: float) -> int:
        """The first bucket that may still hold calls made within the last window."""
        first = math.floor((now - self.window) * self.unit / self.bucket) * self.bucket
        return int(first)

    def _spend(self, conn: Connection, now: float, priority: Priority) -> bool:
        """Record one call in the current bucket (serialised: see the module), or raise
        BudgetExhausted; False (nothing recorded) when the scope's state row is missing."""
        spent = conn.execute(
            _spending(conn.dialect.name, priority == Priority.BACKGROUND),
            self.spending_params(now, priority),
        ).first()
        return self._settle(conn, None if spent is None else spent[0], now, priority)

    def spending_params(self, now: float, priority: Priority) -> dict[str, Any]:
        """The parameters of `_spending` (and of `spending`) for a call at `now`."""
        background = priority == Priority.BACKGROUND
        return {
            "scope": self.scope,
            "start": int((now * self.unit) // self.bucket) * self.bucket,
            "first": self._window_start(now),
            "now_ms": math.floor(now * 1000),
            "limit": self.limit,
            "cap": self.limit - (self.reserve if background else self.background_share),
            "background": int(background),
        }

    def settle(self, conn: Connection, calls: int | None, now: float, priority: Priority) -> bool:
        """After `spending` ran in a caller's statement, under the scope's lock (`locking`):
        True when it recorded the call (`calls`, the bucket's new count); else False when the
        state row is missing, or BudgetExhausted saying when to retry."""
        try:
            return self._settle(conn, calls, now, priority)
        except BudgetExhausted as exc:
            self._refused(exc, priority)
            raise

    def _settle(self, conn: Connection, calls: int | None, now: float, priority: Priority) -> bool:
        first = self._window_start(now)
        if calls is None:
            return self._why_not(conn, now, first, priority)
        if calls == 1:
            # A new bucket is rare (once per slice): a good moment to drop expired ones.
            conn.execute(
                sa.delete(_buckets).where(_buckets.c.scope == self.scope, _buckets.c.start < first)
            )
        return True

    def in_scope(self, scope: str) -> UpstreamBudget:
        """This budget, its limits and clock, kept under `scope` instead."""
        other = copy.copy(self)
        other.scope = scope
        return other

    def shares(self, conn: Connection) -> bool:
        """Tell whether this budget is kept in the database of `conn` (so a caller's own
        statements may spend it: `locking` and `spending`)."""
        return conn.engine.url == self.engine.url

    def _why_not(self, conn: Connection, now: float, first: int, priority: Priority) -> bool:
        """After `_spending` recorded nothing: False when the state row is missing, else raise
        BudgetExhausted saying when to retry (read under the same lock, so the counts agree)."""
        paused_until_ms = conn.execute(
            sa.select(_state.c.paused_until_ms).where(_state.c.scope == self.scope)
        ).first()
        if paused_until_ms is None:
            return False
        if int(paused_until_ms[0] or 0) > now * 1000:
            raise BudgetExhausted(math.ceil(int(paused_until_ms[0]) / 1000 - now), "paused")
        rows = conn.execute(
            sa.select(_buckets.c.start, _buckets.c.calls, _buckets.c.background)
            .where(_buckets.c.scope == self.scope, _buckets.c.start >= first)
            .order_by(_buckets.c.start)
        ).all()
        retry_after = 1.0  # both sides had room a moment ago: only a racing clock says no
        for counted, cap in self._caps(rows, priority):
            used = sum(calls for _, calls in counted)
            if used + 1 > cap:
                retry_after = self._retry_after(counted, used, cap, now)
                break
        raise BudgetExhausted(retry_after)

    def _refused(self, exc: BudgetExhausted, priority: Priority) -> None:
        log.warning(
            "upstream budget refused a %s call (%s), retry in %ss",
            priority.name.lower(),
            exc.reason,
            exc.retry_after,
        )

    def acquire(self, priority: Priority = Priority.INTERACTIVE) -> None:
        """Spend one call of the budget, or raise BudgetExhausted with when to retry."""
        now = self.clock()

        def work(conn: Connection) -> None:
            # On SQLite the spend's own write lock serialises it (as in `acquire_in`): the
            # state row is written only when it is missing.
            if conn.dialect.name == "sqlite" and self._spend(conn, now, priority):
                return
            self._lock(conn)  # creates the row when missing, so the spend below always counts
            self._spend(conn, now, priority)

        try:
            self._transaction(work)
        except BudgetExhausted as exc:
            self._refused(exc, priority)
            raise

    def acquire_in(self, conn: Connection, priority: Priority = Priority.INTERACTIVE) -> bool:
        """Spend one call inside the caller's own write transaction on the same database.

        Saves a transaction of its own where the caller writes anyway (an upload's slot
        reservation). The call counts only if the caller commits, and the scope's lock is held
        until then, so commit promptly. False (nothing spent) when `conn` is on another database
        or the scope's row does not exist yet: then use `acquire`. BudgetExhausted as `acquire`.
        """
        if not self.shares(conn):
            return False
        now = self.clock()
        # On SQLite the spend's own write lock serialises it: no statement to take a lock.
        # A missing row (False): creating it may race with another process; `acquire` retries.
        if conn.dialect.name != "sqlite" and self._bump(conn) is None:
            return False
        try:
            return self._spend(conn, now, priority)
        except BudgetExhausted as exc:
            self._refused(exc, priority)
            raise

    def _retry_after(
        self, rows: Sequence[tuple[int, int]], used: int, cap: int, now: float
    ) -> float:
        """Seconds until enough old buckets leave the window for one more call."""
        excess = used + 1 - cap
        for start, calls in rows:
            excess -= calls
            if excess <= 0:
                # The bucket counts until the window no longer overlaps it.
                ends = (int(start) + self.bucket) / self.unit + self.window
                return max(1, math.ceil(ends - now))
        return float(self.window)

    def pause(self, seconds: float) -> None:
        """Stop every process from calling upstream for `seconds` (Cloudflare said 429)."""
        until_ms = int((self.clock() + max(0.0, seconds)) * 1000)

        def work(conn: Connection) -> None:
            current = self._lock(conn)
            if until_ms > current:
                conn.execute(
                    sa.update(_state)
                    .where(_state.c.scope == self.scope)
                    .values(paused_until_ms=until_ms)
                )

        self._transaction(work)
        log.warning("upstream calls paused for %.0fs after a 429", seconds)

    def status(self) -> BudgetStatus:
        """Return how much of the window is used and how long a pause has left."""
        now = self.clock()
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(_buckets.c.start, _buckets.c.calls, _buckets.c.background).where(
                    _buckets.c.scope == self.scope, _buckets.c.start >= self._window_start(now)
                )
            ).all()
            paused = conn.execute(
                sa.select(_state.c.paused_until_ms).where(_state.c.scope == self.scope)
            ).scalar()
        return BudgetStatus(
            used=sum(int(calls) for _, calls, _ in rows),
            limit=self.limit,
            reserve=self.reserve,
            window=self.window,
            paused_for=max(0.0, (paused or 0) / 1000 - now),
            background=sum(int(bg or 0) for _, _, bg in rows),
            pace=self._pace(rows, now),
        )

    def _pace(self, rows: Sequence[Any], now: float) -> int:
        """The calls a whole window would hold at the recent rate, from the window's `rows`.

        The rate is read from the start of the current slice and from the start of the one
        before it, and the faster wins: a burst that began after a quiet slice is read over the
        time since its own slice began, not diluted by the quiet one (which would show headroom
        for its first half-minute), and a burst that began late in the slice before is read
        from the current slice alone as soon as that one holds it. The current slice is read
        only once its interactive calls reach `min_burst`, more than one user's pick spends at
        once: one person's files right after a slice begins are not a flood, nor are the
        worker's checks of them meanwhile (background calls). Each reading spans at least the
        time the budget's own pace takes for PACE_MIN_CALLS calls (at most a slice), so a few
        calls close together read as a small share of the limit.
        """
        current = int((now * self.unit) // self.bucket) * self.bucket
        shortest = min(self.bucket / self.unit, self.window * PACE_MIN_CALLS / self.limit)
        fastest = 0.0
        for since in (current, current - self.bucket):
            recent = [(int(n), int(bg or 0)) for start, n, bg in rows if int(start) >= since]
            calls = sum(n for n, _ in recent)
            if since == current and calls - sum(bg for _, bg in recent) < self.min_burst:
                continue
            span = max(now - since / self.unit, shortest)
            fastest = max(fastest, calls * self.window / span)
        return math.ceil(fastest)


def locking() -> sa.Update:
    """The statement taking a scope's lock (`locked_scope`): its state row, written; returns its
    pause.

    For a caller that takes it after locks of its own (PostgreSQL; the user's lock first, as
    every path takes them), then spends in a later statement (`spending`), whose snapshot then
    starts after the lock was granted (READ COMMITTED).
    """
    return _locking()


@functools.cache
def _locking() -> sa.Update:
    return (
        sa.update(_state)
        .where(_state.c.scope == sa.bindparam("locked_scope", type_=sa.String))
        .values(seq=_state.c.seq + 1)
        .returning(_state.c.paused_until_ms)
    )


def spending(
    dialect: str, priority: Priority, when: sa.ColumnElement[bool] | None = None
) -> sa.Executable:
    """The statement spending one call of `priority` (`spending_params`'s parameters), for a
    caller that runs it as part of a statement of its own after `locking`; returns the
    bucket's new count, nothing when refused (pass that to `UpstreamBudget.settle`). With
    `when` (a condition built once: it keys the statement's cache), only when that holds too."""
    return _spending(dialect, priority == Priority.BACKGROUND, when)


@functools.cache
def _spending(
    dialect: str, background: bool, when: sa.ColumnElement[bool] | None = None
) -> sa.Executable:
    """One statement recording a call of one side in bucket `start` when the pause is over and
    the window (buckets from `first` on) has room for it under `limit` and the side's `cap`
    (and `when` holds); returns the bucket's new count, nothing when refused (or the scope's
    row is missing).

    Built once per dialect and side: building a statement costs more than running this one.
    """
    scope = sa.bindparam("scope", type_=sa.String)
    start = sa.bindparam("start", type_=sa.BigInteger)
    own_side = sa.func.coalesce(_buckets.c.background, 0)
    side = own_side if background else _buckets.c.calls - own_side
    room = (
        sa.select(
            sa.and_(
                sa.func.coalesce(sa.func.sum(_buckets.c.calls), 0)
                < sa.bindparam("limit", type_=sa.Integer),
                sa.func.coalesce(sa.func.sum(side), 0) < sa.bindparam("cap", type_=sa.Integer),
            )
        )
        .where(_buckets.c.scope == scope, _buckets.c.start >= sa.bindparam("first"))
        .scalar_subquery()
    )
    # NULL (no row) compares as false: nothing is recorded and `_why_not` says so.
    open_ = sa.select(_state.c.paused_until_ms).where(
        _state.c.scope == scope
    ).scalar_subquery() <= sa.bindparam("now_ms", type_=sa.BigInteger)
    is_background = sa.bindparam("background", type_=sa.Integer)
    call = sa.select(scope, start, sa.literal(1, sa.Integer), is_background).where(open_, room)
    if when is not None:
        call = call.where(when)
    insert = upsert_insert(dialect)(_buckets).from_select(
        ["scope", "start", "calls", "background"], call
    )
    upsert = insert.on_conflict_do_update(
        index_elements=["scope", "start"],
        set_={
            "calls": _buckets.c.calls + 1,
            "background": _buckets.c.background + insert.excluded.background,
        },
    )
    return cast(sa.Executable, upsert.returning(_buckets.c.calls))


def budget_from_settings(
    engine: Engine, settings: Settings, clock: Callable[[], float] = time.time
) -> UpstreamBudget:
    """Build the budget from the app's BROKER_UPSTREAM_* settings."""
    return UpstreamBudget(
        engine,
        limit=settings.upstream_budget,
        window=settings.upstream_budget_window,
        reserve=settings.upstream_background_reserve,
        background_share=settings.upstream_background_share,
        clock=clock,
        min_burst=one_pick(settings),
    )


def one_pick(settings: Settings) -> int:
    """The interactive calls a new slice may hold before its pace is read: one user's pick.

    A create and a complete for each file a user may hold pending, but never more than one
    slice holds at the pace where `/complete` stops verifying inline (`COMPLETE_INLINE_BUDGET`
    of the limit): past that many calls the slice is over that pace however long it goes on,
    so they are read whoever made them: a pending limit raised for bulk clients (100,000
    drafts) must not keep the current slice from ever being read.
    """
    pick = 2 * settings.max_pending_uploads
    at_inline_pace = settings.upstream_budget * settings.complete_inline_budget
    # Rounded first: 1800 * 0.55 / 10 is 99.00000000000001 in floats, and 99 is the cap.
    return min(pick, math.ceil(round(at_inline_pace / BUCKETS_PER_WINDOW, 9)))


def budget_engine(url: str, config: Mapping[str, Any] | None = None) -> Engine:
    """An engine of the budget's own.

    Acquires happen while a request may hold a connection of the main pool; drawing the
    budget's connection from that same pool could deadlock once every pooled connection is
    held by a thread waiting for a second one.
    """
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url, connect_args={"timeout": 10}, **sqlite_pool_options(url, config)
        )

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.close()

        gate_sqlite_writes(engine)
        return engine
    engine = sa.create_engine(url, **server_pool_options(config))
    ping_when_idle(engine)
    return engine


def init_app(app: Flask) -> None:
    """Create the app's budget in `app.extensions["budget"]` (before the Cloudflare client)."""
    settings = settings_of(app)
    engine = budget_engine(settings.database_url, app.config)
    # Tests pass their own clock (UPSTREAM_BUDGET_CLOCK, not a setting) to put the window anywhere.
    clock = app.config.get("UPSTREAM_BUDGET_CLOCK") or time.time
    app.extensions[EXTENSION_KEY] = budget_from_settings(engine, settings, clock)


def get_budget() -> UpstreamBudget:
    """Return the current app's shared budget."""
    from flask import current_app

    return cast(UpstreamBudget, current_app.extensions[EXTENSION_KEY])


def metric_lines(session: object) -> list[str]:
    """The upstream budget's gauges of `/metrics`: use, limit and any pause."""
    status = get_budget().status()
    return [
        *health.gauge(
            "broker_upstream_budget_used",
            "Cloudflare calls counted in the current window.",
            status.used,
        ),
        *health.gauge(
            "broker_upstream_budget_limit", "Cloudflare calls allowed per window.", status.limit
        ),
        *health.gauge(
            "broker_upstream_paused_seconds",
            "Seconds left of a pause after Cloudflare's 429.",
            round(status.paused_for, 1),
        ),
    ]

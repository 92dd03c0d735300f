"""The shared upstream budget: limits, priorities, the 429 pause, several processes."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from flask import Flask

from broker.platform.config import settings_of
from broker.platform.db import db
from broker.upstream.budget import BudgetExhausted, UpstreamBudget, one_pick
from broker.upstream.cloudflare import Priority


class Clock:
    """A settable clock for the budget (never sleep in tests)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _budget(app: Flask, clock: Clock, **kwargs: int) -> UpstreamBudget:
    with app.app_context():
        engine = db.engine
    settings = {"limit": 10, "window": 100, "reserve": 3, **kwargs}
    return UpstreamBudget(engine, clock=clock, **settings)


def test_interactive_calls_may_use_the_whole_budget(app: Flask) -> None:
    clock = Clock()
    budget = _budget(app, clock)
    for _ in range(10):
        budget.acquire(Priority.INTERACTIVE)
    with pytest.raises(BudgetExhausted) as exc:
        budget.acquire(Priority.INTERACTIVE)
    assert exc.value.reason == "budget"
    assert 0 < exc.value.retry_after <= 110
    assert budget.status().used == 10


def test_background_calls_stop_at_the_reserve(app: Flask) -> None:
    clock = Clock()
    budget = _budget(app, clock)
    for _ in range(7):
        budget.acquire(Priority.BACKGROUND)
    with pytest.raises(BudgetExhausted):
        budget.acquire(Priority.BACKGROUND)
    # The reserve is still there for a person waiting on an upload URL.
    for _ in range(3):
        budget.acquire(Priority.INTERACTIVE)
    with pytest.raises(BudgetExhausted):
        budget.acquire(Priority.INTERACTIVE)


def test_a_burst_of_interactive_calls_leaves_background_its_share(app: Flask) -> None:
    clock = Clock()
    budget = _budget(app, clock, limit=20, reserve=4, background_share=5)
    granted = 0
    for _ in range(30):  # a burst of creates, far more than the window allows
        try:
            budget.acquire(Priority.INTERACTIVE)
            granted += 1
        except BudgetExhausted as exc:
            assert exc.reason == "budget" and exc.retry_after > 0
    assert granted == 15
    # Verification and expiry still get their guaranteed five calls during the burst.
    for _ in range(5):
        budget.acquire(Priority.BACKGROUND)
    with pytest.raises(BudgetExhausted):
        budget.acquire(Priority.BACKGROUND)
    assert budget.status().used == 20


def test_the_pace_reads_the_last_slices_not_the_whole_window(app: Flask) -> None:
    """`used` is the window's count; `pace` is what a window would hold at the recent rate."""
    clock = Clock(1_700_000_000.0)  # a slice (10 s of a 100 s window) starts here
    budget = _budget(app, clock, limit=100, reserve=10)
    for _ in range(4):  # early in the window: a quiet start
        budget.acquire(Priority.INTERACTIVE)
    clock.now += 50
    status = budget.status()
    assert (status.used, status.pace) == (4, 0)  # nothing in the last two slices
    for _ in range(6):  # then six calls within a few seconds
        budget.acquire(Priority.BACKGROUND)
    clock.now += 5
    status = budget.status()
    # Read from the current slice's start (the quiet one before it does not dilute them), over
    # at least 10 s here (a slice; 20 calls at this budget's full pace take longer): 60.
    assert (status.used, status.background, status.pace) == (10, 6, 60)
    assert status.projected == 60
    clock.now += 30  # the burst has left the last two slices; the window still holds it
    status = budget.status()
    assert (status.used, status.pace, status.projected) == (10, 0, 10)


def _calls(budget: UpstreamBudget, clock: Clock, seconds: float, per_second: int) -> None:
    """Spend `per_second` calls a second, evenly, for `seconds` of the budget's clock."""
    for _ in range(round(seconds * per_second)):
        budget.acquire(Priority.INTERACTIVE)
        clock.now += 1 / per_second


def test_the_pace_of_a_burst_is_read_from_when_it_began(app: Flask) -> None:
    """A burst after a quiet slice shows its real pace from its first seconds, not after the
    quiet slice has left the reading; a few calls close together are not read as a flood."""
    clock = Clock(1_700_000_000.0)  # a slice (10 s of a 1000-call, 100 s window) starts here
    budget = _budget(app, clock, limit=1000, reserve=100)
    budget.acquire()  # the quiet start of the window
    clock.now += 50  # the slice before this one (40-50 s) saw nothing
    budget.acquire()
    budget.acquire()
    # Two calls at once read over at least the 2 s the budget's full pace takes for 20 calls.
    assert budget.status().pace == 100
    _calls(budget, clock, 5, per_second=4)  # the burst: 4 calls a second, 400 per window
    status = budget.status()
    assert status.used == 23
    # 22 calls since the slice began 5 s ago: the burst's own pace, at once (not 22 in the 15 s
    # since the quiet slice began, 147, as if most of the headroom were still there).
    assert status.pace == 440
    _calls(budget, clock, 7, per_second=4)  # on into the next slice, 2 s into it
    # The 50 calls since 50 s (12 s) read faster than the 8 of the last 2 s: 417.
    assert budget.status().pace == 417


def test_a_burst_begun_late_in_a_slice_is_read_from_the_next_one(app: Flask) -> None:
    clock = Clock(1_700_000_000.0 + 7)  # 3 s before a slice ends
    budget = _budget(app, clock, limit=1000, reserve=100)
    _calls(budget, clock, 3, per_second=4)  # 12 calls late in the slice
    _calls(budget, clock, 5, per_second=4)  # and 20 in the first 5 s of the next
    # Since the slice before began (15 s ago): 32 calls → 214; since this one began: 400.
    assert budget.status().pace == 400


def _forgiving_budget(app: Flask, clock: Clock) -> UpstreamBudget:
    """A 1000-call, 100 s window that forgives one user's pick of 40 calls in a new slice."""
    engine = app.extensions["budget"].engine
    return UpstreamBudget(engine, limit=1000, window=100, reserve=100, clock=clock, min_burst=40)


def test_the_current_slice_is_read_once_it_holds_more_than_one_users_burst(app: Flask) -> None:
    clock = Clock(1_700_000_000.0)  # a slice (10 s of a 1000-call, 100 s window) starts here
    budget = _forgiving_budget(app, clock)
    for _ in range(39):  # one user's pick: fewer calls than min_burst, right after a quiet slice
        budget.acquire()
    clock.now += 1
    # Read from the quiet slice's start (11 s), not over the 2 s floor of this one (1950).
    assert budget.status().pace == 355
    budget.acquire()  # 40: more than one user spends at once, read at its own pace
    assert budget.status().pace == 2000


def test_the_workers_calls_meanwhile_are_not_part_of_a_users_burst(app: Flask) -> None:
    clock = Clock(1_700_000_000.0)  # a slice (10 s of a 1000-call, 100 s window) starts here
    budget = _forgiving_budget(app, clock)
    for _ in range(39):  # one user's pick
        budget.acquire()
    for _ in range(5):  # the worker checking its uploads (background)
        budget.acquire(Priority.BACKGROUND)
    clock.now += 1
    # 44 calls, 39 of them the user's: read from the quiet slice's start (11 s).
    assert budget.status().pace == 400
    budget.acquire()  # the 40th interactive call: the slice is read at its own pace (2 s floor)
    assert budget.status().pace == 2250


@pytest.mark.parametrize(
    ("budget", "share", "pending", "pick"),
    [
        (1000, 0.5, 20, 40),  # the defaults: a create and a complete for each of 20 files
        (1000, 0.5, 100_000, 50),  # a bulk client's limit: a slice's calls at 500 a window
        (1150, 0.5, 100_000, 58),  # bench_completion.py's budget
        (1000, 0.5, 24, 48),
        (1000, 0.2, 20, 20),  # inline checks stop sooner: so does the forgiveness
        (1000, 0.0, 20, 0),  # no inline checks: every slice is read
        (1800, 0.55, 100_000, 99),  # 99.00000000000001 in floats
    ],
)
def test_one_pick_is_a_users_files_up_to_a_slice_at_the_inline_pace(
    app: Flask, budget: int, share: float, pending: int, pick: int
) -> None:
    settings = dataclasses.replace(
        settings_of(app),
        upstream_budget=budget,
        complete_inline_budget=share,
        max_pending_uploads=pending,
    )
    assert one_pick(settings) == pick


def test_the_apps_budget_forgives_one_pick(make_app: Callable[..., Flask]) -> None:
    app = make_app(MAX_PENDING_UPLOADS=100_000, UPSTREAM_BUDGET=1150)
    assert app.extensions["budget"].min_burst == 58


def test_background_calls_count_against_their_own_side_only(app: Flask) -> None:
    clock = Clock()
    budget = _budget(app, clock, limit=20, reserve=4, background_share=5)
    for _ in range(3):
        budget.acquire(Priority.BACKGROUND)
    # Background calls below their share leave interactive its whole side (20 - 5)...
    for _ in range(15):
        budget.acquire(Priority.INTERACTIVE)
    with pytest.raises(BudgetExhausted):
        budget.acquire(Priority.INTERACTIVE)
    # ...and the two remaining calls of the window are background's.
    budget.acquire(Priority.BACKGROUND)
    budget.acquire(Priority.BACKGROUND)
    with pytest.raises(BudgetExhausted):
        budget.acquire(Priority.BACKGROUND)
    # Once the window has passed, both sides start again.
    clock.now += 111
    budget.acquire(Priority.INTERACTIVE)
    budget.acquire(Priority.BACKGROUND)


def test_calls_leave_the_window_and_retry_after_says_when(app: Flask) -> None:
    clock = Clock(1_700_000_000.0)
    budget = _budget(app, clock)
    for _ in range(5):
        budget.acquire()
    clock.now += 50
    for _ in range(5):
        budget.acquire()
    with pytest.raises(BudgetExhausted) as exc:
        budget.acquire()
    clock.now += exc.value.retry_after
    budget.acquire()  # the first five have left the window
    for _ in range(4):
        budget.acquire()
    with pytest.raises(BudgetExhausted):
        budget.acquire()


def test_never_more_than_the_limit_in_any_sliding_window(app: Flask) -> None:
    """Bursts at a bucket edge cannot double the rate the way fixed windows can."""
    clock = Clock(1_700_000_000.0)
    budget = _budget(app, clock, limit=20, window=60, reserve=0)
    granted: list[float] = []
    for _ in range(600):
        try:
            budget.acquire()
            granted.append(clock.now)
        except BudgetExhausted:
            pass
        clock.now += 0.7
    for t in granted:
        assert sum(1 for g in granted if t - 60 < g <= t) <= 20
    assert len(granted) > 100


def test_a_429_pauses_every_call_until_retry_after(app: Flask) -> None:
    clock = Clock()
    budget = _budget(app, clock)
    budget.pause(30)
    with pytest.raises(BudgetExhausted) as exc:
        budget.acquire(Priority.INTERACTIVE)
    assert exc.value.reason == "paused"
    assert exc.value.retry_after == 30
    assert budget.status().paused_for == 30
    clock.now += 30
    budget.acquire()
    assert budget.status().used == 1


def test_a_shorter_pause_does_not_shorten_a_longer_one(app: Flask) -> None:
    clock = Clock()
    budget = _budget(app, clock)
    budget.pause(300)
    budget.pause(5)
    clock.now += 10
    with pytest.raises(BudgetExhausted):
        budget.acquire()


def test_the_budget_holds_across_two_apps_on_one_database(
    make_app: Callable[..., Flask],
) -> None:
    """Two app instances (two processes in production) share one budget through the database."""
    clock = Clock()
    first = _budget(make_app(), clock, limit=40, reserve=0)
    second = _budget(make_app(), clock, limit=40, reserve=0)
    granted: list[int] = []
    refused: list[int] = []

    def spend(budget: UpstreamBudget) -> None:
        for _ in range(30):
            try:
                budget.acquire()
                granted.append(1)
            except BudgetExhausted:
                refused.append(1)

    threads = [threading.Thread(target=spend, args=(b,)) for b in (first, second, first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 40
    assert len(refused) == 80
    assert first.status().used == second.status().used == 40


def test_the_apps_budget_comes_from_the_settings(make_app: Callable[..., Flask]) -> None:
    app = make_app(
        UPSTREAM_BUDGET=50,
        UPSTREAM_BUDGET_WINDOW=60,
        UPSTREAM_BACKGROUND_RESERVE=5,
        UPSTREAM_BACKGROUND_SHARE=7,
    )
    budget = app.extensions["budget"]
    assert (budget.limit, budget.window, budget.reserve, budget.background_share) == (50, 60, 5, 7)
    assert app.extensions["cloudflare"].budget is budget


def test_refuses_a_reserve_as_large_as_the_limit(app: Flask) -> None:
    with pytest.raises(ValueError):
        _budget(app, Clock(), limit=5, reserve=5)


def test_a_one_second_rate_in_the_database_allows_close_to_its_limit(app: Flask) -> None:
    """The batch host's 200 calls per second per token, counted in 100 ms slices: offered 250/s,
    it grants 180 a second on average (170 at least in each), never more than 200 within any
    one second (whole-second slices allowed only 100 a second)."""
    clock = Clock(1_700_000_000.0)
    rate = _budget(app, clock, limit=200, window=1, reserve=0)
    granted: list[float] = []
    for i in range(1000):  # 4 s at 250 calls per second
        clock.now = 1_700_000_000.0 + i / 250
        try:
            rate.acquire(Priority.INTERACTIVE)
            granted.append(clock.now)
        except BudgetExhausted as exc:
            assert exc.retry_after >= 1
    for second in range(4):
        start = 1_700_000_000.0 + second
        assert sum(start <= t < start + 1 for t in granted) >= 170
    assert len(granted) >= 4 * 180
    assert max(sum(t0 <= t < t0 + 1 for t in granted) for t0 in granted) <= 200


def test_spends_inside_callers_transactions_never_exceed_either_side(
    make_app: Callable[..., Flask],
) -> None:
    """The create path's way (`acquire_in`, in the caller's transaction), racing from two apps
    on one database: the limit and the background's side both hold exactly."""
    clock = Clock()
    first = _budget(make_app(), clock, limit=40, reserve=5)
    second = _budget(make_app(), clock, limit=40, reserve=5)
    first.acquire(Priority.BACKGROUND)  # creates the scope's row
    granted: dict[Priority, list[int]] = {Priority.INTERACTIVE: [], Priority.BACKGROUND: []}

    def spend(budget: UpstreamBudget, priority: Priority) -> None:
        for _ in range(30):
            try:
                with budget.engine.begin() as conn:
                    assert budget.acquire_in(conn, priority)
                granted[priority].append(1)
            except BudgetExhausted:
                pass

    threads = [
        threading.Thread(target=spend, args=(budget, priority))
        for budget in (first, second)
        for priority in (Priority.INTERACTIVE, Priority.BACKGROUND)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    background = len(granted[Priority.BACKGROUND]) + 1
    assert background <= 35
    assert len(granted[Priority.INTERACTIVE]) + background == 40
    assert first.status().used == second.status().used == 40
    assert first.status().background == background


def test_on_sqlite_a_spend_writes_the_state_row_only_to_create_it(app: Flask) -> None:
    """SQLite serialises the spend's own write: the scope's state row is written once (when
    missing), not on every call; PostgreSQL locks it on every call."""
    clock = Clock()
    budget = _budget(app, clock)
    statements: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    sa.event.listen(budget.engine, "before_cursor_execute", seen)
    try:
        for _ in range(3):
            budget.acquire(Priority.INTERACTIVE)
    finally:
        sa.event.remove(budget.engine, "before_cursor_execute", seen)
    state = [
        s
        for s in statements
        if s.split()[:3] in (["UPDATE", "upstream_budget_state", "SET"],)
        or s.startswith("INSERT INTO upstream_budget_state ")
    ]
    # Creating the row tries to update it first, then inserts it; PostgreSQL then locks it
    # by writing it on every call, SQLite never writes it again.
    sqlite = budget.engine.dialect.name == "sqlite"
    assert len(state) == (2 if sqlite else 2 + 2)
    assert budget.status().used == 3

"""Several batch tokens when the configured rate is above one token's, against the emulator
over real HTTP and the real database: the calls spread over the tokens, none is sent past its
own rate, a revoked one is replaced, a rate one token carries keeps one token, and the
per-token counts are shared by processes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa
import time_machine
from flask import Flask

from broker.auth.models import User
from broker.emulator.testing import EmulatorServer
from broker.platform.config import ConfigError
from broker.platform.db import db
from broker.upstream.batch import (
    RATE_WAIT,
    BatchRoute,
    DatabaseRate,
    RedisRate,
    token_shares,
)
from broker.upstream.budget import BudgetExhausted
from broker.upstream.cloudflare import (
    CloudflareAuthError,
    CloudflareNotFound,
    Priority,
    get_client,
)
from broker.upstream.models import UpstreamBatchFallback, UpstreamBatchToken, UpstreamBudgetBucket
from tests.support.batch import batch_app, batch_route, create

NOW = 1_800_000_000.25


def _details(app: Flask) -> None:
    """One details call through the batch route (of an image that is not there: a 404)."""
    with app.app_context(), pytest.raises(CloudflareNotFound):
        get_client().get_image("not-there")


def _tokens(route: BatchRoute) -> list[str]:
    values = [slot.token.value for slot in route.slots if slot.token is not None]
    assert len(values) == len(route.slots)
    return values


def _stored(app: Flask) -> dict[str, bool]:
    """The token rows in the database: scope → whether it holds a token."""
    with app.app_context():
        rows = db.session.execute(sa.select(UpstreamBatchToken.scope, UpstreamBatchToken.token))
        return {scope: token is not None for scope, token in rows}


def test_the_rate_is_split_over_the_fewest_tokens() -> None:
    assert token_shares(200, 200) == [200]
    assert token_shares(150, 200) == [150]
    assert token_shares(400, 200) == [200, 200]
    assert token_shares(201, 200) == [101, 100]
    assert token_shares(1000, 300) == [250, 250, 250, 250]


def test_the_broker_holds_at_most_sixteen_batch_tokens(make_app: Callable[..., Flask]) -> None:
    """Sixteen tokens' worth of rate builds sixteen slots; a rate that would take a
    seventeenth stops the start, naming the setting (not thousands of rows and fetches)."""
    assert len(batch_route(batch_app(make_app, CLOUDFLARE_BATCH_RATE=3200)).slots) == 16
    with pytest.raises(ConfigError, match="BROKER_CLOUDFLARE_BATCH_RATE must be at most 16"):
        batch_app(make_app, CLOUDFLARE_BATCH_RATE=161, CLOUDFLARE_BATCH_TOKEN_RATE=10)


def test_a_rate_of_400_spreads_calls_over_two_tokens_none_past_200(
    make_app: Callable[..., Flask], emulator: EmulatorServer
) -> None:
    """Every call in one stopped second (the tokens fetched before it): 400 go through, 200
    on each token (the emulator's own count, never a 429), taken in turn; the 401st waits for
    a token with room, then gives up."""
    app = batch_app(make_app, CLOUDFLARE_BATCH_RATE=400)
    route = batch_route(app)
    rates = [slot.rate for slot in route.slots]
    assert all(isinstance(rate, DatabaseRate) for rate in rates)
    assert [rate.limit for rate in rates if isinstance(rate, DatabaseRate)] == [200, 200]
    pauses: list[float] = []
    route._sleep = pauses.append
    with time_machine.travel(NOW - 2, tick=False):
        # Each fetches its token first, so it is counted twice: in a second of its own.
        _details(app)
        _details(app)
    first, second = _tokens(route)
    assert first != second
    with time_machine.travel(NOW, tick=False):
        for _ in range(10):
            _details(app)
        # Taken in turn, not one filled before the other.
        assert emulator.batch_token_use(first) == emulator.batch_token_use(second) == (6, 5)
        for _ in range(390):
            _details(app)
        assert emulator.batch_token_use(first) == (201, 200)
        assert emulator.batch_token_use(second) == (201, 200)
        assert pauses == []
        with app.app_context(), pytest.raises(BudgetExhausted):
            get_client().get_image("not-there")
        assert 0 < sum(pauses) <= RATE_WAIT  # waited (without sleeping), then gave up
    counters = emulator.counters()
    assert counters["batch_token"] == 2
    assert counters["batch.image_details"] == 402 and "image_details" not in counters
    assert emulator.kinds()["throttled"] == 0
    assert _stored(app) == {"cloudflare": True, "cloudflare.1": True}
    with time_machine.travel(NOW + 1.1, tick=False):
        _details(app)  # the second has passed: a token has room again
    assert emulator.counters()["batch.image_details"] == 403


def test_each_token_is_renewed_on_its_own_before_it_expires(
    make_app: Callable[..., Flask], emulator: EmulatorServer
) -> None:
    """Two tokens fetched 20 minutes apart: 4 minutes before the first expires, only the first
    is fetched again; the second is renewed later, when its own time comes."""
    app = batch_app(make_app, CLOUDFLARE_BATCH_RATE=400)
    route = batch_route(app)
    with time_machine.travel(NOW, tick=False):
        _details(app)  # the first token
    with time_machine.travel(NOW + 1200, tick=False):
        _details(app)  # the second
    first, second = _tokens(route)
    expiries = [slot.token.expires_at.timestamp() for slot in route.slots if slot.token]
    assert expiries[1] - expiries[0] == 1200
    with time_machine.travel(expiries[0] - 240, tick=False):
        _details(app)
        _details(app)
    renewed, kept = _tokens(route)
    assert renewed != first and kept == second
    assert emulator.counters()["batch_token"] == 3
    with time_machine.travel(expiries[1] - 240, tick=False):
        _details(app)
        _details(app)
    still, renewed_later = _tokens(route)
    assert still == renewed and renewed_later != second
    assert emulator.counters()["batch_token"] == 4
    assert "image_details" not in emulator.counters()  # every call on the batch host


@pytest.mark.parametrize("rate", [200, 150])
def test_a_rate_one_token_carries_keeps_exactly_one_token(
    make_app: Callable[..., Flask],
    alice: User,
    bearer: Callable[..., dict[str, str]],
    emulator: EmulatorServer,
    rate: int,
) -> None:
    app = batch_app(make_app, CLOUDFLARE_BATCH_RATE=rate)
    assert len(batch_route(app).slots) == 1
    auth = bearer(app, alice)
    for _ in range(4):
        create(app, auth)
    for _ in range(4):
        _details(app)
    counters = emulator.counters()
    assert counters["batch_token"] == 1  # no token asked for beyond the one
    assert counters["batch.direct_upload"] == 4
    assert _stored(app) == {"cloudflare": True}
    with app.app_context():
        scopes = set(db.session.scalars(sa.select(UpstreamBudgetBucket.scope)))
    # Counted under the one token's name only (the global budget's own scope aside).
    assert {scope for scope in scopes if scope.startswith("batch")} == {"batch"}


def test_a_token_revoked_at_the_emulator_is_replaced_without_failing_a_create(
    make_app: Callable[..., Flask],
    alice: User,
    bearer: Callable[..., dict[str, str]],
    emulator: EmulatorServer,
) -> None:
    """Two tokens; Cloudflare revokes the second: the create that meets it is sent to the
    global API at once (201), that token alone is fetched again, and the batch host keeps the
    endpoint (no fall-back for the cool-down)."""
    app, other = (
        batch_app(make_app, CLOUDFLARE_BATCH_RATE=400),
        batch_app(make_app, CLOUDFLARE_BATCH_RATE=400),
    )
    route = batch_route(app)
    auth = bearer(app, alice)
    create(app, auth)
    create(app, auth)
    first, second = _tokens(route)
    emulator.revoke_batch_token(second)
    images = [
        create(app, auth)["image_id"] for _ in range(4)
    ]  # slot 0, slot 1 (refused), 0, 1 (new)
    assert len(set(images)) == 4
    counters = emulator.counters()
    assert counters["batch_token"] == 3  # the revoked one replaced, the other kept
    assert counters["direct_upload"] == 1  # only the refused create went global
    assert counters["batch.direct_upload"] == 6  # 5 made there, 1 refused with 401
    assert route.uses_batch("direct_upload")
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(UpstreamBatchFallback)) == 0
    kept, replaced = _tokens(route)
    assert kept == first and replaced not in (first, second)
    assert emulator.batch_token_use(replaced)[0] == 1
    # Another process reads the replacement from the database: no fetch of its own.
    create(other, auth)
    create(other, auth)
    assert sorted(_tokens(batch_route(other))) == sorted([first, replaced])
    assert emulator.counters()["batch_token"] == 3


def test_a_refusal_drops_the_token_of_the_call_it_answered(
    make_app: Callable[..., Flask], alice: User, bearer: Callable[..., dict[str, str]]
) -> None:
    """Two calls' tokens taken on one thread, the first refused afterwards: the refusal names
    its own call, so the first call's token goes and the second's stays (a thread-local
    pairing would have dropped whichever token this thread took last)."""
    app = batch_app(make_app, CLOUDFLARE_BATCH_RATE=400)
    route = batch_route(app)
    auth = bearer(app, alice)
    create(app, auth)
    create(app, auth)  # both slots hold a token
    with app.app_context():
        first = route.token(get_client(), Priority.INTERACTIVE)
        second = route.token(get_client(), Priority.INTERACTIVE)
    assert first is not None and second is not None and first.slot is not second.slot
    assert route.failed("direct_upload", CloudflareAuthError(401, None, "refused"), first)
    assert first.slot.token is None
    assert second.slot.token is second.token
    assert _stored(app) == {first.slot.scope: False, second.slot.scope: True}


def test_when_replacement_tokens_are_refused_too_the_endpoint_falls_back(
    make_app: Callable[..., Flask],
    alice: User,
    bearer: Callable[..., dict[str, str]],
    emulator: EmulatorServer,
) -> None:
    """A batch host that refuses every token (as some accounts report): the first refusal is
    taken for a revoked token and replaced; the replacement refused too, the endpoint goes to
    the global API for the cool-down. No create fails meanwhile."""
    app = batch_app(make_app)
    auth = bearer(app, alice)
    emulator.inject_fault("batch.direct_upload", status=401)
    for _ in range(3):
        create(app, auth)
    counters = emulator.counters()
    assert counters["batch_token"] == 2
    assert counters["batch.direct_upload"] == 2 and counters["direct_upload"] == 3
    assert not batch_route(app).uses_batch("direct_upload")


@pytest.mark.parametrize("storage", ["database", "redis"])
def test_processes_share_each_tokens_count_apart(
    make_app: Callable[..., Flask],
    emulator: EmulatorServer,
    request: pytest.FixtureRequest,
    storage: str,
) -> None:
    """Two apps (as two processes) with a rate of 10 at 5 a token: what one spends on a token
    the other sees on that token only; together they get 10 calls a second, 5 per token."""
    extra = (
        {"RATELIMIT_STORAGE_URI": request.getfixturevalue("redis_uri")}
        if storage == "redis"
        else {}
    )
    apps = [
        batch_app(make_app, CLOUDFLARE_BATCH_RATE=10, CLOUDFLARE_BATCH_TOKEN_RATE=5, **extra)
        for _ in range(2)
    ]
    routes = [batch_route(app) for app in apps]
    kind = RedisRate if storage == "redis" else DatabaseRate
    assert all(len(r.slots) == 2 and isinstance(r.slots[1].rate, kind) for r in routes)
    for route in routes:
        route._sleep = lambda _: None
    with time_machine.travel(NOW, tick=False):
        # The first process fills the first token: the second finds it full, the other free.
        for _ in range(5):
            routes[0].slots[0].rate.acquire(Priority.INTERACTIVE)
        with pytest.raises(BudgetExhausted):
            routes[1].slots[0].rate.acquire(Priority.INTERACTIVE)
        routes[1].slots[1].rate.acquire(Priority.INTERACTIVE)
        # Calls through either process now take the second token's 4 places left, then stop.
        for n in range(4):
            with apps[n % 2].app_context():
                assert routes[n % 2].token(get_client(), Priority.INTERACTIVE)
        for route, app in zip(routes, apps, strict=True):
            with app.app_context(), pytest.raises(BudgetExhausted):
                route.token(get_client(), Priority.INTERACTIVE)
    with time_machine.travel(NOW + 1.1, tick=False):
        for _ in range(5):
            routes[1].slots[0].rate.acquire(Priority.INTERACTIVE)
        with pytest.raises(BudgetExhausted):
            routes[0].slots[0].rate.acquire(Priority.INTERACTIVE)
    assert emulator.counters()["batch_token"] == 1  # the second token only: the first was full

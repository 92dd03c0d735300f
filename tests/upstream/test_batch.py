"""The Images batch API through the broker, against the emulator over real HTTP: one token for
every process, refreshed before it expires, routing per endpoint, fall-back on 103 / refused
tokens / repeated errors, the per-token rate shared across processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
import time_machine
from flask import Flask

from broker.auth.models import User
from broker.emulator.testing import EmulatorServer
from broker.platform.db import db
from broker.uploads.models import Upload
from broker.upstream.batch import ERRORS_BEFORE_FALLBACK, BatchRoute, MemoryRate, RedisRate
from broker.upstream.budget import BudgetExhausted
from broker.upstream.cloudflare import CloudflareNotFound, Priority
from broker.upstream.models import UpstreamBatchToken
from broker.worker import run_once
from tests.factories import production_env
from tests.support.batch import METRICS, URL, batch_app, batch_route, create
from tests.support.redis_server import redis_server
from tests.system.topology import BIN, ROOT, listening_socket, topology, wait_for, wait_http


def _send_file(body: dict[str, Any]) -> None:
    from broker.emulator.testing import make_image

    with requests.post(
        body["upload_url"], files={"file": ("a.png", make_image())}, timeout=10
    ) as resp:
        assert resp.status_code == 200, resp.text


def _drafts(emulator: EmulatorServer, user: User) -> int:
    """How many drafts Cloudflare holds for `user` (the session's emulator outlives tests)."""
    rows = emulator.emulator.store._query(
        "SELECT COUNT(*) FROM images WHERE draft = 1 AND creator = ?", (user.public_id,)
    )
    return int(rows[0][0])


def test_processes_share_one_token_and_creates_skip_the_global_api(
    make_app: Callable[..., Flask],
    alice: User,
    bearer: Callable[..., dict[str, str]],
    emulator: EmulatorServer,
) -> None:
    first, second = batch_app(make_app), batch_app(make_app)  # two processes' apps
    auth = bearer(first, alice)
    bodies = [create(app, auth) for app in (first, second, first, second)]
    counters = emulator.counters()
    assert counters.get("batch_token") == 1  # fetched once, for both
    assert counters.get("batch.direct_upload") == 4
    assert "direct_upload" not in counters
    assert emulator.kinds()["global_api"] == 1
    # The drafts are real, with the user as creator, and the token lives in the database.
    for body in bodies:
        image = emulator.emulator.store.get_image(body["image_id"])
        assert image is not None and image.draft and image.creator == alice.public_id
    with first.app_context():
        row = db.session.get(UpstreamBatchToken, "cloudflare")
        assert row is not None and row.token and row.expires_at is not None
        assert row.lease_owner is None


def test_a_process_that_read_before_another_stored_the_token_does_not_fetch_again(
    make_app: Callable[..., Flask], emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race two processes starting at once ran into: the second read "no token" just before
    the first stored one (and released the lease), then won the lease itself."""
    first, second = batch_app(make_app), batch_app(make_app)
    late = batch_route(second)
    reads: list[object] = []
    real_read = late._read

    def read(slot: Any) -> object:
        reads.append(None)
        # Its first read happened before the first process stored the token.
        return None if len(reads) == 1 else real_read(slot)

    monkeypatch.setattr(late, "_read", read)
    with first.app_context():
        from broker.upstream.cloudflare import get_client

        call = batch_route(first).token(get_client(), Priority.INTERACTIVE)
    with second.app_context():
        late_call = late.token(get_client(), Priority.INTERACTIVE)
    assert call is not None and late_call is not None and late_call.value == call.value
    assert len(reads) == 2  # the stale read, then the one after winning the lease
    assert emulator.counters().get("batch_token") == 1


def test_a_forked_process_cannot_release_another_processs_refresh_lease(
    make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Web processes forked from the master share the route object: each names itself anew,
    so one's release never clears the lease another holds."""
    app = batch_app(make_app)
    route = batch_route(app)
    slot = route.slots[0]
    holder = route.owner
    assert route.owner == holder  # stable within one process
    assert route._claim_refresh(slot, route._now())
    parent = os.getpid()
    monkeypatch.setattr("broker.upstream.batch.os.getpid", lambda: parent + 1)  # the fork
    assert route.owner != holder
    route._release_refresh(slot)
    with app.app_context():
        row = db.session.get(UpstreamBatchToken, slot.scope)
        assert row is not None and row.lease_owner == holder and row.lease_until is not None


class _Counting:
    """A per-second rate that records the moment of each call it counts."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.counted: list[float] = []

    def acquire(self, priority: Priority = Priority.INTERACTIVE) -> None:
        self.counted.append(self.clock())


def test_a_call_that_waited_for_its_token_is_counted_again_when_sent(
    make_app: Callable[..., Flask], emulator: EmulatorServer
) -> None:
    """token() counts the call before it may fetch a token (seconds, with retries): the send
    then counts again, in the second it really leaves; a token in memory is counted once."""
    app = batch_app(make_app)
    now = [1_000_000.0]
    rate = _Counting(lambda: now[0])
    shared = batch_route(app)
    route = BatchRoute(shared.engine, shared.base, rate, keyring=shared.keyring, clock=rate.clock)

    class SlowSource:
        def fetch_batch_token(self, priority: Priority) -> tuple[str, Any]:
            with app.app_context():
                from broker.upstream.cloudflare import get_client

                answer = get_client().fetch_batch_token(priority)
            now[0] += 2.5  # the fetch took seconds
            return answer

    call = route.token(SlowSource(), Priority.INTERACTIVE)
    assert call is not None and not call.paid
    route.spend(call)  # the first attempt, as the client's send counts it
    assert rate.counted == [1_000_000.0, 1_000_002.5]
    call = route.token(SlowSource(), Priority.INTERACTIVE)  # now in memory
    assert call is not None and call.paid
    route.spend(call)
    assert rate.counted == [1_000_000.0, 1_000_002.5, 1_000_002.5]
    route.spend(call)  # a retry counts
    assert len(rate.counted) == 4


def test_a_call_prepaid_on_the_global_budget_counts_each_batch_attempt(
    make_app: Callable[..., Flask], emulator: EmulatorServer
) -> None:
    """The caller prepaid the global budget, then the endpoint went to the batch host: the
    batch token's rate still counts the first attempt and the retry."""
    app = batch_app(make_app)
    rate = _Counting(time.time)
    shared = batch_route(app)
    route = BatchRoute(shared.engine, shared.base, rate, keyring=shared.keyring)
    with app.app_context():
        from broker.upstream.cloudflare import get_client

        client = get_client()
        route.token(client, Priority.INTERACTIVE)  # the token in memory: counted once a call
        rate.counted.clear()
        client.batch_route, client._sleep = route, lambda _: None
        emulator.inject_fault("batch.image_details", status=503, count=1)
        with pytest.raises(CloudflareNotFound):
            client.request("GET", "/v1/not-there", prepaid=True, batch="image_details")
    assert emulator.counters().get("batch.image_details") == 2
    assert len(rate.counted) == 2


def test_token_is_refreshed_before_it_expires(
    make_app: Callable[..., Flask],
    alice: User,
    bearer: Callable[..., dict[str, str]],
    emulator: EmulatorServer,
) -> None:
    app, other = batch_app(make_app), batch_app(make_app)
    auth = bearer(app, alice)
    create(app, auth)
    with app.app_context():
        old = db.session.get(UpstreamBatchToken, "cloudflare")
        assert old is not None and old.expires_at is not None
        old_token, expires = old.token, old.expires_at.timestamp()
    # 4 minutes before expiry (refresh starts 5 minutes before): one process refreshes.
    for each in (app, other):
        batch_route(each).clock = lambda: expires - 240
    create(app, auth)
    create(other, auth)
    assert emulator.counters().get("batch_token") == 2
    with app.app_context():
        new = db.session.get(UpstreamBatchToken, "cloudflare")
        assert new is not None and new.token != old_token
    # The old token was still good while the new one was fetched: nothing went global.
    assert "direct_upload" not in emulator.counters()


def test_endpoints_are_routed_to_the_batch_host_or_the_global_api(
    make_app: Callable[..., Flask],
    alice: User,
    bearer: Callable[..., dict[str, str]],
    emulator: EmulatorServer,
) -> None:
    app = batch_app(make_app)
    auth = bearer(app, alice)
    client = app.test_client()
    done, silent, quiet = create(app, auth), create(app, auth), create(app, auth)
    _send_file(done)
    # A cooperative client: verified inline through the batch host (one details call).
    completed = client.post(f"{URL}/{done['id']}/complete", headers=auth)
    assert completed.status_code == 200 and completed.get_json()["status"] == "ready"
    # Silent clients: the worker's listing finds them, through the batch host too.
    _send_file(quiet)
    with app.app_context():
        row = db.session.get(Upload, silent["id"])
        assert row is not None and row.next_check_at is not None
        due = row.next_check_at
    import time_machine

    with time_machine.travel(due.timestamp() + 5, tick=False):
        run_once(app)
    assert client.get(f"{URL}/{quiet['id']}", headers=auth).get_json()["status"] == "ready"
    assert client.delete(f"{URL}/{silent['id']}", headers=auth).status_code == 200
    with app.app_context():
        client_ = app.extensions["cloudflare"]
        client_.stats(priority=Priority.BACKGROUND)
        client_.list_signing_keys()
        client_.list_variants()
    counters = emulator.counters()
    batch = {name for name in counters if name.startswith("batch.")}
    assert batch == {
        "batch.direct_upload",
        "batch.image_details",
        "batch.list_v2",
        "batch.image_delete",
    }
    # Keys, variants and stats stay on the global API; nothing else went there.
    global_calls = {n for n in counters if not n.startswith("batch.")} - {"upload_url"}
    assert global_calls == {"batch_token", "stats", "keys_list", "variants_list"}


def test_forbidden_endpoint_falls_back_once_without_double_creates(
    make_app: Callable[..., Flask],
    alice: User,
    bearer: Callable[..., dict[str, str]],
    emulator: EmulatorServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, other = batch_app(make_app), batch_app(make_app)
    auth = bearer(app, alice)
    emulator.forbid_batch("direct_upload")
    caplog.set_level(logging.WARNING, logger="broker.batch")
    bodies = [create(app, auth), create(app, auth)]
    # Another process learns of the fall-back from the database (after its reload interval).
    batch_route(other)._fallbacks_read = float("-inf")
    bodies.append(create(other, auth))
    counters = emulator.counters()
    assert counters["batch.direct_upload"] == 1  # refused once with 103, never again
    assert counters["direct_upload"] == 3
    assert _drafts(emulator, alice) == 3 and len({b["image_id"] for b in bodies}) == 3
    warnings = [r for r in caplog.records if "goes to the global API" in r.getMessage()]
    assert len(warnings) == 1 and "code 103" in warnings[0].getMessage()
    # Other endpoints keep using the batch host.
    assert app.test_client().delete(f"{URL}/{bodies[0]['id']}", headers=auth).status_code == 200
    assert emulator.counters()["batch.image_delete"] == 1
    page = app.test_client().get("/metrics", headers={"Authorization": f"Bearer {METRICS}"})
    text = page.get_data(as_text=True)
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith('broker_upstream_batch_fallback_seconds{endpoint="direct_upload"}')
    )
    assert 500 < float(line.split()[-1]) <= 600
    assert 'broker_upstream_batch_fallback_seconds{endpoint="image_delete"} 0' in text


def test_refused_token_sends_the_call_to_the_global_api(
    make_app: Callable[..., Flask],
    alice: User,
    bearer: Callable[..., dict[str, str]],
    emulator: EmulatorServer,
) -> None:
    app = batch_app(make_app)
    auth = bearer(app, alice)
    first = create(app, auth)
    emulator.revoke_batch_tokens()
    second = create(app, auth)
    counters = emulator.counters()
    assert counters["batch.direct_upload"] == 2  # the second one refused with 401
    assert counters["direct_upload"] == 1
    assert _drafts(emulator, alice) == 2 and first["image_id"] != second["image_id"]
    with app.app_context():
        row = db.session.get(UpstreamBatchToken, "cloudflare")
        assert row is not None and row.token is None  # forgotten for every process


def test_repeated_errors_fall_back_but_a_post_is_never_resent(
    make_app: Callable[..., Flask],
    alice: User,
    bearer: Callable[..., dict[str, str]],
    emulator: EmulatorServer,
) -> None:
    app = batch_app(make_app)
    auth = bearer(app, alice)
    client = app.test_client()
    emulator.inject_fault("batch.direct_upload", status=500)
    for attempt in range(ERRORS_BEFORE_FALLBACK):
        failed = client.post(URL, json={}, headers=auth)
        assert failed.status_code == 502, attempt
    counters = emulator.counters()
    # A POST that may have arrived is never sent again, to either host.
    assert counters["batch.direct_upload"] == ERRORS_BEFORE_FALLBACK
    assert "direct_upload" not in counters
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Upload)) == 0
    # After the fifth error in a row the endpoint uses the global API.
    assert client.post(URL, json={}, headers=auth).status_code == 201
    assert emulator.counters()["direct_upload"] == 1


def test_the_per_token_rate_is_shared_across_processes(make_app: Callable[..., Flask]) -> None:
    first = batch_app(make_app, CLOUDFLARE_BATCH_RATE=5)
    second = batch_app(make_app, CLOUDFLARE_BATCH_RATE=5)
    now = [1_800_000_000.5]
    rates = [batch_route(app).rate for app in (first, second)]
    for rate in rates:
        rate.clock = lambda: now[0]  # type: ignore[attr-defined]
    for i in range(5):
        rates[i % 2].acquire(Priority.INTERACTIVE)
    for rate in rates:
        with pytest.raises(BudgetExhausted):
            rate.acquire(Priority.INTERACTIVE)
    now[0] += 2  # the second has passed for both
    rates[1].acquire(Priority.INTERACTIVE)


def test_the_per_token_rate_holds_under_concurrent_callers(make_app: Callable[..., Flask]) -> None:
    """Sixteen threads over two apps (two engines, as two processes) spend the rate at once:
    never more than the limit is let through within one second, a refused call gives its count
    back, and the next second is free again."""
    limit = 20
    apps = [batch_app(make_app, CLOUDFLARE_BATCH_RATE=limit) for _ in range(2)]
    rates = [batch_route(app).rate for app in apps]
    now = [1_800_000_000.05]
    for rate in rates:
        rate.clock = lambda: now[0]  # type: ignore[attr-defined]
    passed: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def caller(n: int) -> None:
        start.wait()
        for _ in range(6):
            try:
                rates[n % 2].acquire(Priority.INTERACTIVE)
            except BudgetExhausted:
                continue
            with lock:
                passed.append(n)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0 < len(passed) <= limit
    # Two callers racing for the last place may both be refused, never both let through; what
    # the refused took back is there for the next caller, up to exactly the limit.
    topped_up = 0
    while True:
        try:
            rates[topped_up % 2].acquire(Priority.INTERACTIVE)
        except BudgetExhausted:
            break
        topped_up += 1
    assert len(passed) + topped_up == limit
    now[0] += 1.1  # every slice of that second has left the window
    rates[0].acquire(Priority.INTERACTIVE)


def test_the_per_token_rate_counts_any_second_not_whole_seconds(
    make_app: Callable[..., Flask],
) -> None:
    """Calls spread over time: in no window of one second (wherever it starts) do more than
    the limit pass, while a steady caller still gets most of it."""
    limit = 10
    rates = [batch_route(batch_app(make_app, CLOUDFLARE_BATCH_RATE=limit)).rate for _ in range(2)]
    now = [1_800_000_000.0]
    for rate in rates:
        rate.clock = lambda: now[0]  # type: ignore[attr-defined]
    passed: list[float] = []
    for i in range(300):  # one attempt every 10 ms for 3 s, alternating between the apps
        try:
            rates[i % 2].acquire(Priority.INTERACTIVE)
            passed.append(now[0])
        except BudgetExhausted:
            pass
        now[0] += 0.01
    busiest = max(sum(1 for t in passed if s <= t < s + 1) for s in passed)
    assert busiest <= limit
    assert len(passed) >= 2 * limit  # slices leave the window as time goes on


def test_batch_off_uses_only_the_global_api(
    make_app: Callable[..., Flask],
    alice: User,
    bearer: Callable[..., dict[str, str]],
    emulator: EmulatorServer,
) -> None:
    app = make_app(CLOUDFLARE_BATCH="off")
    assert app.extensions["batch_route"] is None
    create(app, bearer(app, alice))
    assert emulator.kinds()["batch"] == 0 and emulator.counters()["direct_upload"] == 1


def test_the_per_token_rate_is_shared_through_redis(
    make_app: Callable[..., Flask], redis_uri: str
) -> None:
    """Two apps (as two processes would) with RATELIMIT_STORAGE_URI on Redis share the rate."""
    apps = [
        batch_app(make_app, CLOUDFLARE_BATCH_RATE=5, RATELIMIT_STORAGE_URI=redis_uri)
        for _ in range(2)
    ]
    rates = [batch_route(app).rate for app in apps]
    assert all(isinstance(rate, RedisRate) for rate in rates)
    with time_machine.travel(1_800_000_000.5, tick=False) as traveller:
        for i in range(5):
            rates[i % 2].acquire(Priority.INTERACTIVE)
        for rate in rates:
            with pytest.raises(BudgetExhausted):
                rate.acquire(Priority.INTERACTIVE)
        traveller.shift(1.1)  # the second has passed for both
        rates[1].acquire(Priority.INTERACTIVE)
        rates[0].acquire(Priority.INTERACTIVE)


def test_the_batch_base_follows_an_api_base_that_is_not_cloudflares(
    make_app: Callable[..., Flask],
    alice: User,
    bearer: Callable[..., dict[str, str]],
    emulator: EmulatorServer,
) -> None:
    """Pointed at the emulator without BROKER_CLOUDFLARE_BATCH_BASE, creates go to the
    emulator's batch host, not to Cloudflare's (which would refuse every one with 502)."""
    app = batch_app(make_app, CLOUDFLARE_BATCH_BASE=None)
    assert batch_route(app).base == emulator.batch_base
    create(app, bearer(app, alice))
    counters = emulator.counters()
    assert counters["batch.direct_upload"] == 1 and "direct_upload" not in counters


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port that refuses connections: bound, never listening."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def test_a_create_the_batch_host_never_received_goes_to_the_global_api_at_once(
    make_app: Callable[..., Flask],
    alice: User,
    bearer: Callable[..., dict[str, str]],
    emulator: EmulatorServer,
    refusing_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Connection refused: nothing was sent, so the global API takes every create (no 502),
    and after ERRORS_BEFORE_FALLBACK of them the endpoint stays there for the cool-down."""
    app = batch_app(make_app, CLOUDFLARE_BATCH_BASE=f"http://127.0.0.1:{refusing_port}/batch")
    auth = bearer(app, alice)
    caplog.set_level(logging.WARNING, logger="broker.batch")
    with app.app_context():
        batch_route(app).forget_token()  # a token of its own, fetched from the global API
    for _ in range(ERRORS_BEFORE_FALLBACK):
        create(app, auth)
    assert emulator.counters()["direct_upload"] == ERRORS_BEFORE_FALLBACK
    assert "batch.direct_upload" not in emulator.counters()
    assert [r.getMessage() for r in caplog.records] == [
        "batch API: direct_upload goes to the global API for 600s (5 errors in a row (0))"
    ]
    assert not batch_route(app).uses_batch("direct_upload")
    create(app, auth)
    assert emulator.counters()["direct_upload"] == ERRORS_BEFORE_FALLBACK + 1


def test_with_redis_down_the_batch_rate_is_counted_in_the_process(
    make_app: Callable[..., Flask],
    alice: User,
    bearer: Callable[..., dict[str, str]],
    emulator: EmulatorServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis stops: creates still go to the batch host (no 500), the rate is counted in the
    process, logged once and shown in /metrics; Redis back, it counts there again."""

    def shared() -> str:
        page = app.test_client().get("/metrics", headers={"Authorization": f"Bearer {METRICS}"})
        [line] = [
            line
            for line in page.get_data(as_text=True).splitlines()
            if line.startswith("broker_upstream_batch_rate_shared ")
        ]
        return line.split()[1]

    with redis_server(tmp_path) as redis:
        app = batch_app(make_app, RATELIMIT_STORAGE_URI=redis.uri, CLOUDFLARE_BATCH_RATE=3)
        auth = bearer(app, alice)
        create(app, auth)
        assert shared() == "1"
        redis.stop()
        caplog.set_level(logging.WARNING, logger="broker.batch")
        with time_machine.travel(1_800_000_000.5, tick=False) as traveller:
            # The token has expired by then: this call fetches another, so it counts twice.
            create(app, auth)
            traveller.shift(1)
            for _ in range(3):
                create(app, auth)
            # The rate still holds, counted here: a fourth call this second is refused.
            with pytest.raises(BudgetExhausted):
                batch_route(app).rate.acquire(Priority.INTERACTIVE)
            assert shared() == "0"
            down = [r for r in caplog.records if "rate storage unreachable" in r.getMessage()]
            assert len(down) == 1  # once, not per call
            redis.start()
            traveller.shift(RedisRate.RECHECK + 1)
            create(app, auth)
            assert shared() == "1"
        assert any("answers again" in r.getMessage() for r in caplog.records)
    assert emulator.counters().get("batch.direct_upload") == 6


def test_one_process_counts_the_per_token_rate_in_memory(make_app: Callable[..., Flask]) -> None:
    """BROKER_CLOUDFLARE_BATCH_RATE_SCOPE=process: the rate is this process's own, counted
    without a statement; it still holds within any second and frees as the second passes."""
    app = batch_app(make_app, CLOUDFLARE_BATCH_RATE=5, CLOUDFLARE_BATCH_RATE_SCOPE="process")
    rate = batch_route(app).rate
    assert isinstance(rate, MemoryRate)
    seen: list[str] = []

    def on_execute(*args: Any) -> None:
        seen.append(args[2])

    with app.app_context():
        engines = {db.engine, batch_route(app).engine}
    for engine in engines:
        sa.event.listen(engine, "before_cursor_execute", on_execute)
    try:
        with time_machine.travel(1_800_000_000.5, tick=False) as traveller:
            for _ in range(5):
                rate.acquire(Priority.INTERACTIVE)
            with pytest.raises(BudgetExhausted):
                rate.acquire(Priority.INTERACTIVE)
            traveller.shift(1.1)
            rate.acquire(Priority.INTERACTIVE)
    finally:
        for engine in engines:
            sa.event.remove(engine, "before_cursor_execute", on_execute)
    assert seen == []


def test_gunicorn_refuses_several_web_processes_counting_the_rate_in_memory(
    migrated: str, tmp_path: Path
) -> None:
    """Two web processes with BROKER_CLOUDFLARE_BATCH_RATE_SCOPE=process would each allow the
    whole rate: the master refuses to start, in one line; one web process starts."""
    env = production_env(migrated, str(tmp_path), BROKER_CLOUDFLARE_BATCH_RATE_SCOPE="process")
    gunicorn = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"]
    with listening_socket() as sock, topology(tmp_path, env) as topo:
        two = topo.start_web(gunicorn, sock, env={"WEB_CONCURRENCY": "2"})
        assert two.popen.wait(60) != 0
        refusal = [line for line in two.output().splitlines() if "refuses to start" in line]
        assert refusal == [
            "upload broker refuses to start: BROKER_CLOUDFLARE_BATCH_RATE_SCOPE=process counts "
            "the batch API's rate in each process, and 2 web processes would each allow the "
            "whole BROKER_CLOUDFLARE_BATCH_RATE (200/s; Cloudflare answers the excess with "
            "429): run one (WEB_CONCURRENCY=1) or count it in the shared storage "
            "(BROKER_CLOUDFLARE_BATCH_RATE_SCOPE=shared)"
        ]
        assert "Traceback" not in two.output()
        one = topo.start_web(gunicorn, sock, env={"WEB_CONCURRENCY": "1"})
        wait_http(f"http://127.0.0.1:{sock.getsockname()[1]}/livez", process=one)


def test_gunicorn_refuses_a_web_process_added_later_counting_the_rate_in_memory(
    migrated: str, tmp_path: Path
) -> None:
    """One web process counting the rate in memory starts; a second asked for later (SIGTTIN,
    `gunicornc worker add`, a reload whose settings ask for two) would allow the whole rate
    again: each is refused in one log line and one process serves on."""
    env = production_env(migrated, str(tmp_path), BROKER_CLOUDFLARE_BATCH_RATE_SCOPE="process")
    control = str(tmp_path / "web.ctl")
    wanted = tmp_path / "workers"
    wanted.write_text("1")
    config = tmp_path / "gunicorn.conf.py"  # the real one, with the number of processes read
    config.write_text(  # from a file at each (re)load, as an operator edits theirs
        f"exec(compile(open({str(ROOT / 'gunicorn.conf.py')!r}).read(), 'gunicorn.conf.py', "
        f"'exec'))\nworkers = int(open({str(wanted)!r}).read())\n"
    )
    gunicorn = [str(BIN / "gunicorn"), "-c", str(config), "wsgi:app"]

    def gunicornc(command: str) -> Any:
        done = subprocess.run(
            [str(BIN / "gunicornc"), "-s", control, "-j", "-c", command],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return json.loads(done.stdout)

    def refusals() -> list[str]:
        return [line for line in web.output().splitlines() if "another web process" in line]

    def ages() -> list[int]:
        return sorted(worker["age"] for worker in gunicornc("show workers")["workers"])

    with listening_socket() as sock, topology(tmp_path, env) as topo:
        web = topo.start_web(gunicorn, sock, env={"GUNICORN_CONTROL_SOCKET": control})
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/livez"
        wait_http(url, process=web)
        assert gunicornc("worker add")["total"] == 1
        web.popen.send_signal(signal.SIGTTIN)
        wait_for(lambda: len(refusals()) == 2, 15, "SIGTTIN's process refused", 0.05)
        assert ages() == [1]
        wanted.write_text("2")
        web.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: len(refusals()) == 3, 15, "the reload's second process refused", 0.05)
        wait_for(lambda: 1 not in ages(), 30, "the reload's new process alone", 0.05)
        assert ages() == [2]  # one process forked by the reload, not two
        wait_http(url, process=web)
        assert all(
            line.endswith(
                "[ERROR] upload broker refuses another web process: "
                "BROKER_CLOUDFLARE_BATCH_RATE_SCOPE=process counts the batch API's rate in each "
                "process, and 2 web processes would each allow the whole "
                "BROKER_CLOUDFLARE_BATCH_RATE (200/s; Cloudflare answers the excess with 429): "
                "run one (WEB_CONCURRENCY=1) or count it in the shared storage "
                "(BROKER_CLOUDFLARE_BATCH_RATE_SCOPE=shared)"
            )
            for line in refusals()
        )
        assert "Traceback" not in web.output()

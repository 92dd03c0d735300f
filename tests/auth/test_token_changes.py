"""With Redis, a change to a token or an account reaches every web process through pub/sub: a
process whose subscription is live checks a kept token with no database statement at all, and
still refuses a revoked, expired, deactivated or re-passworded user's token on the very next
request. A process that is not (or no longer) subscribed reads the version instead, so Redis
stopping, hanging or restarting never lets a refused token through.

Two apps on one database stand for two web processes here (each has its cache, its
subscription and its own connections); tests/auth/test_token_cache.py and the last test below
run real gunicorn processes."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from flask import Flask

from broker.auth import changes, tokens
from broker.auth.models import ApiToken, AuthVersion
from broker.platform.db import db, utcnow
from tests.auth.test_token_cache import (
    ME,
    _issue,
    change,
    counted,
    refuse_every_way,
    two_webs,
)
from tests.factories import production_env
from tests.support.redis_server import RedisServer, redis_server
from tests.system.topology import wait_for
from tests.test_operations import TOKEN, scrape

BARE = "/bare"


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (stopped and started again by some tests)."""
    with redis_server(tmp_path) as server:
        yield server


def _web(make_app: Callable[..., Flask], redis: RedisServer | None, heartbeat: float) -> Flask:
    """An app as a web process runs it, with a route that needs no database."""
    app = make_app(RATELIMIT_STORAGE_URI=redis.uri) if redis else make_app()
    app.add_url_rule(BARE, "bare", lambda: "ok")
    feed = _cache(app).feed
    if feed is not None:
        feed.heartbeat = heartbeat  # before its thread starts (at the first request)
    return app


def _cache(app: Flask) -> tokens.TokenCache:
    cache = app.extensions["tokens"]
    assert isinstance(cache, tokens.TokenCache)
    return cache


def _live(app: Flask, *auths: dict[str, str]) -> None:
    """Warm `app`'s cache with these tokens once its subscription is live."""
    client = app.test_client()
    for auth in auths:  # the first request starts the subscriber
        assert client.get(BARE, headers=auth).status_code == 200
    feed = _cache(app).feed
    assert feed is not None and feed.subscribed.wait(10), "never subscribed"
    for auth in auths:
        assert client.get(BARE, headers=auth).status_code == 200


@contextmanager
def no_version_read(app: Flask) -> Iterator[None]:
    """Fail unless `app` made no read of the version inside the block."""
    stamp = _cache(app).stamp
    reads = stamp.reads
    yield
    assert stamp.reads == reads, "the version was read: the subscription was not trusted"


def _pair(
    make_app: Callable[..., Flask], make_user: Any, redis: RedisServer, heartbeat: float
) -> tuple[Flask, Flask, int, dict[str, str]]:
    """Two web processes on `redis`, alice's token (its id, its header) kept by the second."""
    make_user("alice")
    one, other = (_web(make_app, redis, heartbeat=heartbeat) for _ in "ab")
    token_id, alice = _issue(one, "alice")
    _live(other, alice)
    return one, other, token_id, alice


def _status(app: Flask, auth: dict[str, str]) -> int:
    """Return the status of an authenticated route (the bare one answers anyone)."""
    return app.test_client().get(ME, headers=auth).status_code


@pytest.mark.parametrize("with_redis", [True, False])
def test_statements_per_authenticated_request(
    make_app: Callable[..., Flask], make_user: Any, tmp_path: Path, with_redis: bool
) -> None:
    """0 with the subscription live (the cache is trusted as it is), 1 without Redis (the
    version), on a route that makes none of its own."""
    make_user("alice")
    with redis_server(tmp_path) as redis:
        app = _web(make_app, redis if with_redis else None, heartbeat=3600)
        _, auth = _issue(app, "alice")
        if with_redis:
            _live(app, auth)
        else:
            assert _status(app, auth) == 200  # read, kept, stamped
        stamp = _cache(app).stamp
        reads = stamp.reads
        with app.app_context(), counted(db.engine) as seen:
            for _ in range(5):
                assert app.test_client().get(BARE, headers=auth).status_code == 200
        assert seen == []  # nothing on the request's pool: token and user come from memory
        assert stamp.reads - reads == (0 if with_redis else 5)


def test_every_change_reaches_the_other_process_before_its_next_request(
    make_app: Callable[..., Flask], make_user: Any, redis: RedisServer
) -> None:
    for name in ("alice", "bob", "carol", "dave"):
        make_user(name)
    one, other = (_web(make_app, redis, heartbeat=3600) for _ in "ab")
    issued = {name: _issue(one, name) for name in ("alice", "bob", "carol", "dave")}
    alice_id, alice = issued.pop("alice")
    auths = [alice, *(auth for _, auth in issued.values())]
    _live(one, *auths)
    _live(other, *auths)

    with no_version_read(other):
        # The device logs out through one process: the other refuses its next request.
        assert one.test_client().delete(ME + "/current", headers=alice).status_code == 204
        assert _status(other, alice) == 401
        assert _status(other, issued["bob"][1]) == 200  # the others' tokens still work
        refuse_every_way(one, lambda auth: _status(other, auth), 401, issued)
    with other.app_context():
        assert db.session.get(ApiToken, alice_id).revoked_at is not None  # type: ignore[union-attr]


def test_a_move_before_a_rolled_back_savepoint_is_still_told(
    make_app: Callable[..., Flask], make_user: Any, redis: RedisServer
) -> None:
    one, other, token_id, alice = _pair(make_app, make_user, redis, heartbeat=3600)
    with one.app_context():
        tokens.revoke(db.session.get(ApiToken, token_id))  # type: ignore[arg-type]
        db.session.flush()  # the version moves here, in the transaction itself
        savepoint = db.session.begin_nested()
        savepoint.rollback()  # takes nothing of the move with it
        with no_version_read(other):
            assert _status(other, alice) == 200  # not committed yet: nobody was told
        db.session.commit()
    with no_version_read(other):
        assert _status(other, alice) == 401


def test_with_redis_stopped_the_next_request_reads_the_version(
    make_app: Callable[..., Flask],
    make_user: Any,
    redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name in ("alice", "bob", "carol"):
        make_user(name)
    one, other = (_web(make_app, redis, heartbeat=3600) for _ in "ab")
    _, alice = _issue(one, "alice")
    bob_id, bob = _issue(one, "bob")
    carol_id, carol = _issue(one, "carol")
    _live(one, alice, bob, carol)
    _live(other, alice, bob, carol)
    caplog.set_level(logging.INFO, logger="broker.auth")

    redis.stop()  # mid-way: nobody hears of the next change through Redis
    assert one.test_client().delete(ME + "/current", headers=alice).status_code == 204
    assert any("cannot publish" in r.message for r in caplog.records)
    stamp = _cache(other).stamp
    reads = stamp.reads
    assert _status(other, alice) == 401  # the subscription's end was seen: the version read
    assert stamp.reads > reads
    assert _status(other, bob) == 200
    assert stamp.reads > reads + 1  # and read on every request until subscribed again

    # Changed while the other is not subscribed; it makes no request before it is again.
    change(one, "revoke", token_id=bob_id)
    feed = _cache(other).feed
    assert feed is not None
    subscriptions = feed.subscriptions
    redis.start()
    wait_for(lambda: feed.subscriptions > subscriptions, 15, "the subscription again", 0.01)
    with no_version_read(other):  # re-synced when it subscribed: the change is in
        assert _status(other, bob) == 401
        assert _status(other, carol) == 200
    # And notices travel again.
    change(one, "revoke", token_id=carol_id)
    with no_version_read(other):
        assert _status(other, carol) == 401
    lost = [r for r in caplog.records if "not subscribed to Redis" in r.message]
    assert len(lost) == 2, lost  # once per process and outage, not per request


def test_the_first_change_after_a_redis_restart_reaches_the_others_at_once(
    make_app: Callable[..., Flask], make_user: Any, redis: RedisServer
) -> None:
    """The publisher's connection from before the restart is dead: the notice goes again on a
    new one at once, so the others (subscribed again) refuse on their next request without
    reading the version and without waiting for a heartbeat."""
    make_user("bob")
    one, other, _, alice = _pair(make_app, make_user, redis, heartbeat=3600)
    bob_id, bob = _issue(one, "bob")
    _live(other, bob)
    publisher = _cache(one).publisher
    feed = _cache(other).feed
    assert publisher is not None and feed is not None
    change(one, "revoke", token_id=bob_id)  # the publisher's connection is open from here on
    assert _status(other, bob) == 401
    failures, subscriptions = publisher.failures, feed.subscriptions

    redis.stop()
    redis.start()
    wait_for(lambda: feed.subscriptions > subscriptions, 15, "the subscription again", 0.01)
    with no_version_read(other):
        assert _status(other, alice) == 200  # subscribed again and trusted
        assert one.test_client().delete(ME + "/current", headers=alice).status_code == 204
        assert _status(other, alice) == 401
    assert publisher.failures == failures


def test_each_process_shows_whether_it_follows_redis(
    make_app: Callable[..., Flask], make_user: Any, redis: RedisServer
) -> None:
    make_user("alice")
    alone = make_app(METRICS_TOKEN=TOKEN)
    app = make_app(RATELIMIT_STORAGE_URI=redis.uri, METRICS_TOKEN=TOKEN)
    feed = _cache(app).feed
    assert feed is not None
    _, alice = _issue(app, "alice")
    subscribed = "broker_token_changes_subscribed "
    assert f"{subscribed}0" in scrape(alone).splitlines()  # no Redis: the version every time
    assert app.test_client().get(ME, headers=alice).status_code == 200  # starts the subscriber
    wait_for(feed.subscribed.is_set, 15, "the subscription", 0.01)
    assert f"{subscribed}1" in scrape(app).splitlines()
    redis.stop()
    assert f"{subscribed}0" in scrape(app).splitlines()  # its end is seen by the scrape itself


def test_a_redis_that_stops_answering_is_given_up_within_a_heartbeat(
    make_app: Callable[..., Flask], make_user: Any, redis: RedisServer
) -> None:
    one, other, _, alice = _pair(make_app, make_user, redis, heartbeat=0.05)
    feed = _cache(other).feed
    assert feed is not None and redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)  # hangs: connections stay open, nothing answers
    try:
        wait_for(lambda: not feed.subscribed.is_set(), 15, "the ping to go unanswered", 0.01)
        assert one.test_client().delete(ME + "/current", headers=alice).status_code == 204
        assert _status(other, alice) == 401
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)


def test_a_hung_redis_holds_a_commit_up_for_one_attempt_only(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = changes.redis_url(redis.uri)
    assert url is not None and redis.proc is not None
    publisher = changes.Publisher(url)
    opened: list[Any] = []
    connection = changes._connection
    monkeypatch.setattr(changes, "_connection", lambda u: opened.append(u) or connection(u))
    assert publisher.publish(1)
    os.kill(redis.proc.pid, signal.SIGSTOP)  # hangs: the connection stays open, nothing answers
    try:
        assert not publisher.publish(2)  # one timeout, not one more on a new connection
        assert len(opened) == 1 and publisher.failures == 1
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    assert publisher.publish(3)  # the next commit's notice goes on a new connection
    assert len(opened) == 2
    publisher.close()


def test_a_change_never_published_is_picked_up_within_a_heartbeat(
    make_app: Callable[..., Flask], make_user: Any, redis: RedisServer
) -> None:
    make_user("alice")
    other = _web(make_app, redis, heartbeat=0.05)
    operator = _web(make_app, None, heartbeat=0)  # a command run without the Redis setting
    token_id, alice = _issue(other, "alice")
    _live(other, alice)
    change(operator, "revoke", token_id=token_id)
    wait_for(lambda: _status(other, alice) == 401, 15, "the heartbeat's read of the version", 0.01)
    assert _cache(other).feed.subscribed.is_set()  # type: ignore[union-attr]


def test_a_version_gone_back_under_a_live_subscription_drops_what_is_kept_at_the_next_beat(
    make_app: Callable[..., Flask], make_user: Any, redis: RedisServer
) -> None:
    """A restore takes the version back below what a running process keeps; its next heartbeat
    must drop the cache (a lower version is no notice of a newer change, but the database is
    not the one the tokens were kept from), not trust it until the cache's TTL."""
    make_user("alice")
    other = _web(make_app, redis, heartbeat=0.05)
    operator = _web(make_app, None, heartbeat=0)  # a restore, done under the processes
    with operator.app_context():
        db.session.merge(AuthVersion(id=1, version=5))
        db.session.commit()
    token_id, alice = _issue(other, "alice")
    _live(other, alice)  # kept under version 5 (read when it subscribed)
    with operator.app_context():  # the backup: alice's token revoked, the version lower
        db.session.execute(
            sa.update(ApiToken).where(ApiToken.id == token_id).values(revoked_at=utcnow())
        )
        db.session.execute(sa.update(AuthVersion).values(version=2))
        db.session.commit()
    stamp = _cache(other).stamp
    restored = stamp.reads
    # The second read after the restore begins once the beat of the first has applied it.
    wait_for(lambda: stamp.reads >= restored + 2, 15, "a heartbeat after the restore", 0.01)
    assert _cache(other).feed.subscribed.is_set()  # type: ignore[union-attr]
    assert _status(other, alice) == 401


@pytest.mark.parametrize(
    ("uri", "url"),
    [
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("rediss://cache:6380", "rediss://cache:6380"),
        ("redis+unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("memory://", None),
        ("redis+sentinel://cache:26379/main", None),
    ],
)
def test_which_storage_carries_the_notices(uri: str, url: str | None) -> None:
    assert changes.redis_url(uri) == url


def test_two_web_processes_hear_of_changes_through_redis(
    migrated: str, make_app: Callable[..., Flask], make_user: Any, tmp_path: Path
) -> None:
    for name in ("alice", "bob", "carol", "dave", "erin"):
        make_user(name)
    with redis_server(tmp_path) as redis:
        operator = make_app(RATELIMIT_STORAGE_URI=redis.uri)  # a third process: the CLI's
        issued = {name: _issue(operator, name) for name in ("alice", "bob", "carol", "dave")}
        alice, bob = issued["alice"][1], issued["bob"][1]
        erin_id, erin = _issue(operator, "erin")
        env = production_env(migrated, str(tmp_path), BROKER_RATELIMIT_STORAGE_URI=redis.uri)
        with two_webs(tmp_path, env) as (statuses, webs, bases):
            statuses(alice)  # the first bearer request starts each process's subscriber
            for web in webs:
                wait_for(lambda web=web: "through Redis" in web.output(), 30, "the subscription")
            for _, auth in (*issued.values(), (erin_id, erin)):  # warm both caches
                assert statuses(auth) == [200, 200]

            first = requests.delete(bases[0] + ME + "/current", headers=alice, timeout=10)
            assert first.status_code == 204
            assert statuses(alice) == [401, 401]
            assert statuses(bob) == [200, 200]
            refuse_every_way(operator, statuses, [401, 401], issued)
            assert all("not subscribed to Redis" not in web.output() for web in webs)

            redis.stop()  # mid-way: the next change is published to nobody
            change(operator, "revoke", token_id=erin_id)
            assert statuses(erin) == [401, 401]
            for web in webs:
                assert "not subscribed to Redis" in web.output()
        with operator.app_context():  # nothing was written outside a transaction's rules
            assert db.session.scalar(sa.select(sa.func.count()).select_from(ApiToken)) == 5


def test_a_redis_never_reached_leaves_every_request_reading_the_version(
    make_app: Callable[..., Flask],
    make_user: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    make_user("alice")
    caplog.set_level(logging.WARNING, logger="broker.auth")
    app = make_app(RATELIMIT_STORAGE_URI=f"redis+unix://{tmp_path}/nobody.sock")
    token_id, alice = _issue(app, "alice")
    stamp = _cache(app).stamp
    for _ in range(3):
        reads = stamp.reads
        assert _status(app, alice) == 200
        assert stamp.reads == reads + 1
    change(app, "revoke", token_id=token_id)
    assert _status(app, alice) == 401
    wait_for(
        lambda: any("not subscribed to Redis" in r.message for r in caplog.records),
        15,
        "the subscriber's warning",
        0.01,
    )


@contextmanager
def _beats_by_hand(
    make_app: Callable[..., Flask], make_user: Any, redis: RedisServer
) -> Iterator[tuple[tokens.TokenCache, changes.Feed, changes.Publisher]]:
    """A web process following `redis` (alice's token kept) whose heartbeat runs only when
    the test calls `_beat_reading`, and a publisher of changes made elsewhere."""
    make_user("alice")
    other = _web(make_app, redis, heartbeat=3600)
    _, alice = _issue(other, "alice")
    _live(other, alice)
    cache = _cache(other)
    feed = cache.feed
    assert feed is not None and cache._version is not None
    publisher = changes.Publisher(changes.redis_url(redis.uri) or "")
    reading = feed._read_version
    try:
        yield cache, feed, publisher
    finally:
        feed._read_version = reading
        publisher.close()


def _beat_reading(feed: changes.Feed, read: Callable[[], int | None]) -> None:
    """Run one heartbeat whose read of the version is `read`; wait for its pong."""
    feed._read_version = read
    feed._beat()
    wait_for(lambda: not feed._awaiting_pong, 15, "the beat's pong", 0.01)


def test_a_heartbeats_read_taken_before_a_notice_does_not_move_the_kept_version_back(
    make_app: Callable[..., Flask], make_user: Any, redis: RedisServer
) -> None:
    """The heartbeat reads the version outside the feed's lock: a notice of a newer change
    applied meanwhile (by a request) must not be undone by that older read, which would drop
    what is kept for nothing and leave the kept version behind the database's."""
    with _beats_by_hand(make_app, make_user, redis) as (cache, feed, publisher):
        before, generation, reading = cache._version or 0, cache._generation, feed._read_version

        def read_then_a_notice_lands() -> int | None:
            version = reading()  # the read, taken before the change below
            assert publisher.publish(before + 1)  # a change commits elsewhere and is told
            assert feed.current()  # a request applies the notice
            return version

        _beat_reading(feed, read_then_a_notice_lands)
        # One drop, the notice's; the older read moved nothing back.
        assert (cache._version, cache._generation) == (before + 1, generation + 1)
        _beat_reading(feed, lambda: before)  # a later read lower than what is kept: a restore
        assert (cache._version, cache._generation) == (before, generation + 2)


def test_a_change_committed_here_while_a_beat_reads_is_not_undone_by_that_read(
    make_app: Callable[..., Flask], make_user: Any, redis: RedisServer
) -> None:
    """`changed` moves the kept version before it publishes: when that lands while the beat
    reads the version, no notice was applied during the read, yet the read predates the
    change. Taken as an exact read it would move the kept version back (and drop what is kept
    twice); anything from the version kept when the read began up to the one kept now is
    nothing new."""
    with _beats_by_hand(make_app, make_user, redis) as (cache, feed, publisher):
        before, generation, reading = cache._version or 0, cache._generation, feed._read_version

        def read_then_a_change_here() -> int | None:
            version = reading()  # the read, taken before the change below
            cache.moved(before + 1)  # a commit here, as `changed` applies it before publishing
            return version

        _beat_reading(feed, read_then_a_change_here)
        assert (cache._version, cache._generation) == (before + 1, generation + 1)
        _beat_reading(feed, lambda: before + 2)  # a change never told: the version moves on
        assert (cache._version, cache._generation) == (before + 2, generation + 2)

        def restored_then_a_notice() -> int | None:
            # A restore (the database's version below the one kept as the read began), then
            # a change committed and told elsewhere while it was read.
            assert publisher.publish(before + 3)
            assert feed.current()  # a request applies the notice
            return before

        _beat_reading(feed, restored_then_a_notice)  # the restore is seen now, notice or not
        assert (cache._version, cache._generation) == (before, generation + 4)

"""Bearer tokens are checked from memory while nothing changed, and refused on the very next
request once something did: in this process and in two other web processes at once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
import time_machine
from flask import Flask
from sqlalchemy.orm import Session as OrmSession

from broker.auth import tokens, users
from broker.auth.models import ApiToken, User
from broker.platform.db import db, utcnow
from tests.factories import production_env
from tests.system.topology import BIN, Process, listening_socket, topology, wait_http

ME = "/api/v1/auth/tokens"


@contextmanager
def counted(engine: sa.Engine) -> Iterator[list[str]]:
    """Record the first word of every statement `engine` runs."""
    seen: list[str] = []

    def on_execute(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement.split()[0].upper())

    sa.event.listen(engine, "before_cursor_execute", on_execute)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", on_execute)


def _issue(app: Flask, username: str, **kwargs: Any) -> tuple[int, dict[str, str]]:
    with app.app_context():
        user = users.find_user(db.session, username)
        assert user is not None
        issued = tokens.issue(db.session, user, "device", **kwargs)
        db.session.commit()
        return issued.token.id, {"Authorization": f"Bearer {issued.secret}"}


def change(app: Flask, how: str, username: str = "", token_id: int = 0) -> None:
    """Refuse a user's tokens as an operator's process does: `deactivate` or a new `password`
    for `username`, or `expire` the token `token_id` early (an administrator cut it short)."""
    with app.app_context():
        if how == "expire":
            token = db.session.get(ApiToken, token_id)
            token.expires_at = utcnow() - timedelta(seconds=1)  # type: ignore[union-attr]
        elif how == "revoke":
            tokens.revoke(db.session.get(ApiToken, token_id))  # type: ignore[arg-type]
        else:
            user = users.find_user(db.session, username)
            assert user is not None
            if how == "deactivate":
                users.deactivate(db.session, user)
            else:
                users.set_password(db.session, user, "a brand new password")
        db.session.commit()


def refuse_every_way(
    app: Flask, check: Callable[[dict[str, str]], Any], refused: Any, issued: dict[str, Any]
) -> None:
    """Deactivate bob, give carol a new password, expire dave's token early (in `app`, as an
    operator's process does); after each, `check` of that token must answer `refused`."""
    for how, name in (("deactivate", "bob"), ("password", "carol"), ("expire", "dave")):
        token_id, auth = issued[name]
        change(app, how, name, token_id)
        assert check(auth) == refused, how


def test_a_kept_token_costs_no_statement_on_the_pool(app, client, make_user) -> None:
    make_user("alice")
    _, auth = _issue(app, "alice")
    assert client.get(ME, headers=auth).status_code == 200  # read, kept, stamped
    with app.app_context(), counted(db.engine) as seen:
        answer = client.get(ME, headers=auth)
    assert answer.status_code == 200
    # The route's own listing only: the token and its user came from memory.
    assert seen == ["SELECT"], seen


def test_a_kept_token_on_a_route_without_the_database_makes_no_session(make_app, make_user) -> None:
    app = make_app()
    app.add_url_rule("/bare", "bare", lambda: "ok")
    client = app.test_client()
    make_user("alice")
    _, auth = _issue(app, "alice")
    assert client.get("/bare", headers=auth).status_code == 200  # read, kept, stamped
    begun: list[Any] = []

    def on_begin(session: Any, _transaction: Any) -> None:
        begun.append(session)

    sa.event.listen(OrmSession, "after_transaction_create", on_begin)
    try:
        assert client.get("/bare", headers=auth).status_code == 200
    finally:
        sa.event.remove(OrmSession, "after_transaction_create", on_begin)
    assert begun == []


def test_what_a_view_changes_on_a_kept_token_is_written(app, client, make_user) -> None:
    make_user("alice")
    token_id, auth = _issue(app, "alice")
    assert client.get(ME, headers=auth).status_code == 200  # read, kept, stamped
    # The view revokes the token it was handed from memory: its commit writes that.
    assert client.delete(ME + "/current", headers=auth).status_code == 204
    with app.app_context():
        assert db.session.get(ApiToken, token_id).revoked_at is not None  # type: ignore[union-attr]
    assert client.get(ME, headers=auth).status_code == 401


def test_the_last_used_stamp_is_written_at_most_once_a_minute(app, client, make_user) -> None:
    make_user("alice")
    token_id, auth = _issue(app, "alice")
    start = utcnow()

    def stamped_after(seconds: float) -> Any:
        with time_machine.travel(start + timedelta(seconds=seconds), tick=False):
            assert client.get("/api/v1/uploads", headers=auth).status_code == 200
        with app.app_context():
            return db.session.get(ApiToken, token_id).last_used_at  # type: ignore[union-attr]

    first = stamped_after(0)
    assert first == start
    assert stamped_after(30) == start  # kept, not written again
    assert stamped_after(59) == start
    assert stamped_after(61) == start + timedelta(seconds=61)


def test_two_processes_write_the_last_used_stamp_once_a_minute_between_them(
    make_app: Callable[..., Flask], make_user: Any
) -> None:
    one, other = make_app(), make_app()
    make_user("alice")
    token_id, auth = _issue(one, "alice")
    start = utcnow()

    def use(app: Flask, seconds: float) -> Any:
        with time_machine.travel(start + timedelta(seconds=seconds), tick=False):
            assert app.test_client().get("/api/v1/uploads", headers=auth).status_code == 200
        with one.app_context():
            return db.session.get(ApiToken, token_id).last_used_at  # type: ignore[union-attr]

    assert use(other, 0) == start  # kept there with this stamp
    assert use(one, 61) == start + timedelta(seconds=61)  # read there: a minute old, written
    # The other's kept stamp is a minute old too, but the row's is not: nothing is written.
    assert use(other, 62) == start + timedelta(seconds=61)
    assert use(other, 122) == start + timedelta(seconds=122)  # it asks again a minute later


def test_a_kept_token_is_refused_once_it_expires(app, client, make_user) -> None:
    make_user("alice")
    _, auth = _issue(app, "alice", ttl=timedelta(minutes=5))
    start = utcnow()
    with time_machine.travel(start, tick=False):
        assert client.get(ME, headers=auth).status_code == 200
    with time_machine.travel(start + timedelta(minutes=5, seconds=1), tick=False):
        assert client.get(ME, headers=auth).status_code == 401


def test_a_change_outside_the_orm_is_picked_up_within_the_ttl(make_app, make_user) -> None:
    now = [1000.0]
    app = make_app()
    with app.app_context():
        stamp = tokens.VersionStamp(db.engine.url)
    app.extensions["tokens"].stamp.close()
    app.extensions["tokens"] = tokens.TokenCache(stamp, ttl=30, clock=lambda: now[0])
    client = app.test_client()
    make_user("alice")
    _, auth = _issue(app, "alice")
    try:
        assert client.get(ME, headers=auth).status_code == 200
        with app.app_context():  # plain SQL: no version moves
            db.session.execute(sa.text("UPDATE api_tokens SET revoked_at = expires_at"))
            db.session.commit()
        assert client.get(ME, headers=auth).status_code == 200  # kept
        now[0] += 30
        assert client.get(ME, headers=auth).status_code == 401
    finally:
        stamp.close()


@contextmanager
def two_webs(
    tmp_path: Path, env: dict[str, str]
) -> Iterator[tuple[Callable[[dict[str, str]], list[int]], list[Process], list[str]]]:
    """Run two gunicorn web processes with `env`; yield what each answers a bearer on the API
    (`statuses(auth)`), the processes and their base URLs."""
    socks = [listening_socket(), listening_socket()]
    with socks[0], socks[1], topology(tmp_path, env) as topo:
        gunicorn = [str(BIN / "gunicorn"), "--workers=1", "--threads=4", "wsgi:app"]
        webs = [topo.start_web(gunicorn, sock) for sock in socks]
        bases = [f"http://127.0.0.1:{sock.getsockname()[1]}" for sock in socks]
        for web, base in zip(webs, bases, strict=True):
            wait_http(f"{base}/livez", process=web)

        def statuses(auth: dict[str, str]) -> list[int]:
            return [requests.get(base + ME, headers=auth, timeout=10).status_code for base in bases]

        yield statuses, webs, bases


def test_two_web_processes_refuse_on_the_next_request(
    migrated: str, app: Flask, make_user: Any, tmp_path: Path
) -> None:
    for name in ("alice", "bob", "carol", "dave"):
        make_user(name)
    _, alice = _issue(app, "alice")
    bob = _issue(app, "bob")
    carol = _issue(app, "carol")
    dave = _issue(app, "dave")
    with two_webs(tmp_path, production_env(migrated, str(tmp_path))) as (statuses, _, bases):
        for auth in (alice, bob[1], carol[1], dave[1]) * 2:  # warm both caches
            assert statuses(auth) == [200, 200]

        # Revoked through one process (the device logs out): both refuse the next request.
        first = requests.delete(bases[0] + ME + "/current", headers=alice, timeout=10)
        assert first.status_code == 204
        assert statuses(alice) == [401, 401]
        assert statuses(bob[1]) == [200, 200]  # the others' tokens still work

        # Deactivated, a new password, expired early: by an operator in a third process (this one).
        refuse_every_way(app, statuses, [401, 401], {"bob": bob, "carol": carol, "dave": dave})


@pytest.mark.parametrize("change", ["revoke", "deactivate"])
def test_every_way_of_refusing_moves_the_version(app, make_user, change: str) -> None:
    make_user("alice")
    token_id, _ = _issue(app, "alice")
    with app.app_context():
        before = tokens.VersionStamp(db.engine.url)
        try:
            version = before.read()
            if change == "revoke":
                tokens.revoke(db.session.get(ApiToken, token_id))  # type: ignore[arg-type]
            else:
                user = db.session.scalar(sa.select(User).where(User.username_key == "alice"))
                user.active = False  # type: ignore[union-attr]
            db.session.commit()
            assert before.read() == (version or 0) + 1
        finally:
            before.close()


class _CountingLock:
    """A lock that tells when `waiting` threads have come to it."""

    def __init__(self, waiting: int) -> None:
        self.inner = threading.Lock()
        self.arrived = 0
        self.all_here = threading.Event()
        self.waiting = waiting

    def __enter__(self) -> None:
        self.arrived += 1
        if self.arrived >= self.waiting:
            self.all_here.set()
        self.inner.acquire()

    def __exit__(self, *_: Any) -> None:
        self.inner.release()


def test_threads_waiting_for_the_stamp_share_one_read(app) -> None:
    with app.app_context():
        stamp = tokens.VersionStamp(db.engine.url)
    try:
        assert stamp.read() == 0
        lock = _CountingLock(waiting=3)
        stamp._lock = lock  # type: ignore[assignment]
        reads = stamp.reads
        results: list[int | None] = []
        with lock.inner:  # a read under way: three requests arrive and wait
            threads = [threading.Thread(target=lambda: results.append(stamp.read())) for _ in "abc"]
            for thread in threads:
                thread.start()
            assert lock.all_here.wait(10)
        for thread in threads:
            thread.join(10)
        assert results == [0, 0, 0]
        assert stamp.reads == reads + 1  # the first to get the lock read for all three
        assert stamp.read() == 0 and stamp.reads == reads + 2  # a new request: a read of its own
    finally:
        stamp.close()


def test_a_new_password_locks_the_version_before_any_row_it_is_about(app, make_user) -> None:
    make_user("alice")
    _issue(app, "alice")
    with app.app_context():
        user = users.find_user(db.session, "alice")
        with counted(db.engine) as seen:
            users.set_password(db.session, user, "a brand new password")  # type: ignore[arg-type]
            db.session.commit()
    writes = [word for word in seen if word in ("INSERT", "UPDATE", "DELETE")]
    # The version first (an upsert), then the user, the remember tokens and the API tokens:
    # two such transactions never hold each other's rows while waiting for the version.
    assert writes[0] == "INSERT" and len(writes) >= 3, writes
    with app.app_context():
        stamp = tokens.VersionStamp(db.engine.url)
    try:
        assert stamp.read() == 1
    finally:
        stamp.close()

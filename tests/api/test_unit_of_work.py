"""One unit of work per unsafe API request: a failed request leaves nothing half-written, the
steps it committed on the way are undone, a step never throws away pending work, and an
`Idempotency-Key` still replays (or frees itself for a retry) through all of it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session as OrmSession

from broker.api.models import IdempotencyKey
from broker.api.unit_of_work import UnitOfWork
from broker.auth import tokens
from broker.auth.models import User
from broker.platform.db import db
from broker.uploads.models import UploadReservation
from tests.factories import upload_rows, webhook_events

URL = "/api/v1/uploads"


def _user(app, user_id: int) -> User:
    with app.app_context():
        user = db.session.get_one(User, user_id)
        db.session.expunge(user)
        return user


def _count(app, model) -> int:
    with app.app_context():
        return int(db.session.scalar(sa.select(sa.func.count()).select_from(model)) or 0)


def test_a_route_whose_domain_call_fails_after_writing_keeps_nothing(
    app, client, make_user, bearer, monkeypatch
) -> None:
    """The view has set both overrides when the call that renders its answer fails: the
    request's one transaction is rolled back, so neither override is kept."""
    from broker.uploads import quotas

    target = make_user("bob")
    admin = bearer(app, make_user("root", is_admin=True))

    def broken(*_args, **_kwargs):
        raise RuntimeError("injected: the domain call fails")

    monkeypatch.setattr(quotas, "quotas_for", broken)
    url = f"/api/v1/users/{target.public_id}/upload-limits"
    body = {"max_pending_uploads": 3, "max_uploads_per_day": 7}
    assert client.put(url, json=body, headers=admin).status_code == 500
    kept = _user(app, target.id)
    assert (kept.max_pending_uploads, kept.max_uploads_per_day) == (None, None)
    monkeypatch.undo()
    assert client.put(url, json=body, headers=admin).status_code == 200
    kept = _user(app, target.id)
    assert (kept.max_pending_uploads, kept.max_uploads_per_day) == (3, 7)


def test_a_failed_idempotent_create_undoes_its_committed_steps(
    app, client, alice, emulator
) -> None:
    """The key claim and the quota reservation were committed before Cloudflare was asked;
    the row then cannot be stored (Cloudflare forgot a custom id our row still holds): no
    upload, no reservation, no event, no draft, and the key is free for a retry."""
    _, auth = alice
    body = {"id": "album/1", "require_signed_urls": False}
    assert client.post(URL, json=body, headers=auth).status_code == 201
    with emulator.client() as cf:
        assert cf.request("DELETE", "/v1/album/1").status_code == 200
    events = len(webhook_events(app))
    headers = {**auth, "Idempotency-Key": "clash-1"}
    # Answered as Cloudflare answers a taken id (issue 34: never a 500).
    assert client.post(URL, json=body, headers=headers).status_code == 409
    assert len(upload_rows(app)) == 1
    assert _count(app, UploadReservation) == 0
    assert _count(app, IdempotencyKey) == 0
    assert len(webhook_events(app)) == events
    with emulator.client() as cf:
        assert cf.get("/v1/album/1").status_code == 404  # the draft was discarded
    # The same key, now with a body that can succeed: claimed afresh, then replayed.
    fresh = {"id": "album/2", "require_signed_urls": False}
    first = client.post(URL, json=fresh, headers=headers)
    again = client.post(URL, json=fresh, headers=headers)
    assert first.status_code == again.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json() == first.get_json()
    assert len(upload_rows(app)) == 2


def test_a_step_commits_what_was_pending_instead_of_dropping_it(app, make_user) -> None:
    """Work the caller had flushed (or only added) before a step is committed with it."""
    flushed, added = make_user("flushed"), make_user("added")
    with app.app_context():
        work = UnitOfWork(db.session)
        db.session.get_one(User, flushed.id).max_pending_uploads = 4
        db.session.flush()
        db.session.get_one(User, added.id).max_pending_uploads = 5
        assert work.step(lambda: db.session.get_one(User, flushed.id).username) == "flushed"
        work.fail()  # a later failure cannot take back what the step committed
    assert _user(app, flushed.id).max_pending_uploads == 4
    assert _user(app, added.id).max_pending_uploads == 5


def test_a_step_on_its_own_connection_commits_what_was_pending_first(app, make_user) -> None:
    """A Core step on a connection of its own ends the request's transaction first, keeping
    its writes (it would otherwise wait for the request's own locks), and commits its own."""
    user = make_user("erin")
    with app.app_context():
        work = UnitOfWork(db.session)
        db.session.get_one(User, user.id).max_pending_uploads = 6
        db.session.flush()  # written: on SQLite the session now holds the write lock

        def write(conn: sa.Connection) -> int:
            bump = sa.update(User).where(User.id == user.id).values(max_uploads_per_day=7)
            return conn.execute(bump).rowcount

        assert work.step_on_connection(write) == 1
        work.fail()  # a later failure cannot take back what was committed before or in it
    kept = _user(app, user.id)
    assert (kept.max_pending_uploads, kept.max_uploads_per_day) == (6, 7)


def test_a_step_in_one_round_trip_keeps_what_finish_committed_and_drops_the_rest(
    app, make_user
) -> None:
    """`finish` commits its statements with the step's COMMIT; what the work writes after it
    is a transaction of its own, rolled back when the work then raises (a refusal read after
    the round trip): the step never commits on the work's behalf past `finish`."""
    user = make_user("ivan")
    with app.app_context():
        work = UnitOfWork(db.session)

        def set_limit(column: Any, value: int) -> tuple[sa.Update, dict[str, Any]]:
            return sa.update(User).where(User.id == user.id).values({column: value}), {}

        def refused(conn: sa.Connection, finish: Any) -> None:
            assert finish([set_limit(User.max_pending_uploads, 8)]) == [[]]
            conn.execute(*set_limit(User.max_uploads_per_day, 9))
            raise LookupError("refused after the round trip")

        with pytest.raises(LookupError):
            work.step_in_one_round_trip(refused)
        work.fail()
    assert _limits(app, user.id) == (8, None)


def _two_users(make_user) -> tuple[int, int]:
    return make_user("frank").id, make_user("gina").id


def _limits(app, user_id: int) -> tuple[int | None, int | None]:
    kept = _user(app, user_id)
    return kept.max_pending_uploads, kept.max_uploads_per_day


def _writes_after_a_core_step(work: UnitOfWork, first: int, second: int) -> None:
    """A Core step, then a Core write of the request, then a change through the session."""

    def bump(conn: sa.Connection) -> None:
        conn.execute(sa.update(User).where(User.id == first).values(max_uploads_per_day=7))

    work.step_on_connection(bump)
    conn = work.connection()
    conn.execute(sa.update(User).where(User.id == first).values(max_pending_uploads=3))
    # The session joins the request's connection (on SQLite a second one would wait for the
    # first one's write lock): what it writes is in the same transaction.
    db.session.get_one(User, second).max_pending_uploads = 5
    db.session.flush()
    assert db.session.connection() is conn


def test_writes_after_a_core_step_share_its_connection_and_commit_together(app, make_user) -> None:
    first, second = _two_users(make_user)
    with app.app_context():
        work = UnitOfWork(db.session)
        _writes_after_a_core_step(work, first, second)
        work.commit()
        assert db.session.connection() is not None  # the session goes on, on the engine again
        db.session.rollback()
    assert _limits(app, first) == (3, 7)
    assert _limits(app, second) == (5, None)


@pytest.mark.parametrize("step_first", [False, True], ids=["fail", "step-then-fail"])
def test_writes_after_a_core_step_fail_together_unless_a_step_committed_them(
    app, make_user, step_first: bool
) -> None:
    """A failure after the step undoes the request's writes on its connection and in the
    session (the step's own commit stays; the undo runs on the session afterwards). An ORM
    step run in between commits them first, with the session's, then runs on its own: the
    failure then takes back none of it."""
    first, second = _two_users(make_user)
    with app.app_context():
        work = UnitOfWork(db.session)
        _writes_after_a_core_step(work, first, second)

        def undo() -> None:
            db.session.get_one(User, first).max_uploads_per_day = 8

        def later() -> None:
            db.session.get_one(User, second).max_uploads_per_day = 4

        work.on_failure(undo)
        if step_first:
            work.step(later)
        work.fail()
    if step_first:
        assert (_limits(app, first), _limits(app, second)) == ((3, 8), (5, 4))
    else:
        assert (_limits(app, first), _limits(app, second)) == ((None, 8), (None, None))


@pytest.mark.parametrize("own_connection", [False, True], ids=["session", "own-connection"])
def test_a_failed_step_is_rolled_back(app, make_user, own_connection: bool) -> None:
    user = make_user("carol")

    def half_done() -> None:
        db.session.get_one(User, user.id).max_uploads_per_day = 9
        db.session.flush()
        raise RuntimeError("injected: the step fails after writing")

    def half_done_on(conn: sa.Connection) -> None:
        conn.execute(sa.update(User).where(User.id == user.id).values(max_uploads_per_day=9))
        raise RuntimeError("injected: the step fails after writing")

    with app.app_context():
        work = UnitOfWork(db.session)
        with pytest.raises(RuntimeError):
            if own_connection:
                work.step_on_connection(half_done_on)
            else:
                work.step(half_done)
        work.commit()
    assert _user(app, user.id).max_uploads_per_day is None


def test_undos_run_newest_first_after_the_rollback_and_a_failing_one_is_only_logged(
    app, make_user, caplog
) -> None:
    user = make_user("dora")
    ran: list[str] = []

    def undo_in_database() -> None:
        ran.append("database")
        db.session.get_one(User, user.id).max_pending_uploads = 1

    def undo_that_fails() -> None:
        ran.append("fails")
        raise RuntimeError("injected: the undo fails")

    with app.app_context():
        work = UnitOfWork(db.session)
        work.on_failure(undo_in_database)
        work.on_failure(undo_that_fails)
        db.session.get_one(User, user.id).max_uploads_per_day = 2  # the request's own work
        with caplog.at_level(logging.WARNING, logger="broker.api"):
            work.fail()
    assert ran == ["fails", "database"]
    assert "could not undo part of a failed request" in caplog.text
    kept = _user(app, user.id)
    assert kept.max_uploads_per_day is None  # rolled back
    assert kept.max_pending_uploads == 1  # the undo's own write was committed


def test_a_joined_sessions_commit_is_the_real_commit_before_its_hooks_run(app, make_user) -> None:
    """The session joined to the request's connection commits that connection's transaction
    itself: its after_commit hooks (the token cache's news) see the rows committed."""
    first, second = _two_users(make_user)
    seen: list[int | None] = []
    with app.app_context():
        engine = db.engine

        def after_commit(_session: Any) -> None:
            with engine.connect() as other:  # another connection sees only what is committed
                seen.append(other.scalar(sa.select(User.max_pending_uploads).filter_by(id=second)))

        work = UnitOfWork(db.session)
        _writes_after_a_core_step(work, first, second)
        sa.event.listen(db.session(), "after_commit", after_commit)
        work.commit()
    assert seen == [5]
    assert _limits(app, first) == (3, 7)


def test_a_unit_of_work_on_a_plain_session_writes_on_the_sessions_connection(
    app, make_user
) -> None:
    """Only the request's session can be joined to a connection of the unit of work's own: on
    any other, the Core writes go on the session's connection (on SQLite a second connection
    would wait for the first one's write lock)."""
    first, second = _two_users(make_user)
    with app.app_context(), OrmSession(db.engine) as session:
        work = UnitOfWork(session)
        work.step_on_connection(
            lambda conn: conn.execute(
                sa.update(User).where(User.id == first).values(max_uploads_per_day=7)
            )
        )
        conn = work.connection()
        conn.execute(sa.update(User).where(User.id == first).values(max_pending_uploads=3))
        session.get_one(User, second).max_pending_uploads = 5
        session.flush()
        assert session.connection() is conn
        work.commit()
    assert _limits(app, first) == (3, 7)
    assert _limits(app, second) == (5, None)


def test_a_change_to_an_object_loaded_before_the_core_writes_is_committed(app, make_user) -> None:
    """The session's commit is skipped only when it holds nothing to write: an object the
    request loaded before the step (which ended that transaction) and changed after the Core
    writes is still written, with them."""
    first, second = _two_users(make_user)
    with app.app_context():
        work = UnitOfWork(db.session)
        user = db.session.get_one(User, second)
        work.step_on_connection(
            lambda conn: conn.execute(
                sa.update(User).where(User.id == first).values(max_uploads_per_day=7)
            )
        )
        work.connection().execute(
            sa.update(User).where(User.id == first).values(max_pending_uploads=3)
        )
        user.max_pending_uploads = 5  # no transaction is begun for it yet
        work.commit()
    assert _limits(app, first) == (3, 7)
    assert _limits(app, second) == (5, None)


def test_a_change_to_the_requests_kept_token_user_is_committed(app, make_user, bearer) -> None:
    """A token kept in memory authenticates with no session at all; its user, changed by the
    request after Core writes, is written by the unit of work's commit all the same."""
    first, second = _two_users(make_user)
    user = _user(app, second)
    secret = bearer(app, user)["Authorization"].removeprefix("Bearer ")
    cache = app.extensions["tokens"]
    with app.app_context():
        assert tokens.authenticate(db.session, secret, cache=cache) is not None  # now kept
        db.session.commit()
    with app.test_request_context():
        token = tokens.authenticate(db.session, secret, cache=cache)
        assert token is not None and sa.inspect(token).detached
        work = UnitOfWork(db.session)
        work.connection().execute(
            sa.update(User).where(User.id == first).values(max_pending_uploads=3)
        )
        token.user.max_pending_uploads = 5
        work.commit()
    assert _limits(app, first) == (3, None)
    assert _limits(app, second) == (5, None)


def test_a_failed_rollback_still_gives_the_connection_back(app, make_user) -> None:
    first, second = _two_users(make_user)
    with app.app_context():
        pool: Any = db.engine.pool
        work = UnitOfWork(db.session)
        work.connection().execute(
            sa.update(User).where(User.id == first).values(max_pending_uploads=3)
        )
        db.session.get_one(User, second)  # the session joins the request's connection

        def broken(*_args: Any) -> None:
            raise RuntimeError("injected: the rollback fails")

        sa.event.listen(db.session(), "after_soft_rollback", broken)
        with pytest.raises(RuntimeError):
            work.fail()
        assert pool.checkedout() == 0
    assert _limits(app, first) == (None, None)


def test_the_undos_run_even_when_the_rollback_fails(app, make_user, caplog) -> None:
    """A rollback that fails (the database went away) still leaves the undos to run (a draft
    at Cloudflare is deleted all the same), a failing one logged; then its error is raised."""
    _, second = _two_users(make_user)
    ran: list[str] = []

    def undo_outside_the_database() -> None:
        ran.append("draft deleted")

    def undo_that_fails() -> None:
        ran.append("fails")
        raise sa.exc.OperationalError("DELETE", {}, Exception("injected: database away"))

    with app.app_context():
        work = UnitOfWork(db.session)
        work.on_failure(undo_outside_the_database)
        work.on_failure(undo_that_fails)
        db.session.get_one(User, second).max_pending_uploads = 3  # the request's own work

        def broken(*_args: Any) -> None:
            raise RuntimeError("injected: the rollback fails")

        sa.event.listen(db.session(), "after_soft_rollback", broken)
        with (
            caplog.at_level(logging.WARNING, logger="broker.api"),
            pytest.raises(RuntimeError, match="the rollback fails"),
        ):
            work.fail()
        assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert ran == ["fails", "draft deleted"]
    assert "database unavailable (Exception)" in caplog.text
    assert _limits(app, second) == (None, None)


class _Interrupted(BaseException):
    """Not an Exception: what a worker's timeout or a KeyboardInterrupt raises."""


# Each prepares one way a create fails and returns the status it is answered with (None: the
# exception goes through the test client); `ended` takes what is to be undone after the test.
Failure = Callable[..., int | None]


def _refused_by_quota(app, client, auth, body, user_id, emulator, monkeypatch, ended) -> int:
    with app.app_context():
        db.session.execute(sa.update(User).filter_by(id=user_id).values(max_pending_uploads=0))
        db.session.commit()
    return 429


def _upstream_error(app, client, auth, body, user_id, emulator, monkeypatch, ended) -> int:
    emulator.inject_fault("direct_upload", status=500)
    return 502


def _custom_id_conflict(app, client, auth, body, user_id, emulator, monkeypatch, ended) -> int:
    assert client.post(URL, json=body, headers=auth).status_code == 201
    with emulator.client() as cf:  # Cloudflare forgets it; our row still holds it
        assert cf.request("DELETE", f"/v1/{body['id']}").status_code == 200
    return 409


def _commit_fails(app, client, auth, body, user_id, emulator, monkeypatch, ended) -> int:
    """The row's COMMIT fails in the driver (the database refuses or goes away)."""
    with app.app_context():
        engine = db.engine
    dialect, real = engine.dialect, engine.dialect.do_commit

    def on_execute(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "INSERT INTO uploads " in statement:
            conn.info["stored"] = True

    def do_commit(dbapi_connection: Any) -> None:
        if dbapi_connection.info.pop("stored", False):
            raise dialect.loaded_dbapi.OperationalError("injected: the row's commit fails")
        real(dbapi_connection)

    monkeypatch.setattr(dialect, "do_commit", do_commit)
    sa.event.listen(engine, "before_cursor_execute", on_execute)
    ended.append(functools.partial(sa.event.remove, engine, "before_cursor_execute", on_execute))
    return 503


def _interrupted(app, client, auth, body, user_id, emulator, monkeypatch, ended) -> None:
    """A BaseException (not an Exception) while the row is being stored."""
    with app.app_context():
        engine = db.engine

    def on_execute(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "INSERT INTO uploads " in statement:
            raise _Interrupted

    sa.event.listen(engine, "before_cursor_execute", on_execute)
    ended.append(functools.partial(sa.event.remove, engine, "before_cursor_execute", on_execute))
    return None


@pytest.mark.parametrize(
    "failure",
    [_refused_by_quota, _upstream_error, _custom_id_conflict, _commit_fails, _interrupted],
    ids=["quota", "upstream", "custom-id", "commit", "base-exception"],
)
def test_a_failed_create_leaves_no_connection_checked_out_and_nothing_behind(
    app, client, make_user, bearer, emulator, monkeypatch, failure: Failure
) -> None:
    user = make_user("henry")
    auth = bearer(app, user)
    body = {"id": f"uow/{failure.__name__.strip('_')}", "require_signed_urls": False}
    with app.app_context():
        pool: Any = db.engine.pool
    ended: list[Callable[[], None]] = []
    try:
        status = failure(app, client, auth, body, user.id, emulator, monkeypatch, ended)
        rows = len(upload_rows(app))
        if status is None:
            with pytest.raises(_Interrupted):
                client.post(URL, json=body, headers=auth)
        else:
            assert client.post(URL, json=body, headers=auth).status_code == status
    finally:
        for end in ended:
            end()
    assert pool.checkedout() == 0
    assert len(upload_rows(app)) == rows
    assert _count(app, UploadReservation) == 0
    with emulator.client() as cf:
        assert cf.get(f"/v1/{body['id']}").status_code == 404  # no draft left (or none made)
    # No connection went back to the pool still in the failed request's transaction (on SQLite
    # it would hold the write lock, or commit the failed row with the next request's).
    monkeypatch.undo()
    emulator.clear_faults()
    other = bearer(app, make_user("ivy"))  # not refused by henry's quota
    assert client.post(URL, json={}, headers=other).status_code == 201
    assert len(upload_rows(app)) == rows + 1

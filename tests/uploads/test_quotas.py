"""Per-user upload quotas: the pending and daily quotas with their Retry-After and the admin's
overrides; quotas hold exactly under concurrent creates, and a failed create leaves nothing
behind: no Upload row, no reservation, no draft at Cloudflare."""

from __future__ import annotations

import math
import threading
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from flask import Flask

from broker import retention
from broker.api.unit_of_work import UnitOfWork
from broker.auth.models import User
from broker.platform.config import settings_of
from broker.platform.db import db, utcnow
from broker.uploads import quotas
from broker.uploads.models import (
    Upload,
    UploadReservation,
    UploadUsage,
    UploadUsageChange,
    UploadUsageHour,
)
from broker.uploads.policy import UploadError
from broker.upstream.budget import BudgetExhausted, get_budget
from tests.factories import live_server, post_upload

URL = "/api/v1/uploads"
IN_FLIGHT = 12


def test_pending_limit_answers_429_with_retry_after(make_app, make_user, bearer, emulator) -> None:
    app = make_app(MAX_PENDING_UPLOADS=2)
    client = app.test_client()
    auth = bearer(app, make_user("dave"))
    first = post_upload(client, auth, expires_in=300).get_json()
    post_upload(client, auth)
    refused = post_upload(client, auth)
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "too_many_pending_uploads"
    assert 1 <= int(refused.headers["Retry-After"]) <= 301
    assert emulator.counters()["direct_upload"] == 2
    assert client.delete(f"{URL}/{first['id']}", headers=auth).status_code == 200
    assert post_upload(client, auth).status_code == 201


def test_pending_retry_after_waits_for_the_users_draft_not_the_refused_request(
    make_app, make_user, bearer
) -> None:
    """The only draft has 30 minutes left: Retry-After says so, not the 2 minutes of the
    refused request's own reservation."""
    app = make_app(MAX_PENDING_UPLOADS=1)
    client = app.test_client()
    auth = bearer(app, make_user("dave"))
    draft = post_upload(client, auth, expires_in=1800).get_json()
    expires_at = datetime.fromisoformat(draft["expires_at"])
    before = utcnow()
    refused = post_upload(client, auth)
    after = utcnow()
    assert refused.status_code == 429
    # The draft's time left when refused, rounded up to a whole second; not the reservation's.
    retry_after = int(refused.headers["Retry-After"])
    assert (expires_at - after).total_seconds() <= retry_after
    assert retry_after <= (expires_at - before).total_seconds() + 1
    assert retry_after > 1700 > quotas.RESERVATION_TTL.total_seconds()


def test_daily_limit_and_admin_overrides(make_app, make_user, bearer, emulator) -> None:
    app = make_app(MAX_UPLOADS_PER_DAY=2)
    client = app.test_client()
    erin = make_user("erin")
    auth = bearer(app, erin)
    admin = bearer(app, make_user("root", is_admin=True))
    for _ in range(2):
        created = post_upload(client, auth).get_json()
        client.delete(f"{URL}/{created['id']}", headers=auth)  # deleted uploads still count
    refused = post_upload(client, auth)
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "daily_upload_limit"
    assert 86000 < int(refused.headers["Retry-After"]) <= 86400

    limits = f"/api/v1/users/{erin.public_id}/upload-limits"
    assert client.put(limits, json={"max_uploads_per_day": 10}, headers=auth).status_code == 403
    changed = client.put(limits, json={"max_uploads_per_day": 10}, headers=admin)
    assert changed.status_code == 200
    assert changed.get_json()["effective_max_uploads_per_day"] == 10
    assert changed.get_json()["effective_max_pending_uploads"] == 20
    assert post_upload(client, auth).status_code == 201

    assert client.get(limits, headers=admin).get_json()["max_uploads_per_day"] == 10
    assert client.get("/api/v1/users/u_nobody/upload-limits", headers=admin).status_code == 404
    assert client.put(limits, json={"max_pending_uploads": 0}, headers=admin).status_code == 200
    assert post_upload(client, auth).status_code == 429


def _concurrent_creates(
    url: str, auth: dict[str, str], count: int, body: dict[str, Any] | None = None
) -> list[int]:
    """POST `count` creates (`body`) at once from `count` threads; return their statuses."""
    gate = threading.Barrier(count)
    statuses: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        with requests.Session() as session:
            gate.wait(30)
            response = session.post(f"{url}{URL}", json=body or {}, headers=auth, timeout=60)
        with lock:
            statuses.append(response.status_code)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(statuses) == count, "a create did not finish"
    return sorted(statuses)


def _counts(app: Flask) -> tuple[int, int]:
    with app.app_context():
        pending = db.session.scalar(
            sa.select(sa.func.count()).select_from(Upload).where(Upload.status == "pending")
        )
        reserved = db.session.scalar(sa.select(sa.func.count()).select_from(UploadReservation))
        return int(pending or 0), int(reserved or 0)


@pytest.mark.parametrize("budget_row", ["missing", "there"])
@pytest.mark.parametrize("limit", ["MAX_PENDING_UPLOADS", "MAX_UPLOADS_PER_DAY"])
def test_concurrent_creates_by_one_user_stop_exactly_at_the_limit(
    make_app, make_user, bearer, emulator, limit, budget_row
) -> None:
    """Without the budget's state row (the first calls: one statement at a time) and with it
    (on PostgreSQL the reservation step in one round trip)."""
    app = make_app(**{"MAX_PENDING_UPLOADS": 1000, "MAX_UPLOADS_PER_DAY": 1000, limit: 3})
    auth = bearer(app, make_user("alice"))
    if budget_row == "there":
        with app.app_context():
            get_budget().acquire()
    # Every create waits upstream, so all of them are in flight at once: a check that is not
    # serialised with the reservation would let each of them through.
    emulator.inject_fault("direct_upload", latency_ms=300)
    with live_server(app) as url:
        statuses = _concurrent_creates(url, auth, IN_FLIGHT)
    assert statuses == [201] * 3 + [429] * (IN_FLIGHT - 3)
    assert _counts(app) == (3, 0)
    assert emulator.counters().get("direct_upload") == 3


def _creates_of_many_users(url: str, auths: list[dict[str, str]]) -> list[int]:
    """One create per user in `auths`, all at once; return their statuses, sorted."""
    gate = threading.Barrier(len(auths))
    statuses: list[int] = []
    lock = threading.Lock()

    def one(auth: dict[str, str]) -> None:
        with requests.Session() as session:
            gate.wait(30)
            response = session.post(f"{url}{URL}", json={}, headers=auth, timeout=60)
        with lock:
            statuses.append(response.status_code)

    threads = [threading.Thread(target=one, args=(auth,)) for auth in auths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(statuses) == len(auths), "a create did not finish"
    return sorted(statuses)


def test_concurrent_creates_of_many_users_never_overspend_the_budget(
    make_app, make_user, bearer, emulator
) -> None:
    """12 users create at once with 4 calls left in the budget: 4 are created, the others
    refused (503) leaving no reservation behind, and the budget counts exactly its limit."""
    app = make_app(UPSTREAM_BUDGET=5, UPSTREAM_BACKGROUND_RESERVE=0, UPSTREAM_BACKGROUND_SHARE=0)
    auths = [bearer(app, make_user(f"user{n}")) for n in range(IN_FLIGHT)]
    assert post_upload(app.test_client(), auths[0]).status_code == 201  # the budget's row
    emulator.inject_fault("direct_upload", latency_ms=100)
    with live_server(app) as url:
        statuses = _creates_of_many_users(url, auths)
    assert statuses == [201] * 4 + [503] * (IN_FLIGHT - 4)
    assert _counts(app) == (5, 0)
    with app.app_context():
        assert get_budget().status().used == 5
    assert emulator.counters().get("direct_upload") == 5


def test_a_budget_row_made_between_its_lock_and_the_spend_is_not_spent_without_the_lock(
    app, make_user, database_url
) -> None:
    """The server runs the step's statements one after the other, each reading what was
    committed before it starts: the budget's state row, missing when the lock statement ran
    (it locked nothing), may be committed by another process's first call before the spend
    statement. The spend must not count a call then (it would without the lock); the step
    goes one statement at a time instead. Replayed on one connection, the other process's
    commit between the two statements."""
    if not database_url.startswith("postgresql"):
        pytest.skip("the one-round-trip step is PostgreSQL's")
    with app.app_context():
        budget = get_budget()
        engine = db.engine
        user_id = db.session.merge(make_user("race")).id
    with engine.connect() as conn:

        def finish(statements: Any) -> list[list[tuple[Any, ...]]]:
            rows = [[tuple(r) for r in conn.execute(s, p)] for s, p in statements[:3]]
            assert rows[2] == []  # the lock statement found no row
            budget.acquire()  # another process's first call: creates the row, commits
            rows += [[tuple(r) for r in conn.execute(s, p)] for s, p in statements[3:]]
            conn.commit()
            return rows

        limits = quotas.Quotas(pending=10, daily=10)
        paid = quotas.reserve_slot(
            conn, user_id, limits, "race-0001", utcnow(), budget=budget, finish=finish
        )
        conn.commit()
    # Before: the spend counted a call without the lock and kept the reservation, then the
    # step went on one statement at a time and inserted it again: a duplicate key (a 500).
    assert paid
    with app.app_context():
        reserved = db.session.scalar(sa.select(sa.func.count()).select_from(UploadReservation))
        assert reserved == 1
        assert get_budget().status().used == 2  # the other process's call and this one


@pytest.mark.parametrize("refusal", ["spent", "paused"])
def test_a_budget_refusal_leaves_no_reservation_and_says_when_to_retry(
    make_app, make_user, bearer, emulator, refusal
) -> None:
    """The create refused by the budget (spent, or paused after a 429) answers 503 with the
    Retry-After the budget itself gives, and keeps no reservation (it was deleted with the
    refused spend, in the same round trip)."""
    clock = [1_700_000_000.0]
    app = make_app(
        UPSTREAM_BUDGET=2,
        UPSTREAM_BACKGROUND_RESERVE=0,
        UPSTREAM_BACKGROUND_SHARE=0,
        UPSTREAM_BUDGET_CLOCK=lambda: clock[0],
    )
    client = app.test_client()
    auth = bearer(app, make_user("hank"))
    assert post_upload(client, auth).status_code == 201
    clock[0] += 45
    if refusal == "spent":
        assert post_upload(client, auth).status_code == 201
    else:
        with app.app_context():
            get_budget().pause(100)
    clock[0] += 10
    refused = post_upload(client, auth)
    assert refused.status_code == 503, refused.get_json()
    assert refused.get_json()["error"]["details"]["reason"] == (
        "budget" if refusal == "spent" else "paused"
    )
    with app.app_context(), pytest.raises(BudgetExhausted) as expected:
        get_budget().acquire()
    # The window (300 s) frees the first call 300 s after its bucket: 255 s from now; the
    # pause ends 90 s from now.
    assert int(refused.headers["Retry-After"]) == math.ceil(expected.value.retry_after)
    assert int(refused.headers["Retry-After"]) == (255 if refusal == "spent" else 90)
    assert _counts(app) == (2 if refusal == "spent" else 1, 0)
    assert emulator.counters()["direct_upload"] == (2 if refusal == "spent" else 1)


@pytest.mark.parametrize("quota", ["max_pending", "max_per_day", "max_stored"])
def test_a_profiles_quota_holds_under_16_concurrent_creates_on_postgresql(
    make_app, make_user, bearer, emulator, postgres_url, database_url, tmp_path, quota
) -> None:
    """16 creates at once from one user in one profile: never more than its quota, never a
    500; the default profile's uploads are not counted against it."""
    if database_url != postgres_url:
        pytest.skip("the suite runs on SQLite here: PostgreSQL's own pass runs this")
    profile = tmp_path / "profiles.toml"
    rules = {"max_pending": 100, "max_per_day": 100, quota: 3}
    lines = "".join(f"{name} = {value}\n" for name, value in rules.items())
    profile.write_text(f"[profiles.avatar]\n{lines}", encoding="utf-8")
    app = make_app(UPLOAD_PROFILES=str(profile))
    auth = bearer(app, make_user("alice"))
    client = app.test_client()
    for _ in range(2):
        assert post_upload(client, auth).status_code == 201  # default profile: not counted
    emulator.inject_fault("direct_upload", latency_ms=300)
    with live_server(app) as url:
        statuses = _concurrent_creates(url, auth, 16, {"profile": "avatar"})
    refused = 403 if quota == "max_stored" else 429
    assert statuses == [201] * 3 + [refused] * 13
    assert _counts(app) == (5, 0)


def test_a_failed_create_gives_its_slot_back(make_app, make_user, bearer, emulator) -> None:
    app = make_app(MAX_PENDING_UPLOADS=1)
    client = app.test_client()
    auth = bearer(app, make_user("alice"))
    emulator.inject_fault("direct_upload", status=500, count=1)
    assert client.post(URL, json={}, headers=auth).status_code == 502
    assert _counts(app) == (0, 0)
    assert client.post(URL, json={}, headers=auth).status_code == 201
    assert client.post(URL, json={}, headers=auth).status_code == 429
    assert _counts(app) == (1, 0)


def test_a_row_that_cannot_be_stored_leaves_no_reservation_or_draft(
    app, client, make_user, bearer, emulator
) -> None:
    auth = bearer(app, make_user("alice"))
    body = {"id": "holiday/1", "require_signed_urls": False}
    first = client.post(URL, json=body, headers=auth)
    assert first.status_code == 201
    # Cloudflare forgets the image, so it accepts the custom id again, but our row keeps it:
    # storing the second row fails after Cloudflare made its draft, and the answer is the one
    # Cloudflare gives for a taken id (nothing more about whose it is).
    with emulator.client() as cf:
        assert cf.request("DELETE", "/v1/holiday/1").status_code == 200
    second = client.post(URL, json=body, headers=auth)
    assert second.status_code == 409
    assert second.get_json()["error"]["code"] == "image_id_taken"
    assert _counts(app) == (1, 0)
    with emulator.client() as cf:
        assert cf.get("/v1/holiday/1").status_code == 404  # the orphan draft was discarded


def test_a_killed_creates_reservation_stops_counting_when_it_expires(
    app, make_user, emulator
) -> None:
    now = utcnow()
    with app.app_context():
        user = db.session.get(User, make_user("alice").id)
        user.max_pending_uploads = 1
        db.session.commit()
        user_id, limits = user.id, quotas.quotas_for(user, settings_of(app))
        work = UnitOfWork(db.session)

        def reserve(upload_id: str, moment: datetime) -> bool:
            return work.step_on_connection(
                lambda conn: quotas.reserve_slot(conn, user_id, limits, upload_id, moment)
            )

        reserve("first", now)  # never finished or released
        with pytest.raises(UploadError) as refused:
            reserve("second", now + timedelta(seconds=1))
        assert refused.value.as_api_error().status == 429
        assert refused.value.retry_after == quotas.RESERVATION_TTL.total_seconds() - 1
        later = now + quotas.RESERVATION_TTL
        reserve("third", later)
        # The stale one no longer counts; the create path leaves its row to the retention job.
        kept = sorted(db.session.scalars(sa.select(UploadReservation.id)))
        assert kept == ["first", "third"]
        assert retention.prune(db.session, settings_of(app), later)["reservations"] == 1
        db.session.commit()
        assert db.session.scalars(sa.select(UploadReservation.id)).all() == ["third"]
        work.commit()  # every unit of work is ended (see broker.api.unit_of_work)


def _folding_users(app: Flask, make_user: Any, database_url: str, *names: str) -> Any:
    """The engine and the ids of new users `names`, for a test of the changes PostgreSQL's
    triggers leave to fold (skipped elsewhere)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("the changes to fold are PostgreSQL's")
    with app.app_context():
        return db.engine, [db.session.merge(make_user(name)).id for name in names]


def _changes(engine: sa.Engine, *rows: dict[str, Any]) -> None:
    """Append usage changes as the triggers on uploads would (PostgreSQL)."""
    base = {"profile": "default", "pending": 0, "ready": 0, "created": 0}
    with engine.begin() as conn:
        conn.execute(sa.insert(UploadUsageChange), [{**base, **row} for row in rows])


def test_the_workers_fold_skips_a_user_whose_create_holds_the_lock(
    app, make_user, database_url
) -> None:
    """The worker folds the changes of users who stopped creating under each user's lock, as a
    create's fold: two folds of one user could take the counts' rows in opposite orders and
    deadlock, and a create's counts are exact only if no other fold of its user commits while
    it reads. A user whose lock a create holds is skipped (that create folds them), without
    waiting; the others are folded."""
    engine, (busy, idle) = _folding_users(app, make_user, database_url, "busy", "idle")
    now = utcnow()
    hour = quotas.hour_of(now)
    _changes(
        engine, *({"user_id": u, "hour": hour, "pending": 1, "created": 1} for u in (busy, idle))
    )
    with engine.connect() as create_step:
        create_step.execute(quotas._user_lock(), {"user_id": busy})
        with engine.begin() as job:
            job.execute(sa.text("SET LOCAL lock_timeout = '2s'"))  # a wait fails, never hangs
            assert quotas.fold_usage_changes(job, now) == 1
        create_step.rollback()
    with engine.begin() as job:
        assert quotas.fold_usage_changes(job, now) == 1
        counts = job.execute(sa.select(UploadUsage.user_id, UploadUsage.pending)).all()
    assert sorted(counts) == sorted([(busy, 1), (idle, 1)])


def test_the_workers_fold_takes_the_oldest_changes_first(
    app, make_user, database_url, monkeypatch
) -> None:
    """A batch at a time, the users whose changes waited longest: an active user always has a
    fresh change waiting (its next create folds it), and must not keep a quiet user's changes
    out of every batch."""
    engine, (active, quiet) = _folding_users(app, make_user, database_url, "active", "quiet")
    now = utcnow()
    assert active < quiet  # by id, the active user would come first
    hour = quotas.hour_of(now)
    _changes(engine, {"user_id": quiet, "hour": hour, "pending": 1, "created": 1})
    _changes(engine, {"user_id": active, "hour": hour, "pending": 1, "created": 1})
    monkeypatch.setattr(quotas, "FOLD_BATCH", 1)
    with engine.begin() as job:
        assert quotas.fold_usage_changes(job, now) == 1
        left = job.execute(sa.select(UploadUsageChange.user_id)).scalars().all()
    assert left == [active]


def test_a_fold_writes_only_the_hours_the_daily_count_reads(app, make_user, database_url) -> None:
    """A fold adds to the hours after the one the last 24 hours start in, and only where the
    count changes: a status change (one out, one in, same hour) and an old upload's deletion
    write no hour row. The retention job deletes the old hours; no fold writes one again, so
    the two never wait on each other's rows."""
    engine, (user_id,) = _folding_users(app, make_user, database_url, "hours")
    now = utcnow()
    hour, old = quotas.hour_of(now), quotas.hour_of(now - quotas.DAY)
    _changes(
        engine,
        {"user_id": user_id, "hour": old - 5, "ready": -1, "created": -1},  # an old one deleted
        {"user_id": user_id, "hour": old, "pending": -1, "created": -1},  # the boundary hour
        {"user_id": user_id, "hour": hour - 1, "pending": -1, "created": -1},  # completed:
        {"user_id": user_id, "hour": hour - 1, "ready": 1, "created": 1},  # out, then in
        {"user_id": user_id, "hour": hour, "pending": 1, "created": 1},  # a new one
    )
    with engine.begin() as job:
        assert quotas.fold_usage_changes(job, now) == 5
        hours = job.execute(sa.select(UploadUsageHour.hour, UploadUsageHour.created)).all()
        counts = job.execute(sa.select(UploadUsage.pending, UploadUsage.ready)).one()
    assert hours == [(hour, 1)]
    assert tuple(counts) == (-1, 0)

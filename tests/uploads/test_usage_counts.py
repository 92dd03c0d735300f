"""The usage counts a create's quota check reads (`upload_usage`, `upload_usage_hours` and, on
PostgreSQL, the `upload_usage_changes` not folded in yet) against a recount of `uploads`.

After every path that writes an upload the way users reach it — the API's create (a pick with
bad rows in it, an idempotent replay), `/complete`, the worker's completion, rejection and
expiry, the API's and the gallery's deletes, retention's hard deletes, an erasure, a user's
deletion — `quotas.recorded_usage` must equal the recount for every user and profile, at every
moment asked (drafts past their expiry the worker has not reached yet, each minute of the hour
the 24-hour window starts in), on SQLite and PostgreSQL, under concurrent writers, and after
the migration that fills the counts from the uploads already there.
"""

from __future__ import annotations

import inspect
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
import time_machine
from alembic.script import ScriptDirectory
from flask import Flask
from flask_migrate import upgrade

from broker import create_app, retention, worker
from broker.auth.models import User
from broker.erasure.models import Erasure
from broker.platform.config import settings_of
from broker.platform.db import MIGRATIONS_DIR, db, utcnow
from broker.uploads import completion, quotas
from broker.uploads.models import Upload
from tests.conftest import base_config
from tests.factories import (
    create_upload,
    csrf_token,
    issue_token,
    live_server,
    log_in,
    post_upload,
    send_file,
)
from tests.support import databases

# Scratch databases for the migration test (dropped at its end).
new_database = databases.new_database

URL = "/api/v1/uploads"
DAY = timedelta(hours=24)
HOUR = 3600
PROFILES = ("default", "gallery")
# The gallery takes JPEG only (a PNG sent there is rejected by the completion's policy check);
# limits high enough that no scenario here meets them unless it means to.
GALLERY = """
[profiles.gallery]
formats = ["JPEG"]
max_pending = 1000
max_per_day = 1000
"""

USAGE = sa.table(
    "upload_usage",
    sa.column("user_id"),
    sa.column("profile"),
    sa.column("pending"),
    sa.column("ready"),
)
HOURS = sa.table(
    "upload_usage_hours",
    sa.column("user_id"),
    sa.column("profile"),
    sa.column("hour"),
    sa.column("created"),
)
CHANGES = sa.table(
    "upload_usage_changes",
    sa.column("user_id"),
    sa.column("profile"),
    sa.column("hour"),
    sa.column("pending"),
    sa.column("ready"),
    sa.column("created"),
)

Pair = tuple[int, str]


# --- the truth, and the comparison -------------------------------------------------------------


def recount(conn: sa.Connection, user_id: int, profile: str, now: datetime) -> tuple[int, ...]:
    """(live drafts, uploads created in the 24 hours before `now`, images kept), counted from
    the rows of `uploads` themselves."""
    mine = (Upload.user_id == user_id, Upload.profile == profile)
    live = sa.and_(Upload.status == "pending", Upload.expires_at > now)

    def count(*where: Any) -> sa.ScalarSelect[int]:
        return sa.select(sa.func.count()).select_from(Upload).where(*mine, *where).scalar_subquery()

    row = conn.execute(
        sa.select(
            count(live),
            count(Upload.created_at > now - DAY),
            count(sa.or_(Upload.status == "ready", live)),
        )
    ).one()
    return tuple(int(n) for n in row)


def hour_of(moment: datetime) -> int:
    """Whole hours since the epoch, as the counts key them."""
    return math.floor(moment.timestamp() / HOUR)


def kept_counts(conn: sa.Connection, pair: Pair, first_hour: int) -> dict[str, Any]:
    """What the count tables hold for `pair` (counts plus the changes not folded in yet):
    pending, ready, and uploads created per hour from `first_hour` on (older hours may be
    pruned); zero hours left out."""
    user_id, profile = pair

    def total(table: sa.TableClause, column: str) -> int:
        where = (table.c.user_id == user_id, table.c.profile == profile)
        found = conn.scalar(
            sa.select(sa.func.coalesce(sa.func.sum(table.c[column]), 0)).where(*where)
        )
        return int(found or 0)

    hours: Counter[int] = Counter()
    for table in (HOURS, CHANGES):
        rows = conn.execute(
            sa.select(table.c.hour, sa.func.sum(table.c.created))
            .where(table.c.user_id == user_id, table.c.profile == profile)
            .where(table.c.hour >= first_hour)
            .group_by(table.c.hour)
        )
        for hour, created in rows:
            hours[int(hour)] += int(created)
    return {
        "pending": total(USAGE, "pending") + total(CHANGES, "pending"),
        "ready": total(USAGE, "ready") + total(CHANGES, "ready"),
        "hours": {hour: n for hour, n in sorted(hours.items()) if n},
    }


def true_counts(conn: sa.Connection, pair: Pair, first_hour: int) -> dict[str, Any]:
    """`kept_counts`' figures recounted from `uploads`."""
    user_id, profile = pair
    mine = (Upload.user_id == user_id, Upload.profile == profile)
    statuses = dict(
        conn.execute(
            sa.select(Upload.status, sa.func.count()).where(*mine).group_by(Upload.status)
        ).all()
    )
    created = conn.scalars(sa.select(Upload.created_at).where(*mine))
    hours = Counter(h for h in map(hour_of, created) if h >= first_hour)
    return {
        "pending": int(statuses.get("pending", 0)),
        "ready": int(statuses.get("ready", 0)),
        "hours": dict(sorted(hours.items())),
    }


def pairs_of(conn: sa.Connection) -> list[Pair]:
    """Every (user, profile) that has a user, an upload or a count row: a deleted user's counts
    left behind are compared too (with nothing)."""
    users = set(conn.scalars(sa.select(User.id)))
    for table in (USAGE, HOURS, CHANGES):
        users |= set(conn.scalars(sa.select(table.c.user_id).distinct()))
    pairs = {(u, p) for u in users for p in PROFILES}
    pairs |= {(u, p) for u, p in conn.execute(sa.select(Upload.user_id, Upload.profile).distinct())}
    return sorted(pairs)


def drift(app: Flask, moments: Iterable[datetime]) -> list[str]:
    """Each (moment, user, profile) where `recorded_usage` differs from the recount, and each
    (user, profile) whose count tables differ from `uploads`; empty when all agree."""
    moments = list(moments)
    found = []
    with app.app_context(), db.engine.connect() as conn:
        pairs = pairs_of(conn)
        for now in moments:
            for user_id, profile in pairs:
                recorded = tuple(quotas.recorded_usage(conn, user_id, profile, now))
                truth = recount(conn, user_id, profile, now)
                if recorded != truth:
                    found.append(
                        f"at {now.isoformat()} user {user_id} {profile}: recorded {recorded}"
                        f" != recount {truth} (pending_live, created_24h, stored)"
                    )
        first_hour = hour_of(min(moments) - DAY)
        for pair in pairs:
            kept, true = kept_counts(conn, pair, first_hour), true_counts(conn, pair, first_hour)
            if kept != true:
                found.append(f"user {pair[0]} {pair[1]}: count tables {kept} != uploads {true}")
    return found


def assert_agree(app: Flask, *moments: datetime) -> None:
    """Fail, listing every difference, unless the counts agree with `uploads` at `moments`
    (default: now)."""
    differences = drift(app, moments or (utcnow(),))
    assert differences == [], "\n".join(differences)


def truth(app: Flask, user_id: int, profile: str, now: datetime) -> tuple[int, ...]:
    """The recount alone (to say what a scenario built: the comparison is not of zeros)."""
    with app.app_context(), db.engine.connect() as conn:
        return recount(conn, user_id, profile, now)


def recorded(app: Flask, user_id: int, profile: str, now: datetime) -> tuple[int, ...]:
    with app.app_context(), db.engine.connect() as conn:
        return tuple(quotas.recorded_usage(conn, user_id, profile, now))


# --- helpers driving the real paths -------------------------------------------------------------


def _profiles(tmp_path: Path) -> str:
    path = tmp_path / "profiles.toml"
    path.write_text(GALLERY, encoding="utf-8")
    return str(path)


@pytest.fixture
def counted(make_app: Callable[..., Flask], tmp_path: Path) -> Flask:
    """An app with the default and the gallery profile."""
    return make_app(UPLOAD_PROFILES=_profiles(tmp_path), WEBHOOK_ALLOW_PRIVATE=True)


def _statuses(app: Flask, ids: Iterable[str]) -> list[str]:
    with app.app_context():
        rows = dict(db.session.execute(sa.select(Upload.id, Upload.status)).all())
        return [str(rows[i]) for i in ids]


def _row(app: Flask, upload_id: str) -> Upload:
    with app.app_context():
        row = db.session.get(Upload, upload_id)
        assert row is not None
        db.session.expunge(row)
        return row


def _complete(client: Any, auth: dict[str, str], upload: dict[str, Any]) -> str:
    answer = client.post(f"{URL}/{upload['id']}/complete", headers=auth)
    assert answer.status_code in (200, 202), answer.get_json()
    return str(answer.get_json()["status"])


def _delete(client: Any, auth: dict[str, str], upload: dict[str, Any]) -> None:
    answer = client.delete(f"{URL}/{upload['id']}", headers=auth)
    assert answer.status_code == 200, answer.get_json()


def _run_worker(app: Flask, now: datetime, passes: int = 3) -> None:
    """Worker passes from `now` on, each past the leases the one before may have left."""
    for step in range(passes):
        worker.run_once(app, now=now + step * timedelta(seconds=completion.LEASE_SECONDS + 1))


# --- 1. several users, two profiles, every path of an upload ------------------------------------


def test_counts_follow_creates_completions_rejections_expiries_and_deletes(
    counted: Flask, make_user: Callable[..., Any], emulator: Any
) -> None:
    """Three users, each in two profiles: drafts completed through `/complete` and by the
    worker, rejected by the gallery's policy, deleted through the API pending or ready, left
    to expire; one pick of five files with three bad rows in it, an idempotent replay, drafts
    discarded from the gallery page. Checked after each step, before and after the next
    create folds PostgreSQL's changes in."""
    app = counted
    client = app.test_client()
    users = {name: make_user(name) for name in ("alice", "bob", "carol")}
    auths = {name: issue_token(app, user) for name, user in users.items()}
    made: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for name, auth in auths.items():
        for profile in PROFILES:
            ups = [create_upload(client, auth, profile=profile, expires_in=3600) for _ in range(4)]
            ups.append(create_upload(client, auth, profile=profile, expires_in=120))
            made[(name, profile)] = ups
    start = utcnow()
    assert truth(app, users["alice"].id, "gallery", start) == (5, 5, 5)
    assert_agree(app)

    # A pick of five files: one custom id taken (Cloudflare forgot it, our row keeps it: the
    # row's INSERT fails after the draft was made), one with metadata too large, one whose
    # create Cloudflare fails; the replay of an Idempotency-Key makes no second row.
    bob = auths["bob"]
    first = create_upload(client, bob, id="bob-holiday", require_signed_urls=False)
    with emulator.client() as cf:
        assert cf.request("DELETE", "/v1/bob-holiday").status_code == 200
    answers = [post_upload(client, bob, metadata={"note": "x" * 2000})]
    answers.append(post_upload(client, bob, id="bob-holiday", require_signed_urls=False))
    emulator.inject_fault("direct_upload", status=500, count=1)
    answers.append(post_upload(client, bob, profile="gallery"))
    keyed = {**bob, "Idempotency-Key": "pick-5"}
    answers += [client.post(URL, json={}, headers=keyed) for _ in range(2)]
    assert [a.status_code for a in answers] == [422, 409, 502, 201, 201]
    assert answers[3].get_json()["id"] == answers[4].get_json()["id"]
    assert first["status"] == "pending"
    assert truth(app, users["bob"].id, "default", utcnow()) == (7, 7, 7)
    assert_agree(app)

    # Files: the first of each profile sent and `/complete` called (the default profile's is
    # checked at once; the gallery's rules leave it to the worker, which rejects the PNG); the
    # second sent silently, found by the worker.
    for (name, profile), ups in made.items():
        send_file(ups[0], fmt="PNG")
        send_file(ups[1], fmt="PNG" if profile == "default" else "JPEG")
        assert _complete(client, auths[name], ups[0]) == (
            "ready" if profile == "default" else "pending"
        )
    assert_agree(app)
    _run_worker(app, utcnow() + timedelta(seconds=90))
    for (_, profile), ups in made.items():
        first = "ready" if profile == "default" else "rejected"
        assert _statuses(app, [ups[0]["id"], ups[1]["id"]]) == [first, "ready"]
    assert_agree(app)

    # Deletes through the API: a draft, and (in the default profile) a ready image.
    for (name, profile), ups in made.items():
        _delete(client, auths[name], ups[2])
        if profile == "default":
            _delete(client, auths[name], ups[0])
    assert_agree(app)

    # The gallery page discards carol's drafts left (but the one a page still sends).
    log_in(client, "carol")
    keep = made[("carol", "default")][3]["id"]
    discarded = client.post(
        "/gallery/drafts/discard",
        json={"keep": [keep]},
        headers={"X-CSRFToken": csrf_token(client)},
    )
    assert discarded.status_code == 200 and discarded.get_json() == {"discarded": 3}
    assert_agree(app)

    # Alice's client calls `/complete` for a 2-minute draft after its URL expired: settled
    # (expired) at once; the worker expires the other 2-minute drafts, past the grace.
    lapsed = made[("alice", "default")][4]
    with time_machine.travel(_row(app, lapsed["id"]).expires_at + timedelta(seconds=1)):
        assert _complete(client, auths["alice"], lapsed) == "expired"
    assert_agree(app)
    late = start + timedelta(seconds=120 + app.config["EXPIRY_GRACE"] + 5)
    _run_worker(app, late)
    for (name, _), ups in made.items():
        if name != "carol":
            assert _statuses(app, [ups[4]["id"]]) == ["expired"]
    assert_agree(app, utcnow(), late)
    expected = {"default": (1, 5, 2), "gallery": (1, 5, 2)}
    alice = users["alice"].id
    assert {p: truth(app, alice, p, late) for p in PROFILES} == expected

    # The next create of each user (on PostgreSQL it folds the user's changes in).
    for auth in auths.values():
        for profile in PROFILES:
            create_upload(client, auth, profile=profile)
    assert_agree(app, utcnow(), late)


# --- 2. drafts past their expiry the worker has not reached ------------------------------------


def test_a_draft_stops_counting_the_moment_its_url_expires(
    make_app: Callable[..., Flask], tmp_path: Path, make_user: Callable[..., Any]
) -> None:
    """Drafts of 120, 180 and 300 seconds and a ready image; the worker never runs. Each
    draft leaves `pending_live` (and `stored`) at its `expires_at` exactly, not when the
    worker marks it; a create then finds the slot free."""
    app = make_app(UPLOAD_PROFILES=_profiles(tmp_path), MAX_PENDING_UPLOADS=3)
    client = app.test_client()
    user = make_user("dana")
    auth = issue_token(app, user)
    ready = create_upload(client, auth, expires_in=600)
    send_file(ready, fmt="PNG")
    assert _complete(client, auth, ready) == "ready"
    drafts = [create_upload(client, auth, expires_in=s) for s in (120, 180, 300)]
    other = create_upload(client, auth, profile="gallery", expires_in=120)
    assert post_upload(client, auth).status_code == 429  # three live drafts: the limit
    ends = [_row(app, d["id"]).expires_at for d in (*drafts, other)]
    tiny = timedelta(microseconds=1)
    moments = sorted({m for end in ends for m in (end - tiny, end, end + tiny, end + 2 * tiny)})
    assert_agree(app, utcnow(), *moments)
    live = [truth(app, user.id, "default", end + tiny)[0] for end in ends[:3]]
    assert live == [2, 1, 0]
    assert truth(app, user.id, "gallery", ends[3] + tiny) == (0, 1, 0)

    # Past the first draft's expiry, the worker still away: the create takes its slot.
    with time_machine.travel(ends[0] + timedelta(seconds=1), tick=False):
        assert post_upload(client, auth).status_code == 201
        assert post_upload(client, auth).status_code == 429
        now = utcnow()
    assert recorded(app, user.id, "default", now) == (3, 5, 4)
    assert_agree(app, now, *moments)


# --- 3. the hour the 24-hour window starts in --------------------------------------------------


def test_the_daily_count_is_exact_at_every_minute_of_the_boundary_hour(
    counted: Flask, make_user: Callable[..., Any]
) -> None:
    """Uploads created (at injected times) 24 h 1 min and 23 h 59 min before `base`, spread
    over the hour the window starts in and the next, and recently; the count of the last 24
    hours is compared at every minute of two hours from `base`, and at 24 hours after each
    creation exactly (out) and a microsecond before (in)."""
    app = counted
    client = app.test_client()
    user, other = make_user("erin"), make_user("fred")
    auth, other_auth = issue_token(app, user), issue_token(app, other)
    base = utcnow().replace(second=0, microsecond=0) - timedelta(minutes=5)
    start_hour = datetime.fromtimestamp(hour_of(base - DAY) * HOUR, UTC)
    offsets = [timedelta(minutes=m, seconds=s) for m, s in ((0, 0), (0, 1), (1, 0), (17, 3))]
    offsets += [timedelta(minutes=m) for m in (29, 30, 31, 45, 59)]
    offsets += [timedelta(minutes=59, seconds=59, microseconds=999_999), timedelta(hours=1)]
    offsets += [timedelta(hours=1, minutes=m) for m in (1, 30, 59)]
    times = sorted(
        {start_hour + o for o in offsets}
        | {base - DAY - timedelta(minutes=1), base - DAY + timedelta(minutes=1)}
        | {base - timedelta(hours=3), base - timedelta(minutes=1)}
    )
    created = []
    for n, moment in enumerate(times):
        with time_machine.travel(moment, tick=False):
            profile = "gallery" if n % 4 == 3 else "default"
            created.append(create_upload(client, auth, profile=profile, expires_in=120)["id"])
            if n % 5 == 0:
                create_upload(client, other_auth)
    stamps = [_row(app, i).created_at for i in created]
    assert stamps == times  # created when injected
    sweep = [base + timedelta(minutes=m) for m in range(0, 121)]
    exact = [s + DAY + d for s in stamps for d in (-timedelta(microseconds=1), timedelta(0))]
    assert_agree(app, *sweep, *exact)
    daily = {sum(truth(app, user.id, p, m)[1] for p in PROFILES) for m in sweep}
    assert len(daily) >= 6  # the window moved over the creations: the test compares counts

    # Past the creations, the count falls to what the last 24 hours hold.
    after = base + DAY + timedelta(minutes=1)
    assert truth(app, user.id, "default", after)[1] == 0
    assert_agree(app, after)


# --- 4. retention, erasure, a user's deletion ----------------------------------------------------


def test_counts_after_retention_erasure_and_a_users_deletion(
    counted: Flask, make_user: Callable[..., Any], emulator: Any
) -> None:
    """Uploads made 40 days ago (deleted, expired, kept) and today; retention deletes the old
    deleted and expired rows; the user's erasure leaves nothing pending or kept; deleting
    the user deletes its uploads (the foreign key's cascade) and its counts end at zero; a
    new user (on SQLite it reuses the deleted one's id) starts at zero."""
    app = counted
    client = app.test_client()
    root, bob, alice = make_user("root", is_admin=True), make_user("bob"), make_user("alice")
    admin, auth, bob_auth = (issue_token(app, u) for u in (root, alice, bob))
    now = utcnow()
    old = now - timedelta(days=40)
    with time_machine.travel(old, tick=False):
        ups = [create_upload(client, auth, profile=p, expires_in=120) for p in PROFILES * 2]
        send_file(ups[0], fmt="PNG")
        assert _complete(client, auth, ups[0]) == "ready"
        _delete(client, auth, ups[1])
        send_file(ups[2], fmt="PNG")
        assert _complete(client, auth, ups[2]) == "ready"
        _delete(client, auth, ups[2])
    _run_worker(app, old + timedelta(hours=1))  # the gallery's last draft expires
    assert _statuses(app, [u["id"] for u in ups]) == ["ready", "deleted", "deleted", "expired"]
    recent = [create_upload(client, auth, profile=p) for p in PROFILES]
    _delete(client, auth, recent[1])
    create_upload(client, bob_auth, profile="gallery")
    assert truth(app, alice.id, "default", now) == (1, 1, 2)
    assert_agree(app, now, old + timedelta(hours=2))

    done = worker.Worker(app).run_once(now=utcnow())
    assert done["prune"] >= 3
    with app.app_context():
        left = set(db.session.scalars(sa.select(Upload.id).where(Upload.user_id == alice.id)))
    assert left == {ups[0]["id"], recent[0]["id"], recent[1]["id"]}
    assert_agree(app, utcnow(), now + timedelta(hours=1))

    # The erasure marks every upload of hers deleted: nothing pending or kept; today's
    # creates still count against the day.
    asked = client.post("/api/v1/erasures", json={"user": alice.public_id}, headers=admin)
    assert asked.status_code == 202
    moment = utcnow()
    for step in range(1, 20):
        worker.run_once(app, now=moment + timedelta(seconds=10 * step))
        with app.app_context():
            if db.session.scalar(sa.select(Erasure.status)).value == "done":
                break
    assert _statuses(app, [recent[0]["id"]]) == ["deleted"]
    for profile in PROFILES:
        assert recorded(app, alice.id, profile, utcnow()) == (0, 1, 0)
    assert_agree(app)

    # The user's deletion (an operator's DELETE; the uploads go by the foreign key's cascade).
    with app.app_context():
        db.session.execute(sa.delete(User).where(User.id == alice.id))
        db.session.commit()
        assert db.session.scalar(sa.select(sa.func.count()).where(Upload.user_id == alice.id)) == 0
    for profile in PROFILES:
        assert recorded(app, alice.id, profile, utcnow()) == (0, 0, 0)
    assert_agree(app)

    newcomer = make_user("gina")
    with app.app_context():
        if db.engine.dialect.name == "sqlite":
            assert newcomer.id == alice.id  # the largest rowid is given out again
    for profile in PROFILES:
        assert recorded(app, newcomer.id, profile, utcnow()) == (0, 0, 0)
    create_upload(client, issue_token(app, newcomer), profile="gallery")
    assert recorded(app, newcomer.id, "gallery", utcnow()) == (1, 1, 1)
    assert_agree(app, utcnow(), now + timedelta(hours=1))


# --- 5. concurrent writers on PostgreSQL ---------------------------------------------------------

WRITERS = 8
CREATES_EACH = 4


def test_concurrent_creates_completions_and_deletes_leave_exact_counts_on_postgresql(
    make_app: Callable[..., Flask],
    make_user: Callable[..., Any],
    emulator: Any,
    postgres_url: str,
    database_url: str,
    tmp_path: Path,
) -> None:
    """Eight clients create for one user over real HTTP (Cloudflare slow, so they overlap)
    while the worker completes her drafts whose files arrived, a ninth client deletes others,
    another user creates too, and the retention job prunes and the worker folds everyone's
    changes in again and again (beside the creates' own folds); afterwards the counts equal
    the recount, before and after a create folds the changes left."""
    if database_url != postgres_url:
        pytest.skip("the suite runs on SQLite here: PostgreSQL's own pass runs this")
    app = make_app(
        UPLOAD_PROFILES=_profiles(tmp_path),
        MAX_PENDING_UPLOADS=1000,
        MAX_UPLOADS_PER_DAY=1000,
        COMPLETE_INLINE_BUDGET=0,
    )
    client = app.test_client()
    user = make_user("hana")
    auth = issue_token(app, user)
    other = issue_token(app, make_user("ivan"))
    sent = [create_upload(client, auth, profile=PROFILES[n % 2]) for n in range(12)]
    for up in sent:
        send_file(up, fmt="JPEG")
    doomed = [create_upload(client, auth, profile=PROFILES[n % 2]) for n in range(8)]
    emulator.inject_fault("direct_upload", latency_ms=150)
    gate = threading.Barrier(WRITERS + 4)
    finished = threading.Event()
    folds = []
    failures: list[str] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def creates(n: int, auth: dict[str, str]) -> None:
        with requests.Session() as session:
            gate.wait(30)
            for k in range(CREATES_EACH):
                body = {"profile": PROFILES[(n + k) % 2]}
                answer = session.post(f"{url}{URL}", json=body, headers=auth, timeout=60)
                with lock:
                    statuses.append(answer.status_code)

    def prunes() -> None:
        gate.wait(30)
        with app.app_context():
            while not finished.is_set():
                retention.prune(db.session, settings_of(app), utcnow())
                folds.append(quotas.fold_usage_changes(db.session.connection(), utcnow()))
                db.session.commit()

    def deletes() -> None:
        with requests.Session() as session:
            gate.wait(30)
            for up in doomed:
                answer = session.delete(f"{url}{URL}/{up['id']}", headers=auth, timeout=60)
                if answer.status_code != 200:
                    with lock:
                        failures.append(f"delete {answer.status_code}")

    def completes() -> None:
        gate.wait(30)
        moment = utcnow() + timedelta(seconds=60)
        for step in range(6):
            try:
                worker.run_once(app, now=moment + timedelta(seconds=3 * step))
            except Exception as error:  # reported below, with the others
                with lock:
                    failures.append(f"worker: {error!r}")

    with live_server(app) as url:
        threads = [threading.Thread(target=creates, args=(n, auth)) for n in range(WRITERS)]
        threads.append(threading.Thread(target=creates, args=(WRITERS, other)))
        threads += [threading.Thread(target=deletes), threading.Thread(target=completes)]
        pruning = threading.Thread(target=prunes)
        pruning.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        finished.set()
        pruning.join(60)
    assert failures == []
    assert statuses == [201] * ((WRITERS + 1) * CREATES_EACH)
    assert len(folds) > 1
    _run_worker(app, utcnow() + timedelta(seconds=120))
    assert _statuses(app, [u["id"] for u in sent]) == ["ready"] * len(sent)
    total = len(sent) + len(doomed) + WRITERS * CREATES_EACH
    now = utcnow()
    counts = [truth(app, user.id, p, now) for p in PROFILES]
    assert sum(c[1] for c in counts) == total
    assert sum(c[0] for c in counts) == WRITERS * CREATES_EACH
    assert_agree(app, now)
    create_upload(client, auth)
    assert_agree(app)


# --- the migration fills the counts from the uploads already there -----------------------------


def _counting_revision() -> tuple[str, str]:
    """(the revision that adds the counts, the one before it)."""
    script = ScriptDirectory(MIGRATIONS_DIR)
    for revision in reversed(list(script.walk_revisions())):
        if "upload_usage" in inspect.getsource(revision.module):
            assert isinstance(revision.down_revision, str)
            return revision.revision, revision.down_revision
    raise AssertionError("no migration creates upload_usage")


def _filled(table: sa.Table, given: dict[str, Any], salt: object) -> dict[str, Any]:
    """`given`, and a plain value (unique by `salt`) for every other column that needs one."""
    values = dict(given)
    for column in table.columns:
        if column.name in values or column.nullable or column.server_default is not None:
            continue
        if column.primary_key and isinstance(column.type, sa.Integer):
            continue
        kind = column.type
        if isinstance(kind, sa.Boolean):
            values[column.name] = False
        elif isinstance(kind, sa.DateTime):
            values[column.name] = utcnow()
        elif isinstance(kind, sa.Integer):
            values[column.name] = 0
        elif isinstance(kind, sa.JSON):
            values[column.name] = {}
        else:
            text = f"{salt}-{column.name}"
            values[column.name] = text[: getattr(kind, "length", None) or len(text)]
    return values


def _history(engine: sa.Engine, now: datetime) -> None:
    """Two users' uploads of every status in two profiles, made over 26 hours (some in the
    last millisecond of an hour, and at its first microsecond), stored as the schema before
    the counts holds them."""
    meta = sa.MetaData()
    meta.reflect(engine, only=["users", "uploads"])
    users, uploads = meta.tables["users"], meta.tables["uploads"]
    statuses = ("pending", "ready", "rejected", "expired", "deleted")
    with engine.begin() as conn:
        for user_id in (1, 2):
            row = {"id": user_id, "username": f"user{user_id}", "public_id": f"u_{user_id}"}
            conn.execute(users.insert().values(_filled(users, row, user_id)))
        times = [now - timedelta(minutes=m, seconds=m % 60) for m in range(0, 26 * 60, 37)]
        edge = datetime.fromtimestamp((hour_of(now - timedelta(hours=23)) + 1) * HOUR, UTC)
        times += [edge - timedelta(microseconds=us) for us in (1, 400, 600, 1000, 0)]
        for n, created in enumerate(times, start=1):
            status = statuses[n % len(statuses)]
            # Some drafts still live, some past their expiry (not marked expired yet).
            expires = created + timedelta(minutes=30 if n % 3 else 60 * 30)
            row = {
                "id": f"{n:032x}",
                "user_id": 1 + n % 2,
                "image_id": f"img-{n}",
                "profile": PROFILES[(n // 2) % 2],
                "status": status,
                "created_at": created,
                "expires_at": expires,
                "status_changed_at": created,
            }
            conn.execute(uploads.insert().values(_filled(uploads, row, n)))


def test_the_migration_counts_the_uploads_made_before_it(
    database_url: str, new_database: Callable[[str], str], tmp_path: Path
) -> None:
    """A database with uploads made before the counts' revision: after the upgrade to head
    the counts equal the recount at every quarter hour of the next two hours."""
    counting, before = _counting_revision()
    url = new_database(database_url)
    app = create_app(base_config(url, str(tmp_path)))
    now = utcnow()
    with app.app_context():
        upgrade(revision=before)
        _history(db.engine, now)
        upgrade()
        tables = set(sa.inspect(db.engine).get_table_names())
        assert {"upload_usage", "upload_usage_hours"} <= tables, counting
    moments = [now + timedelta(minutes=15 * q) for q in range(9)]
    assert truth(app, 1, "default", now)[1] > 5
    assert_agree(app, *moments)
    with app.app_context():
        db.engine.dispose()

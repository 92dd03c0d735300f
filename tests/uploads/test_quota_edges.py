"""Each create's own answer at a quota's edge, under concurrent creates over real HTTP.

test_usage_counts.py compares the counts with a recount after concurrent activity, and
test_quotas.py counts the answers of one user's creates from an empty account. Here the
account is already near its limit (drafts live, past their expiry, deleted, completed;
uploads inside and just outside the last 24 hours), K creates race for the last slots while
other uploads of the user are deleted and completed (and, on PostgreSQL, the worker folds the
usage changes), and each answer is checked: exactly the slots left get 201, every other create
the documented 429 with its code, never a 500; the database then holds exactly what was
allowed. A read race (two creates both seeing room for the last slot) fails these tests.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import requests
import sqlalchemy as sa
import time_machine
from flask import Flask

from broker.platform.db import db, utcnow
from broker.uploads import quotas
from broker.uploads.models import UploadReservation
from tests.factories import (
    UPLOADS,
    create_upload,
    issue_token,
    live_server,
    send_file,
    upload_rows,
)
from tests.uploads.test_usage_counts import assert_agree

T = TypeVar("T")
Job = Callable[[requests.Session], T]
# A create's answer: its status and, when refused, its error code.
Answer = tuple[int, str | None]

PENDING_CODE = quotas.TOO_MANY_PENDING.code
DAILY_CODE = quotas.DAILY_QUOTA.code
DAY = timedelta(hours=24)
# Every create waits this long for Cloudflare, so all of them are in flight at once: a check
# not serialised with the reservation would let each of them through.
UPSTREAM_LATENCY_MS = 200


# The database's latency in each reservation (`_slow_reservations`), and its triggers.
RESERVATION_PAUSE = 0.03
# OR REPLACE / IF EXISTS: a run killed before its cleanup leaves them behind.
PG_PAUSE = """
CREATE OR REPLACE FUNCTION edge_pause() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END $$;
DROP TRIGGER IF EXISTS edge_pause ON upload_reservations;
CREATE TRIGGER edge_pause BEFORE INSERT ON upload_reservations
FOR EACH ROW EXECUTE FUNCTION edge_pause();
"""
PG_NO_PAUSE = """
DROP TRIGGER edge_pause ON upload_reservations;
DROP FUNCTION edge_pause();
"""
SQLITE_PAUSE = """
CREATE TEMP TRIGGER edge_pause BEFORE INSERT ON main.upload_reservations
BEGIN SELECT edge_pause(); END
"""


def _at_once(
    jobs: list[Job[Any]], beside: Callable[[threading.Event], Any] | None = None
) -> list[Any]:
    """Run each job in a thread of its own (with its own HTTP session), all released together
    by one barrier, and `beside` (given an event set once the jobs have ended) with them;
    return the jobs' results in order (the first error raised, after all end)."""
    gate = threading.Barrier(len(jobs) + (beside is not None))
    ended = threading.Event()
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(n: int, job: Job[Any]) -> None:
        try:
            with requests.Session() as session:
                gate.wait(30)
                results[n] = job(session)
        except BaseException as error:  # re-raised in the test's thread below
            errors.append(error)

    def run_beside() -> None:
        assert beside is not None
        try:
            gate.wait(30)
            beside(ended)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(n, job)) for n, job in enumerate(jobs)]
    others = [threading.Thread(target=run_beside)] if beside is not None else []
    for t in threads + others:
        t.start()
    for t in threads:
        t.join(60)
    ended.set()
    for t in others:
        t.join(60)
    assert not any(t.is_alive() for t in threads + others), "a job did not finish"
    if errors:
        raise errors[0]
    return results


@contextlib.contextmanager
def _slow_reservations(app: Flask) -> Iterator[None]:
    """Make every reservation's INSERT take RESERVATION_PAUSE longer (a trigger on the table),
    so a create's read of its usage and its reservation's commit are always that far apart:
    creates arriving meanwhile that were not made to wait (PostgreSQL: the user's lock;
    SQLite: the write lock taken before counting) would all read the same room."""
    with app.app_context():
        engine = db.engine
    postgres = engine.dialect.name == "postgresql"
    if postgres:
        with engine.begin() as conn:
            conn.exec_driver_sql(PG_PAUSE.format(seconds=RESERVATION_PAUSE))
    else:
        # SQLite: a temporary trigger of each new connection, calling a function of this process.
        def pausing(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.create_function("edge_pause", 0, _pause)
            dbapi_connection.execute(SQLITE_PAUSE)

        sa.event.listen(engine, "connect", pausing)
        engine.dispose()
    try:
        yield
    finally:
        if postgres:
            with engine.begin() as conn:
                conn.exec_driver_sql(PG_NO_PAUSE)
        else:
            sa.event.remove(engine, "connect", pausing)
            engine.dispose()


def _pause() -> None:
    time.sleep(RESERVATION_PAUSE)


def _creating(url: str, auth: dict[str, str], body: dict[str, Any] | None = None) -> Job[Answer]:
    """A job POSTing one create (`body`); its answer (a 201 must carry a pending upload's id,
    a 429 its Retry-After)."""

    def create(session: requests.Session) -> Answer:
        answer = session.post(f"{url}{UPLOADS}", json=body or {}, headers=auth, timeout=30)
        got = answer.json()
        if answer.status_code == 201:
            assert got["status"] == "pending" and got["id"], got
            return 201, None
        if answer.status_code == 429:
            assert int(answer.headers["Retry-After"]) >= 1, answer.headers
        return answer.status_code, got.get("error", {}).get("code")

    return create


def _calling(method: str, url: str, auth: dict[str, str], expected: tuple[int, ...]) -> Job[int]:
    """A job sending one `method` request to `url` (one of `expected` answers required)."""

    def call(session: requests.Session) -> int:
        answer = session.request(method, url, headers=auth, timeout=30)
        assert answer.status_code in expected, (method, url, answer.status_code, answer.text)
        return answer.status_code

    return call


def _limits(app: Flask, admin: dict[str, str], user: Any, **limits: int) -> None:
    """Set the user's own quota overrides as an admin does, through the API."""
    answer = app.test_client().put(
        f"/api/v1/users/{user.public_id}/upload-limits", json=limits, headers=admin
    )
    assert answer.status_code == 200, answer.get_json()


def _uploads_of(app: Flask, user: Any) -> Counter[str]:
    """The user's uploads by status, as the database holds them."""
    return Counter(str(row.status) for row in upload_rows(app) if row.user_id == user.id)


def _reservations(app: Flask) -> int:
    with app.app_context():
        return int(db.session.scalar(sa.select(sa.func.count()).select_from(UploadReservation)))


def _made_at(client: Any, auth: dict[str, str], moment: datetime, **body: Any) -> dict[str, Any]:
    """Create an upload at the injected time `moment`; return its JSON."""
    with time_machine.travel(moment, tick=False):
        return create_upload(client, auth, **body)


def _refused(answers: list[Answer], codes: set[str]) -> bool:
    """Whether every answer but the 201s is a 429 with one of `codes`."""
    return all(a == (201, None) or (a[0] == 429 and a[1] in codes) for a in answers)


# --- 1. the pending limit's last slots ----------------------------------------------------------

PENDING_LIMIT = 5
PENDING_CREATES = 12


def test_concurrent_creates_take_exactly_the_pending_slots_left(
    make_app: Callable[..., Flask], make_user: Callable[..., Any], emulator: Any
) -> None:
    """A user whose own pending limit is 5 (an admin's override) holds 2 live drafts, one
    past its expiry the worker has not marked (it holds no slot), one deleted: 12 creates at
    once get exactly 3 x 201 and 9 x 429 `too_many_pending_uploads`; the user then has
    exactly 5 pending uploads, no reservation is left, and Cloudflare made 3 drafts."""
    app = make_app()
    client = app.test_client()
    user = make_user("alice")
    auth = issue_token(app, user)
    admin = issue_token(app, make_user("root", is_admin=True))
    _limits(app, admin, user, max_pending_uploads=PENDING_LIMIT)
    now = utcnow()
    _made_at(client, auth, now - timedelta(minutes=10), expires_in=120)  # stale
    doomed = create_upload(client, auth)
    assert client.delete(f"{UPLOADS}/{doomed['id']}", headers=auth).status_code == 200
    for _ in range(2):
        create_upload(client, auth)
    left = PENDING_LIMIT - 2
    drafts_before = emulator.counters()["direct_upload"]
    emulator.inject_fault("direct_upload", latency_ms=UPSTREAM_LATENCY_MS)
    with _slow_reservations(app), live_server(app) as url:
        answers = _at_once([_creating(url, auth)] * PENDING_CREATES)
    assert Counter(answers) == {(201, None): left, (429, PENDING_CODE): PENDING_CREATES - left}
    assert _uploads_of(app, user) == Counter(pending=PENDING_LIMIT + 1, deleted=1)
    with app.app_context(), db.engine.connect() as conn:
        assert quotas.recorded_usage(conn, user.id, "default", utcnow()).pending == PENDING_LIMIT
    assert _reservations(app) == 0
    assert emulator.counters()["direct_upload"] - drafts_before == left
    assert_agree(app)


# --- 2. the daily limit's edge, with deletes, completions and the worker's fold -----------------

DAILY_LIMIT = 10
DAILY_CREATES = 10


def test_concurrent_creates_take_exactly_the_daily_slots_left_while_others_change(
    make_app: Callable[..., Flask],
    make_user: Callable[..., Any],
    emulator: Any,
    database_url: str,
) -> None:
    """At `base` (the clock injected, standing still), the user made 11 uploads around the
    24-hour edge: 4 at or before it (one exactly 24 h before `base`: out), 7 after it (one a
    second after), 4 of them live drafts. Her pending limit leaves as many slots as her daily
    limit (3), so both are at their edge. 10 creates race while 2 live drafts are deleted and
    the 2 others completed (each frees a pending slot, never a daily one) and, on PostgreSQL,
    the worker's fold runs again and again: exactly 3 x 201, the other 7 x 429."""
    app = make_app(MAX_UPLOADS_PER_DAY=DAILY_LIMIT)
    client = app.test_client()
    user = make_user("bea")
    auth = issue_token(app, user)
    # Half past an hour, so the hour the window starts in holds uploads on both sides of it.
    base = utcnow().replace(minute=30, second=0, microsecond=0) + timedelta(hours=1)
    outside = [base - DAY - d for d in (timedelta(hours=2), timedelta(minutes=30))]
    outside += [base - DAY - timedelta(minutes=1), base - DAY]
    stale = [base - DAY + d for d in (timedelta(seconds=1), timedelta(minutes=29))]
    stale.append(base - timedelta(hours=3))
    for moment in outside + stale:
        _made_at(client, auth, moment, expires_in=120)
    doomed = [_made_at(client, auth, base - timedelta(hours=1), expires_in=6 * 3600)]
    doomed.append(_made_at(client, auth, base - timedelta(minutes=50), expires_in=6 * 3600))
    sent = [
        _made_at(client, auth, base - timedelta(minutes=m), expires_in=6 * 3600) for m in (1, 2)
    ]
    for upload in sent:
        send_file(upload)
    in_window = len(stale) + len(doomed) + len(sent)
    left = DAILY_LIMIT - in_window
    assert left == 3
    admin = issue_token(app, make_user("root", is_admin=True))
    _limits(app, admin, user, max_pending_uploads=len(doomed) + len(sent) + left)
    folds: list[int] = []

    def fold(ended: threading.Event) -> None:
        """The worker's fold, again and again until the others end (PostgreSQL's changes)."""
        with app.app_context():
            while not ended.is_set() or not folds:
                folds.append(quotas.fold_usage_changes(db.session.connection(), utcnow()))
                db.session.commit()

    emulator.inject_fault("direct_upload", latency_ms=UPSTREAM_LATENCY_MS)
    with time_machine.travel(base, tick=False), _slow_reservations(app), live_server(app) as url:
        jobs: list[Job[Any]] = [_creating(url, auth)] * DAILY_CREATES
        jobs += [_calling("DELETE", f"{url}{UPLOADS}/{u['id']}", auth, (200,)) for u in doomed]
        jobs += [
            _calling("POST", f"{url}{UPLOADS}/{u['id']}/complete", auth, (200, 202)) for u in sent
        ]
        # SQLite has no changes to fold: the loop would only spin there.
        postgres = database_url.startswith("postgresql")
        answers = _at_once(jobs, fold if postgres else None)[:DAILY_CREATES]
        assert Counter(answers)[(201, None)] == left, answers
        assert len(answers) == DAILY_CREATES and _refused(answers, {DAILY_CODE, PENDING_CODE})
        statuses = _uploads_of(app, user)
        assert statuses["deleted"] == len(doomed)
        assert statuses["ready"] == len(sent)
        assert statuses["pending"] == len(outside) + len(stale) + left
        with app.app_context(), db.engine.connect() as conn:
            usage = quotas.recorded_usage(conn, user.id, "default", base)
        assert (usage.pending, usage.today) == (left, DAILY_LIMIT)
        assert_agree(app, base)
    assert _reservations(app) == 0
    assert not postgres or len(folds) > 1


# --- 3. two users, each at its own edge ----------------------------------------------------------

EACH = 8
# Dina's second profile: its own daily limit, apart from her default profile's.
GALLERY = """
[profiles.gallery]
max_pending = 100
max_per_day = 2
"""


def test_two_users_at_their_edges_never_take_each_others_slots(
    make_app: Callable[..., Flask], make_user: Callable[..., Any], emulator: Any, tmp_path: Path
) -> None:
    """Carl (pending limit 3, 1 draft live: 2 left) and Dina (daily limit 6, 3 uploads today,
    one of them deleted: 3 left; in the gallery profile 2 a day, 1 made: 1 left) send 8
    creates each to each of their edges, all at once, interleaved: exactly 2, 3 and 1 x 201,
    each edge's refusals the code of its limit, and each user's uploads in the database
    exactly what they were allowed."""
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(GALLERY, encoding="utf-8")
    app = make_app(UPLOAD_PROFILES=str(profiles))
    client = app.test_client()
    admin = issue_token(app, make_user("root", is_admin=True))
    carl, dina = make_user("carl"), make_user("dina")
    carl_auth, dina_auth = issue_token(app, carl), issue_token(app, dina)
    _limits(app, admin, carl, max_pending_uploads=3)
    _limits(app, admin, dina, max_uploads_per_day=6)
    create_upload(client, carl_auth)
    made = [create_upload(client, dina_auth) for _ in range(3)]
    assert client.delete(f"{UPLOADS}/{made[0]['id']}", headers=dina_auth).status_code == 200
    create_upload(client, dina_auth, profile="gallery")
    edges = [
        (carl_auth, {}, 2, PENDING_CODE),
        (dina_auth, {}, 3, DAILY_CODE),
        (dina_auth, {"profile": "gallery"}, 1, DAILY_CODE),
    ]
    emulator.inject_fault("direct_upload", latency_ms=UPSTREAM_LATENCY_MS)
    with _slow_reservations(app), live_server(app) as url:
        jobs = [_creating(url, auth, body) for _ in range(EACH) for auth, body, _, _ in edges]
        answers = _at_once(jobs)
    for n, (_, body, left, code) in enumerate(edges):
        mine = answers[n :: len(edges)]
        assert Counter(mine) == {(201, None): left, (429, code): EACH - left}, (n, body)
    assert _uploads_of(app, carl) == Counter(pending=3)
    assert _uploads_of(app, dina) == Counter(pending=2 + 3 + 1 + 1, deleted=1)
    assert _reservations(app) == 0
    assert_agree(app)

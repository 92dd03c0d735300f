"""Completion detection end to end: emulator over real HTTP, the worker driven step by step,
outgoing webhooks to a real local receiver verified with the `standardwebhooks` library.
(Cloudflare's notifications, the hint that makes an upload due: test_cloudflare_hook.py.)"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa
import time_machine

from broker import worker
from broker.emulator.testing import make_image
from broker.platform.config import settings_of
from broker.platform.db import db, utcnow
from broker.uploads import completion
from broker.uploads.models import Upload, VerifyTurn
from broker.uploads.profiles import Profile
from broker.webhooks.models import WebhookDelivery, WebhookEvent
from tests.factories import (
    add_webhook_endpoint,
    create_upload,
    later,
    load_upload,
    send_file,
    webhook_events,
)


def _api_calls(emulator):
    """Upstream API calls made for completion (not file uploads, not the hourly key sync)."""
    skip = {"upload_url", "keys_list"}
    return {k: v for k, v in emulator.counters().items() if k not in skip and v}


def test_complete_then_worker_verifies_and_delivers(setup, receiver, emulator):
    app, client, auth = setup
    up = create_upload(client, auth)
    response = client.post(f"/api/v1/uploads/{up['id']}/complete", headers=auth)
    assert response.status_code == 202  # no file yet
    emulator.reset_counters()
    worker.run_once(app, now=later())
    assert load_upload(app, up["id"]).status == "pending"  # verified: still a draft

    send_file(up)
    response = client.post(f"/api/v1/uploads/{up['id']}/complete", headers=auth)
    # One check found no file: a second wait, growing with each further one.
    assert response.status_code == 202 and response.headers["Retry-After"] == "1"
    # Past the batching window, and past the shared turn the first check took (2 s apart).
    worker.run_once(app, now=later(2 + completion.LIST_EVERY_MIN))
    row = load_upload(app, up["id"])
    assert row.status == "ready"
    assert row.filename == "cat.png" and row.uploaded_at is not None and row.variants
    assert _api_calls(emulator) == {"image_details": 2}  # one details call per check

    response = client.post(f"/api/v1/uploads/{up['id']}/complete", headers=auth)
    assert response.status_code == 200 and response.get_json()["status"] == "ready"
    [got] = receiver.requests
    assert got.verified is True, got.error
    body = got.json
    assert body["type"] == "upload.completed"
    assert body["data"]["upload"]["id"] == up["id"]
    assert body["data"]["upload"]["status"] == "ready"
    assert body["data"]["upload"]["filename"] == "cat.png"


def test_completes_wait_grows_from_the_clients_first_call_not_from_creation(setup, emulator):
    """The worker checked four times while the person picked the file (no /complete yet):
    the first /complete still says 1 s, then the wait grows with the checks after it."""
    app, client, auth = setup
    up = create_upload(client, auth)
    for n in range(1, 5):
        worker.run_once(app, now=later(60 * n))
    assert load_upload(app, up["id"]).check_attempts == 4
    complete = f"/api/v1/uploads/{up['id']}/complete"
    waits = []
    for n in range(5, 9):  # the file does not come: each check after a call finds none
        response = client.post(complete, headers=auth)
        assert response.status_code == 202
        waits.append(int(response.headers["Retry-After"]))
        worker.run_once(app, now=later(60 * n))
    assert waits == [1, 1, 2, 4]
    send_file(up)
    worker.run_once(app, now=later(60 * 9))
    assert client.post(complete, headers=auth).status_code == 200


def test_complete_is_owner_only(setup, make_user, bearer):
    app, client, auth = setup
    up = create_upload(client, auth)
    bob = bearer(app, make_user("bob"))
    assert client.post(f"/api/v1/uploads/{up['id']}/complete", headers=bob).status_code == 404
    assert client.post("/api/v1/uploads/nope/complete", headers=auth).status_code == 404
    assert client.post(f"/api/v1/uploads/{up['id']}/complete").status_code == 401


def test_many_pending_uploads_share_one_listing(setup, receiver, emulator):
    app, client, auth = setup
    ups = [create_upload(client, auth) for _ in range(6)]
    for up in ups[:4]:
        send_file(up)
    # Two clients say so; the other two completed silently; two never send a file.
    for up in ups[:2]:
        client.post(f"/api/v1/uploads/{up['id']}/complete", headers=auth)
    # The never-sent ones are due by their own schedule too.
    with app.app_context():
        db.session.execute(sa.update(Upload).values(next_check_at=utcnow()))
        db.session.commit()
    emulator.reset_counters()
    worker.run_once(app, now=later())
    counters = _api_calls(emulator)
    assert sum(counters.values()) == 1, counters  # a single GET /v2 verified all six
    statuses = [load_upload(app, up["id"]).status for up in ups]
    assert statuses == ["ready"] * 4 + ["pending"] * 2
    assert len(receiver.requests) == 4
    assert all(r.verified for r in receiver.requests)
    # The drafts were rescheduled with backoff, not left due.
    for up in ups[4:]:
        row = load_upload(app, up["id"])
        assert row.next_check_at > utcnow() and row.check_attempts == 1


def test_listing_completes_pending_uploads_that_were_not_even_due(setup, emulator):
    app, client, auth = setup
    a, b, c = (create_upload(client, auth) for _ in range(3))
    send_file(a)
    send_file(b)
    send_file(c)
    client.post(f"/api/v1/uploads/{a['id']}/complete", headers=auth)
    client.post(f"/api/v1/uploads/{b['id']}/complete", headers=auth)
    worker.run_once(app, now=later())
    assert load_upload(app, c["id"]).status == "ready"  # seen in the same listing


def test_silent_client_is_found_by_the_schedule(setup, receiver):
    app, client, auth = setup
    up = create_upload(client, auth)
    send_file(up)
    now = utcnow()
    worker.run_once(app, now=now)  # not due yet
    assert load_upload(app, up["id"]).status == "pending"
    row = load_upload(app, up["id"])
    worker.run_once(app, now=row.next_check_at + timedelta(seconds=2))
    assert load_upload(app, up["id"]).status == "ready"
    assert [r.json["type"] for r in receiver.requests] == ["upload.completed"]


def test_a_due_check_waits_for_the_batching_window(setup, emulator):
    app, client, auth = setup
    up = create_upload(client, auth)
    send_file(up)
    client.post(f"/api/v1/uploads/{up['id']}/complete", headers=auth)
    emulator.reset_counters()
    worker.run_once(app, now=later(0.5))
    assert load_upload(app, up["id"]).status == "pending" and _api_calls(emulator) == {}
    worker.run_once(app, now=later(1.6))
    assert load_upload(app, up["id"]).status == "ready"


def test_backoff_is_capped_exponential():
    assert [completion.check_delay(n) for n in range(6)] == [5, 10, 20, 30, 30, 30]


def test_expired_draft_becomes_expired_once(setup, receiver, emulator):
    app, client, auth = setup
    up = create_upload(client, auth, expires_in=120)
    row = load_upload(app, up["id"])
    late = row.expires_at + timedelta(seconds=app.config["EXPIRY_GRACE"] + 1)
    with time_machine.travel(late, tick=True):
        worker.run_once(app, now=later())
        worker.run_once(app, now=utcnow() + timedelta(seconds=30))
    row = load_upload(app, up["id"])
    assert row.status == "expired"
    assert len(webhook_events(app, "upload.expired")) == 1
    assert [r.json["type"] for r in receiver.requests] == ["upload.expired"]
    assert receiver.requests[0].verified
    # The draft was deleted upstream (best effort).
    assert emulator.emulator.store.get_image(up["image_id"]) is None


def test_file_arriving_just_before_expiry_is_a_completion(setup, receiver):
    app, client, auth = setup
    up = create_upload(client, auth, expires_in=120)
    send_file(up)
    row = load_upload(app, up["id"])
    late = row.expires_at + timedelta(seconds=app.config["EXPIRY_GRACE"] + 1)
    with time_machine.travel(late, tick=True):
        worker.run_once(app, now=later())
    assert load_upload(app, up["id"]).status == "ready"


def test_policy_rejects_and_deletes_the_image(make_app, make_user, bearer, receiver, emulator):
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True, UPLOAD_ALLOWED_FORMATS="JPEG,WEBP")
    auth = bearer(app, make_user("alice"))
    _, receiver.secret = add_webhook_endpoint(app, receiver.url)
    client = app.test_client()
    up = create_upload(client, auth)
    send_file(up, fmt="PNG")
    client.post(f"/api/v1/uploads/{up['id']}/complete", headers=auth)
    worker.run_once(app, now=later())
    row = load_upload(app, up["id"])
    assert row.status == "rejected" and "PNG" in row.reject_reason
    assert emulator.emulator.store.get_image(up["image_id"]) is None
    assert [r.json["type"] for r in receiver.requests] == ["upload.rejected"]


def _policy(**rules):
    """A profile with only the given rules."""
    return Profile(name="test", **rules)


def test_policy_limits_size_and_dimensions():
    png = make_image(300, 200)
    wide = completion.policy_problem(png, _policy(max_width=256, max_height=256))
    assert (wide.rule, wide.measured, wide.limit) == ("max_width", 300, 256)
    assert completion.policy_problem(png, _policy(max_width=300, max_height=300)) is None
    assert completion.policy_problem(png, _policy(max_bytes=10)).rule == "max_bytes"
    unknown = completion.policy_problem(b"GIF89a-not-really", _policy(formats=("GIF",)))
    assert unknown.rule == "formats" and "unknown" in unknown.reason
    assert completion.policy_problem(make_image(fmt="JPEG"), _policy(formats=("JPEG",))) is None


def test_policy_decodes_heic(monkeypatch):
    """An iPhone's HEIC is decoded by the policy check, even in a process where nothing had
    taught Pillow HEIC yet (the emulator's tests may have, so that is undone here first)."""
    from PIL import Image

    heic = make_image(300, 200, fmt="HEIF")
    monkeypatch.delitem(Image.OPEN, "HEIF")
    monkeypatch.setattr(Image, "ID", [i for i in Image.ID if i != "HEIF"])
    assert completion.policy_problem(heic, _policy(formats=("HEIF",))) is None
    assert "HEIF" in Image.OPEN
    assert completion.policy_problem(heic, _policy(max_width=256)).rule == "max_width"
    refused = completion.policy_problem(heic, _policy(formats=("JPEG",)))
    assert refused.reason.startswith("formats: format HEIF is not allowed")


def test_deleting_an_upload_emits_upload_deleted(setup, receiver):
    app, client, auth = setup
    up = create_upload(client, auth)
    assert client.delete(f"/api/v1/uploads/{up['id']}", headers=auth).status_code == 200
    worker.run_once(app, now=later())
    assert [r.json["type"] for r in receiver.requests] == ["upload.deleted"]


def test_outbox_row_is_written_with_the_state_change(setup):
    """The event exists exactly when the transition committed (rolled back → no event)."""
    app, client, auth = setup
    up = create_upload(client, auth)
    with app.app_context():
        from broker.uploads import lifecycle

        row = db.session.get(Upload, up["id"])
        lifecycle.mark_expired(db.session, row)
        db.session.rollback()
        assert db.session.scalar(sa.select(sa.func.count()).select_from(WebhookEvent)) == 0
        row = db.session.get(Upload, up["id"])
        lifecycle.mark_expired(db.session, row)
        db.session.commit()
        assert db.session.scalar(sa.select(sa.func.count()).select_from(WebhookEvent)) == 1
        assert db.session.scalar(sa.select(sa.func.count()).select_from(WebhookDelivery)) == 1


def test_answer_tells_never_arrived_from_not_yet_verified(setup):
    app, client, auth = setup
    up = create_upload(client, auth)
    first = client.post(f"/api/v1/uploads/{up['id']}/complete", headers=auth).get_json()
    assert first["status"] == "pending" and first["last_checked_at"] is None  # not checked yet
    checked_at = later()
    worker.run_once(app, now=checked_at)
    again = client.get(f"/api/v1/uploads/{up['id']}", headers=auth).get_json()
    assert again["status"] == "pending"  # Cloudflare still has no file: the POST never arrived
    assert again["last_checked_at"] == checked_at.isoformat().replace("+00:00", "Z")


def test_silent_schedule_is_5_10_20_then_every_30_seconds(setup):
    """The README's promise: a silent client's upload is checked 5, 10, 20 s apart, then 30."""
    app, client, auth = setup
    up = create_upload(client, auth)
    row = load_upload(app, up["id"])
    assert (row.next_check_at - row.created_at).total_seconds() == 5
    gaps = []
    for _ in range(5):
        due = load_upload(app, up["id"]).next_check_at
        worker.run_once(app, now=due + timedelta(seconds=2))
        gaps.append((load_upload(app, up["id"]).next_check_at - due).total_seconds() - 2)
    assert gaps == [10, 20, 30, 30, 30]


def test_a_filename_too_long_for_the_column_does_not_block_its_batch(setup, emulator, receiver):
    """A 300-character filename from Cloudflare is cut at the client boundary; every upload of
    the listing completes (on PostgreSQL the column is varchar(255))."""
    app, client, auth = setup
    ups = [create_upload(client, auth) for _ in range(4)]
    for up in ups:
        send_file(up)
    long_name = "x" * 296 + ".png"
    with emulator.emulator.store._tx() as cur:
        cur.execute("UPDATE images SET filename = ? WHERE id = ?", (long_name, ups[1]["image_id"]))
    for up in ups:
        client.post(f"/api/v1/uploads/{up['id']}/complete", headers=auth)
    worker.run_once(app, now=later())
    rows = [load_upload(app, up["id"]) for up in ups]
    assert [r.status for r in rows] == ["ready"] * 4
    assert rows[1].filename == long_name[:255]
    worker.run_once(app, now=later(3))
    assert len([r for r in receiver.requests if r.json["type"] == "upload.completed"]) == 4


@pytest.fixture
def inline(make_app, make_user, bearer, receiver):
    """Like `setup`, with inline verification at its default (half the budget)."""
    app = make_app(
        WEBHOOK_ALLOW_PRIVATE=True,
        UPSTREAM_BUDGET=200,
        UPSTREAM_BACKGROUND_RESERVE=40,
        UPSTREAM_BACKGROUND_SHARE=40,
    )
    auth = bearer(app, make_user("alice"))
    _, receiver.secret = add_webhook_endpoint(app, receiver.url)
    return app, app.test_client(), auth


def test_complete_verifies_inline_when_the_budget_has_headroom(inline, emulator, receiver):
    app, client, auth = inline
    ups = [create_upload(client, auth) for _ in range(3)]
    for up in ups[:2]:
        send_file(up)
    emulator.reset_counters()
    answers = [client.post(f"/api/v1/uploads/{u['id']}/complete", headers=auth) for u in ups]
    assert [a.status_code for a in answers] == [200, 200, 202]
    assert [a.get_json()["status"] for a in answers] == ["ready", "ready", "pending"]
    assert answers[0].get_json()["filename"] == "cat.png"
    assert _api_calls(emulator) == {"image_details": 3}  # one details call each, no listing
    # The event is written with the state change; the worker only delivers it.
    assert len(webhook_events(app, "upload.completed")) == 2
    # The one without a file was asked about: last_checked_at says so, and the worker
    # keeps checking it.
    missing = load_upload(app, ups[2]["id"])
    assert missing.last_checked_at is not None and missing.lease_holder is None
    assert missing.next_check_at <= utcnow()
    worker.run_once(app, now=later(3))
    assert sorted(r.json["data"]["upload"]["id"] for r in receiver.requests) == sorted(
        u["id"] for u in ups[:2]
    )
    # Asking again costs nothing: it is ready.
    emulator.reset_counters()
    again = client.post(f"/api/v1/uploads/{ups[0]['id']}/complete", headers=auth)
    assert again.status_code == 200 and _api_calls(emulator) == {}


def test_complete_falls_back_to_the_worker_under_budget_pressure(inline, emulator):
    app, client, auth = inline
    up = create_upload(client, auth)
    send_file(up)
    budget = app.extensions["budget"]
    while budget.status().used < 100:  # half of the 200-call window is spent
        budget.acquire()
    emulator.reset_counters()
    answer = client.post(f"/api/v1/uploads/{up['id']}/complete", headers=auth)
    assert answer.status_code == 202 and answer.headers["Retry-After"] == "1"
    assert _api_calls(emulator) == {}  # nothing spent inline
    worker.run_once(app, now=later())
    assert load_upload(app, up["id"]).status == "ready"
    assert _api_calls(emulator) == {"image_details": 1}


def test_complete_falls_back_to_the_worker_when_creates_pick_up(inline, emulator):
    """A window that is mostly quiet but whose last minute runs at more than half the budget's
    pace: the calls are kept for the creates to come; the worker's shared check takes it."""
    app, client, auth = inline
    ups = [create_upload(client, auth) for _ in range(2)]
    for up in ups:
        send_file(up)
    budget = app.extensions["budget"]
    for _ in range(38):  # 40 calls now; at that pace a 300 s window would hold 200 or more
        budget.acquire()
    status = budget.status()
    assert status.used == 40 < 100 <= status.pace
    emulator.reset_counters()
    answers = [client.post(f"/api/v1/uploads/{u['id']}/complete", headers=auth) for u in ups]
    assert [a.status_code for a in answers] == [202, 202]
    assert _api_calls(emulator) == {}  # nothing spent inline
    worker.run_once(app, now=later())
    assert [load_upload(app, u["id"]).status for u in ups] == ["ready", "ready"]
    assert _api_calls(emulator) == {"list_v2": 1}  # one listing for both


def _at_a_quiet_slice(make_app, make_user, bearer, **overrides):
    """An app at the default budget (1000 calls / 300 s, slices of 30 s, details on the global
    API) whose budget clock stands at the start of a slice after a quiet one; `now[0]` moves it."""
    now = [1_800_000_000.0]  # a multiple of 30 s: a slice of the window begins here
    app = make_app(CLOUDFLARE_BATCH="off", UPSTREAM_BUDGET_CLOCK=lambda: now[0], **overrides)
    budget = app.extensions["budget"]
    assert (budget.limit, budget.window, budget.status().used) == (1000, 300, 0)
    return app, app.test_client(), bearer(app, make_user("alice")), now


@pytest.fixture
def quiet_slice(make_app, make_user, bearer):
    """`_at_a_quiet_slice` with the default settings (20 pending uploads a user)."""
    return _at_a_quiet_slice(make_app, make_user, bearer)


@pytest.fixture
def bulk_quiet_slice(make_app, make_user, bearer):
    """`_at_a_quiet_slice` with the pending limit raised for bulk clients (100,000 drafts)."""
    return _at_a_quiet_slice(make_app, make_user, bearer, MAX_PENDING_UPLOADS=100_000)


def _complete_a_pick(client, auth, now, emulator, files: int) -> tuple[list[int], dict]:
    """Create and send `files` uploads in one pick and complete each 3 s later; return the
    answers' status codes and the upstream calls they made."""
    ups = [create_upload(client, auth) for _ in range(files)]
    for up in ups:
        send_file(up)
    now[0] += 3
    emulator.reset_counters()
    answers = [client.post(f"/api/v1/uploads/{u['id']}/complete", headers=auth) for u in ups]
    return [a.status_code for a in answers], _api_calls(emulator)


def _complete_in_a_burst(app, client, auth, now, emulator, others: int):
    """Create and send one upload while other clients make `others` calls, then complete it
    3 s later; return the answer's status code, the budget's status before it and the upstream
    calls it made."""
    up = create_upload(client, auth)
    send_file(up)
    budget = app.extensions["budget"]
    for _ in range(others):
        budget.acquire()
    now[0] += 3
    status = budget.status()
    emulator.reset_counters()
    answer = client.post(f"/api/v1/uploads/{up['id']}/complete", headers=auth)
    return answer.status_code, status, _api_calls(emulator)


def test_one_users_pick_on_a_quiet_account_is_verified_inline(quiet_slice, emulator):
    """A pick of as many files as a user may hold pending, right after a slice begins: its
    creates and completes are one person's burst, not traffic picking up; every answer is 200."""
    app, client, auth, now = quiet_slice
    files = settings_of(app).max_pending_uploads
    answers, calls = _complete_a_pick(client, auth, now, emulator, files)
    assert answers == [200] * 20
    assert calls == {"image_details": 20}


def test_a_pick_sent_file_by_file_with_the_worker_running_is_verified_inline(quiet_slice, emulator):
    """The same pick as its files arrive, one every 0.5 s, each completed at once, while the
    worker checks the pending ones (a listing each 2 s turn): its listings are not the user's
    calls, so they do not use up the pick's 40. Counted with them, the last five answers were
    202 (40 calls in the slice 10 s in: 1230 a window)."""
    app, client, auth, now = quiet_slice
    answers = []
    # Every clock stands still but for the steps below: the creates' and `/complete`'s, the
    # worker's and the budget's. On a busy machine, real time passing between the steps had
    # made the worker's turns fall elsewhere than the answers' clock said.
    with time_machine.travel(utcnow(), tick=False) as traveller:
        ups = [create_upload(client, auth) for _ in range(20)]
        emulator.reset_counters()
        for up in ups:
            now[0] += 0.5
            traveller.shift(0.5)
            worker.run_once(app)
            send_file(up)
            answers.append(client.post(f"/api/v1/uploads/{up['id']}/complete", headers=auth))
    assert [a.status_code for a in answers] == [200] * 20
    # One details call per answer, and the worker's checks in the same slice: one a 2 s turn
    # (a listing, or a details call when a single upload is left to check).
    calls = _api_calls(emulator)
    assert set(calls) == {"image_details", "list_v2"} and sum(calls.values()) == 20 + 5


def test_a_real_burst_at_a_slice_start_sends_complete_to_the_worker(quiet_slice, emulator):
    """More calls in the new slice than one user's pick spends: read at their own pace (45 calls
    in 6 s, the shortest reading, is 2250 a window), so `/complete` keeps them for creates."""
    app, client, auth, now = quiet_slice
    answer, status, calls = _complete_in_a_burst(app, client, auth, now, emulator, 44)
    # Read from the quiet slice's start the same 45 calls would be 409 a window: headroom.
    assert status.used == 45 and status.pace == 2250
    assert answer == 202 and calls == {}


def test_a_raised_pending_limit_leaves_a_pick_inline_and_a_burst_to_the_worker(
    bulk_quiet_slice, emulator
):
    """A pending limit of 100,000 does not make 200,000 calls "one user's pick": the pace
    forgives at most what a slice holds at the inline checks' pace (1000 x 0.5 / 10 slices = 50
    calls), so a 20-file pick is still verified inline and 53 calls in a new slice's first 3 s
    read at their own pace (2650 a window: 202). Forgiving 200,000, they were read from the
    quiet slice's start (482 a window, under the 500 of the inline share): 200, a details call
    spent per `/complete` while a burst began."""
    app, client, auth, now = bulk_quiet_slice
    answers, calls = _complete_a_pick(client, auth, now, emulator, 20)
    assert answers == [200] * 20
    assert calls == {"image_details": 20}

    now[0] += 57  # a slice begins after a quiet one (the pick's is the one before that)
    answer, status, calls = _complete_in_a_burst(app, client, auth, now, emulator, 52)
    assert (status.used, status.pace) == (93, 2650)  # the pick's 40 calls and these 53
    assert answer == 202 and calls == {}


# -- the shared listing turn (silent clients, N workers) ---------------------------------------


def _silent_traffic(app, client, auth, emulator, workers: list[str]) -> tuple[int, list[str]]:
    """Four silent uploads (two files sent at 3 s and 12 s, two never) and 70 simulated seconds
    of `workers` running side by side (threads, each pass at the same moment); return the
    verification calls the emulator saw and the uploads' statuses."""
    ups = [create_upload(client, auth) for _ in range(4)]
    start = max(load_upload(app, up["id"]).created_at for up in ups)
    emulator.reset_counters()
    sent = {3.0: ups[0], 12.0: ups[1]}
    for step in range(141):
        moment = step / 2
        if moment in sent:
            send_file(sent[moment])
        now = start + timedelta(seconds=moment)
        threads = [
            threading.Thread(
                target=worker.run_once, args=(app,), kwargs={"now": now, "worker_id": w}
            )
            for w in workers
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    calls = _api_calls(emulator)
    statuses = [load_upload(app, up["id"]).status for up in ups]
    with app.app_context():  # out of the next run's way
        db.session.execute(
            sa.update(Upload).where(Upload.status == "pending").values(status="expired")
        )
        db.session.execute(sa.delete(VerifyTurn))
        db.session.commit()
    return sum(calls.values()), statuses


def test_two_workers_make_as_many_verification_calls_as_one(setup, emulator):
    """The shared turn: whichever worker takes it verifies for all; the other finds it taken."""
    app, client, auth = setup
    alone, statuses_alone = _silent_traffic(app, client, auth, emulator, ["w1"])
    paired, statuses_paired = _silent_traffic(app, client, auth, emulator, ["w1", "w2"])
    assert statuses_alone == statuses_paired == ["ready", "ready", "pending", "pending"]
    # The budget is free: a call every 2 s turn (2, 4, … 70 s) while anything is pending.
    assert alone == 35
    assert paired == alone


def test_the_listing_interval_follows_the_budget(make_app):
    """The window spread over the calls background work may still make in it: 2 s at least,
    30 s at most (and while paused); a burst of creates leaves background its share."""
    app = make_app(
        UPSTREAM_BUDGET=20,
        UPSTREAM_BUDGET_WINDOW=30,
        UPSTREAM_BACKGROUND_RESERVE=4,
        UPSTREAM_BACKGROUND_SHARE=4,
    )
    with app.app_context():
        from broker.upstream.budget import get_budget
        from broker.upstream.cloudflare import Priority, get_client

        cf, budget = get_client(), get_budget()
        seen = [completion.listing_interval(cf)]  # 16 left for background: 30 / 16 → 2 s
        for priority, spent in ((Priority.BACKGROUND, 6), (Priority.INTERACTIVE, 10)):
            for _ in range(spent):
                budget.acquire(priority)
            seen.append(completion.listing_interval(cf))
        # 6 background: 10 left → 3 s; then interactive takes all it may (16 of 20 used):
        # background still has its 4 → 7.5 s.
        assert seen == pytest.approx([2.0, 3.0, 7.5])
        for _ in range(3):
            budget.acquire(Priority.BACKGROUND)
        assert completion.listing_interval(cf) == 30.0  # one left: 30 s is the cap
        budget.pause(5)
        assert completion.listing_interval(cf) == 30.0


def test_under_a_scarce_budget_due_checks_wait_for_the_next_turn(
    make_app, make_user, bearer, emulator
):
    app = make_app(
        COMPLETE_INLINE_BUDGET=0,
        UPSTREAM_BUDGET=20,
        UPSTREAM_BACKGROUND_RESERVE=4,
        UPSTREAM_BACKGROUND_SHARE=4,
    )
    client, auth = app.test_client(), bearer(app, make_user("alice"))
    a, b = create_upload(client, auth), create_upload(client, auth)
    with app.app_context():
        from broker.upstream.budget import get_budget
        from broker.upstream.cloudflare import Priority

        for _ in range(14):  # 16 of 20 used with the two creates: 80 %
            get_budget().acquire(Priority.INTERACTIVE)
    send_file(a)
    client.post(f"/api/v1/uploads/{a['id']}/complete", headers=auth)
    emulator.reset_counters()
    start = utcnow()
    worker.run_once(app, now=start + timedelta(seconds=2))
    assert load_upload(app, a["id"]).status == "ready" and _api_calls(emulator)
    send_file(b)
    client.post(f"/api/v1/uploads/{b['id']}/complete", headers=auth)
    calls = sum(_api_calls(emulator).values())
    # 16 of 20 used, 4 left: 300 s / 4 is past the cap, so the next turn is 30 s later.
    worker.run_once(app, now=start + timedelta(seconds=31))
    assert load_upload(app, b["id"]).status == "pending"
    assert sum(_api_calls(emulator).values()) == calls
    worker.run_once(app, now=start + timedelta(seconds=32.5))
    assert load_upload(app, b["id"]).status == "ready"


def test_a_draft_deletion_postponed_by_the_budget_is_done_later(
    make_app, make_user, bearer, emulator
):
    """Expiry under budget pressure: the details call fits, the deletion does not; the upload
    expires at once and `delete_drafts` deletes the draft upstream once the budget allows."""
    app = make_app(
        COMPLETE_INLINE_BUDGET=0,
        UPSTREAM_BUDGET=20,
        UPSTREAM_BUDGET_WINDOW=60,
        UPSTREAM_BACKGROUND_RESERVE=4,
        UPSTREAM_BACKGROUND_SHARE=4,
    )
    client, auth = app.test_client(), bearer(app, make_user("alice"))
    up = create_upload(client, auth, expires_in=120)
    row = load_upload(app, up["id"])
    late = row.expires_at + timedelta(seconds=app.config["EXPIRY_GRACE"] + 1)
    with time_machine.travel(late, tick=False) as traveller, app.app_context():
        from broker.upstream.budget import get_budget
        from broker.upstream.cloudflare import Priority, get_client

        for _ in range(15):  # background may use 16 of 20: one call left, for the details
            get_budget().acquire(Priority.BACKGROUND)
        assert (
            completion.expire_due(db.session, get_client(), settings_of(app), "w1", now=late) == 1
        )
        row = db.session.get(Upload, up["id"])
        assert row.status == "expired" and row.draft_delete_at is not None
        retry_at = row.draft_delete_at
        db.session.commit()
        assert emulator.emulator.store.get_image(up["image_id"]) is not None  # still there
        # Not before its time, and not while the budget is still spent.
        assert completion.delete_drafts_due(db.session, get_client(), "w1", now=late) == 0
        assert (retry_at - late).total_seconds() >= 50  # the budget's own Retry-After
        traveller.move_to(retry_at)  # its calls have left the window: the deletion fits now
        assert completion.delete_drafts_due(db.session, get_client(), "w1", now=retry_at) == 1
        assert db.session.get(Upload, up["id"]).draft_delete_at is None
    assert emulator.emulator.store.get_image(up["image_id"]) is None  # deleted upstream


def _listing_round(app, client, auth, emulator, pending: int) -> tuple[int, int, list[str]]:
    """`pending` silent uploads, two of which got their file; one verification pass 10 s later.
    Return the SQL statements and upstream calls it made, and the uploads' statuses."""
    from broker.upstream.cloudflare import get_client

    ups = [create_upload(client, auth) for _ in range(pending)]
    for up in ups[:2]:
        send_file(up)
    now = max(load_upload(app, up["id"]).created_at for up in ups) + timedelta(seconds=10)
    emulator.reset_counters()
    statements = []
    with app.app_context():
        engine = db.engine

        def count(*_args: object) -> None:
            statements.append(1)

        sa.event.listen(engine, "before_cursor_execute", count)
        try:
            changed = completion.verify_due(
                db.session, get_client(), settings_of(app), "w1", now=now
            )
        finally:
            sa.event.remove(engine, "before_cursor_execute", count)
        assert changed == 2
        db.session.execute(  # out of the next round's way
            sa.update(Upload).where(Upload.status == "pending").values(status="expired")
        )
        db.session.execute(sa.delete(VerifyTurn))
        db.session.commit()
    statuses = [load_upload(app, up["id"]).status for up in ups]
    return len(statements), sum(_api_calls(emulator).values()), statuses


def test_a_listings_database_work_does_not_grow_with_the_uploads_it_did_not_show(
    make_app, make_user, bearer, emulator
):
    """One listing covers every pending upload; those still drafts are rescheduled together, so
    40 pending cost the database what 5 do (it was a read and a commit for each)."""
    app = make_app(COMPLETE_INLINE_BUDGET=0, MAX_PENDING_UPLOADS=100)
    client, auth = app.test_client(), bearer(app, make_user("alice"))
    few, few_calls, few_statuses = _listing_round(app, client, auth, emulator, 5)
    many, many_calls, many_statuses = _listing_round(app, client, auth, emulator, 40)
    assert few_calls == many_calls == 1  # one listing each
    assert few_statuses == ["ready"] * 2 + ["expired"] * 3
    assert many_statuses == ["ready"] * 2 + ["expired"] * 38
    assert many == few

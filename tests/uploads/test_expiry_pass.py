"""Overdue drafts expire in the first worker pass past their expiry and grace, beside the
completions the same pass verifies: several users' drafts, the emulator over real HTTP, the
worker's whole pass (verify, expire, deliver) driven with injected time.

Also when the verify job has just looked at those drafts (a pass shortly before they became
overdue, its leases well inside LEASE_SECONDS): what verify checked it gives back, so the next
pass's expire job finds every one of them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import time_machine
from flask import Flask

from broker import worker
from broker.platform.db import db
from broker.uploads import completion, quotas
from broker.uploads.models import Upload, UploadUsage, UploadUsageChange
from tests.factories import add_webhook_endpoint, create_upload, send_file, webhook_events

USERS = ("alice", "bob", "carol")
SHORT, LONG = 120, 3600  # seconds of an upload URL's life: the shortest allowed, an hour
# Per user: (the URL's life, whether the file is sent) and how many of each.
KINDS = {
    "overdue": (SHORT, False, 2),
    "overdue_sent": (SHORT, True, 1),
    "live_sent": (LONG, True, 1),
    "live": (LONG, False, 1),
}


def _create(app: Flask, make_user: Callable[..., Any], bearer: Callable[..., Any]):
    """Each user's uploads of each kind; return {kind: [upload ids]}, {user id: name}."""
    client = app.test_client()
    made: dict[str, list[str]] = {kind: [] for kind in KINDS}
    users = {}
    for name in USERS:
        user = make_user(name)
        users[user.id] = name
        auth = bearer(app, user)
        for kind, (life, sent, count) in KINDS.items():
            for _ in range(count):
                up = create_upload(client, auth, expires_in=life)
                if sent:
                    send_file(up)
                made[kind].append(up["id"])
    return made, users


def _rows(app: Flask) -> dict[str, Upload]:
    with app.app_context():
        rows = {row.id: row for row in db.session.scalars(sa.select(Upload))}
        db.session.expunge_all()
        return rows


def _overdue_at(rows: dict[str, Upload], ids: list[str], grace: float) -> tuple[datetime, ...]:
    """The first and the last moment at which one of `ids` becomes overdue."""
    moments = sorted(rows[i].expires_at + timedelta(seconds=grace) for i in ids)
    return moments[0], moments[-1]


def _kept_pending(app: Flask, user_id: int) -> int:
    """The user's drafts as the counts the quota check reads hold them (changes not folded
    in yet included): a draft's slot is given back there when it expires."""
    with app.app_context():
        total = 0
        for model in (UploadUsage, UploadUsageChange):
            total += db.session.scalar(
                sa.select(sa.func.coalesce(sa.func.sum(model.pending), 0)).where(
                    model.user_id == user_id, model.profile == "default"
                )
            )
        return total


def _assert_expired_in_one_pass(app, receiver, made, users, now, done) -> None:
    rows = _rows(app)
    statuses = {kind: sorted({rows[i].status for i in ids}) for kind, ids in made.items()}
    assert statuses == {
        "overdue": ["expired"],
        "overdue_sent": ["ready"],
        "live_sent": ["ready"],
        "live": ["pending"],
    }
    assert all(rows[i].lease_holder is None for i in rows)
    # Each upload that changed is counted once, by the job that changed it.
    changed = len(made["overdue"]) + len(made["overdue_sent"]) + len(made["live_sent"])
    assert done["verify_uploads"] + done["expire_uploads"] == changed
    expired = sorted(e.subject for e in webhook_events(app, "upload.expired"))
    assert expired == sorted(made["overdue"])
    # Delivered in the same pass, signed.
    got = [r.json for r in receiver.requests if r.json["type"] == "upload.expired"]
    assert sorted(g["data"]["upload"]["id"] for g in got) == sorted(made["overdue"])
    assert all(r.verified for r in receiver.requests)
    for user_id in users:
        # The counts hold one draft of the user's four: the expired ones gave theirs back. (The
        # create's check stopped counting them when their URL expired; it agrees after too.)
        assert _kept_pending(app, user_id) == 1
        with app.app_context(), db.engine.connect() as conn:
            usage = quotas.recorded_usage(conn, user_id, "default", now)
        assert (usage.pending, usage.stored) == (1, 3)


def test_overdue_drafts_of_several_users_expire_in_the_pass_that_verifies(
    make_app, make_user, bearer, receiver, emulator
):
    """The verify job's listing completes the sent uploads, overdue or not (a file that came in
    time is a completion), so the expire job after it, in the same pass, has only the drafts
    that never got a file: one details call and one deletion each."""
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True, COMPLETE_INLINE_BUDGET=0)
    _, receiver.secret = add_webhook_endpoint(app, receiver.url)
    made, users = _create(app, make_user, bearer)
    grace = app.config["EXPIRY_GRACE"]
    _, last = _overdue_at(_rows(app), made["overdue"] + made["overdue_sent"], grace)
    now = last + timedelta(seconds=1)
    emulator.reset_counters()
    with time_machine.travel(now, tick=False):
        done = worker.run_once(app, now=now)
    _assert_expired_in_one_pass(app, receiver, made, users, now, done)
    assert done["verify_uploads"] == len(made["overdue_sent"]) + len(made["live_sent"])
    assert done["expire_uploads"] == len(made["overdue"])
    drafts = len(made["overdue"])
    calls = {k: v for k, v in emulator.counters().items() if k != "keys_list" and v}
    assert calls == {"list_v2": 1, "image_details": drafts, "image_delete": drafts}


def test_drafts_verify_just_looked_at_expire_in_the_next_pass(
    make_app, make_user, bearer, receiver
):
    """The pass before: verify checks every draft (the listing does not show them: still
    drafts) a second before the first becomes overdue. The next pass, the first one the expire
    job runs in again (10 s on) and well inside the 60 s lease the verify job took, expires them."""
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True, COMPLETE_INLINE_BUDGET=0)
    _, receiver.secret = add_webhook_endpoint(app, receiver.url)
    made, users = _create(app, make_user, bearer)
    grace = app.config["EXPIRY_GRACE"]
    overdue = made["overdue"] + made["overdue_sent"]
    first, last = _overdue_at(_rows(app), overdue, grace)
    looked = first - timedelta(seconds=1)
    then = max(looked + timedelta(seconds=10), last + timedelta(seconds=1))
    assert (then - looked).total_seconds() < completion.LEASE_SECONDS
    with time_machine.travel(looked, tick=False):
        before = worker.run_once(app, now=looked)
    rows = _rows(app)
    assert before["verify_uploads"] == len(made["overdue_sent"]) + len(made["live_sent"])
    assert before["expire_uploads"] == 0
    for upload_id in made["overdue"]:
        assert rows[upload_id].status == "pending"
        assert rows[upload_id].last_checked_at == looked  # verify asked about it
        assert rows[upload_id].lease_holder is None
    with time_machine.travel(then, tick=False):
        done = worker.run_once(app, now=then)
    # Those verify made ready the pass before are not counted again.
    done["verify_uploads"] += before["verify_uploads"]
    _assert_expired_in_one_pass(app, receiver, made, users, then, done)

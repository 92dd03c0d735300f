"""Erasing a user: every image gone at Cloudflare (rows, drafts and images no row knows), the
account locked out and nameless, one `user.erased` event; through faults, a killed worker and
a second ask."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from flask import Flask

from broker import worker
from broker.audit.models import AuditRecord
from broker.auth.models import ApiToken, User
from broker.emulator.testing import make_image
from broker.erasure import erase
from broker.erasure.models import Erasure
from broker.platform import leases
from broker.platform.config import settings_of
from broker.platform.db import db, utcnow
from broker.uploads.models import Upload
from tests import factories

PNG = make_image(8, 8)


def _no_sleep(app: Flask) -> list[float]:
    """Let the client's retry back-off be counted instead of slept."""
    slept: list[float] = []
    app.extensions["cloudflare"]._sleep = slept.append
    return slept


def _images(emulator: Any, creator: str, count: int, *, rows: Flask | None = None, user_id=0):
    """Upload `count` images stamped with `creator`; record each as a ready row when `rows`."""
    ids = []
    with emulator.client() as cf:
        for _ in range(count):
            image = cf.upload(PNG, creator=creator)
            ids.append(image["id"])
            if rows is not None:
                factories.record_upload(rows, user_id, image["id"])
    return ids


def _listed(emulator: Any, creator: str) -> set[str]:
    found: set[str] = set()
    token = ""
    with emulator.client() as cf:
        while True:
            params = {"creator": creator, "per_page": 1000}
            if token:
                params["continuation_token"] = token
            result = cf.get("/v2", params=params).json()["result"]
            found |= {i["id"] for i in result["images"]}
            token = result.get("continuation_token") or ""
            if not token:
                return found


def _erasure(app: Flask) -> Erasure:
    with app.app_context():
        row = db.session.scalar(sa.select(Erasure))
        db.session.expunge_all()
        return row


def test_erasing_300_images_under_faults_and_a_killed_worker(
    make_app: Callable[..., Flask], make_user: Callable[..., Any], emulator: Any, receiver: Any
) -> None:
    """300 images (and 2 drafts, and 3 images whose create answer was lost) under 20 % faults,
    with a worker killed mid-turn: none left at the emulator, the other user's untouched, one
    `user.erased` event delivered; asking again changes nothing."""
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    slept = _no_sleep(app)
    root = make_user("root", is_admin=True)
    alice = make_user("alice")
    bob = make_user("bob")
    factories.add_webhook_endpoint(app, receiver.url, ["user.erased"])
    _images(emulator, alice.public_id, 300, rows=app, user_id=alice.id)
    lost = _images(emulator, alice.public_id, 3)  # at Cloudflare, no row knows them
    with emulator.client() as cf:
        for _ in range(2):
            draft = cf.direct_upload(creator=alice.public_id)
            factories.record_upload(app, alice.id, draft["id"], status="pending")
    kept = set(_images(emulator, bob.public_id, 4, rows=app, user_id=bob.id))
    alice_token = factories.issue_token(app, alice)
    admin = factories.issue_token(app, root)
    client = app.test_client()

    asked = client.post("/api/v1/erasures", json={"user": alice.public_id}, headers=admin)
    assert asked.status_code == 202 and asked.get_json()["status"] == "pending"
    # Locked out at once: the token no longer works, the name and address are gone.
    assert client.get("/api/v1/me", headers=alice_token).status_code == 401
    with app.app_context():
        user = db.session.get(User, alice.id)
        assert (user.username, user.email, user.active) == ("erased", None, False)
        revoked = sa.select(ApiToken.revoked_at).where(ApiToken.user_id == alice.id)
        assert None not in db.session.scalars(revoked).all()

    emulator.inject_fault("*", status=500, error_rate=0.2)
    now = utcnow()
    # A worker takes a turn, deletes at Cloudflare, and is killed before it records anything.
    with app.app_context():
        [erasure_id] = leases.claim(
            db.session,
            Erasure,
            where=[Erasure.id > 0],
            order_by=[Erasure.id],
            limit=1,
            holder="killed",
            now=now,
            lease_seconds=settings_of(app).erasure_lease,
        )
        turn = erase._read(db.session, db.session.get(Erasure, erasure_id))
        db.session.commit()
        assert turn is not None
        half_done = erase._ask(app.extensions["cloudflare"], turn)
        assert half_done.gone  # deleted upstream, never recorded
    assert worker.run_once(app, now=now, worker_id="w2")["erase_users"] == 0  # leased: waits

    # And an outage long enough to outlast the client's retries for a few images.
    emulator.inject_fault("image_delete", status=503, count=12)
    moment = now + timedelta(seconds=settings_of(app).erasure_lease + 1)
    for _ in range(200):
        worker.run_once(app, now=moment, worker_id="w2")
        if _erasure(app).status == "done":
            break
        moment += timedelta(seconds=erase.RETRY_FAILED)
    erasure = _erasure(app)
    assert erasure.status == "done"
    # The faults were met: retried by the client, and deletions that failed were tried again.
    assert erasure.images_deleted >= 305 and erasure.failures > 0 and slept
    emulator.clear_faults()
    assert _listed(emulator, alice.public_id) == set()
    with emulator.client() as cf:
        assert all(cf.get(f"/v1/{i}").status_code == 404 for i in lost)
    assert _listed(emulator, bob.public_id) == kept
    with app.app_context():
        states = dict(
            db.session.execute(
                sa.select(Upload.user_id, sa.func.count())
                .where(Upload.status == "deleted")
                .group_by(Upload.user_id)
            ).all()
        )
        assert states == {alice.id: 302}
        named = sa.select(sa.func.count()).select_from(Upload)
        named = named.where(Upload.user_id == alice.id, Upload.filename.is_not(None))
        assert db.session.scalar(named) == 0
    events = factories.webhook_events(app, "user.erased")
    assert len(events) == 1 and alice.public_id in events[0].payload
    worker.run_once(app, now=moment + timedelta(seconds=60))
    assert [r.body for r in receiver.requests if b"user.erased" in r.body]
    assert not any(s > 10 for s in slept)

    again = client.post("/api/v1/erasures", json={"user": alice.public_id}, headers=admin)
    assert again.status_code == 200 and again.get_json()["status"] == "done"
    worker.run_once(app, now=moment + timedelta(seconds=120))
    assert len(factories.webhook_events(app, "user.erased")) == 1
    with app.app_context():
        actions = list(db.session.scalars(sa.select(AuditRecord.action).order_by(AuditRecord.id)))
    assert actions.count("user.erasure_requested") == 1 and actions.count("user.erased") == 1
    # No 429: Cloudflare's limiter never blocked the token, the budget never paused, and every
    # call was the background side's.
    assert emulator.emulator.controls.limiter._blocked_until == {}
    status = app.extensions["budget"].status()
    assert status.paused_for == 0 and status.background == status.used > 300


def test_the_app_erases_its_own_user_by_external_id(
    make_app: Callable[..., Flask], make_user: Callable[..., Any], emulator: Any
) -> None:
    """A service key of scope `users:erase` erases an account of its namespace by the app's own
    id, twice without harm; its id is no longer stored; a key without the scope is refused."""
    app = make_app()
    _no_sleep(app)
    root = make_user("root", is_admin=True)
    admin = factories.issue_token(app, root)
    client = app.test_client()

    def key(scope: str) -> dict[str, str]:
        made = client.post(
            "/api/v1/service-keys", json={"name": scope, "scopes": [scope]}, headers=admin
        )
        return factories.bearer_header(made.get_json()["key"])

    writer, eraser = key("uploads:write"), key("users:erase")
    on_behalf = {**writer, "On-Behalf-Of": "customer-42"}
    created = factories.create_upload(client, on_behalf)
    factories.send_file(created)
    owner = created["owner"]

    assert (
        client.post(
            "/api/v1/erasures", json={"external_id": "customer-42"}, headers=writer
        ).status_code
        == 403
    )
    assert client.post("/api/v1/erasures", json={"user": owner}, headers=eraser).status_code == 422
    assert (
        client.post("/api/v1/erasures", json={"external_id": "nobody"}, headers=eraser).status_code
        == 404
    )
    first = client.post("/api/v1/erasures", json={"external_id": "customer-42"}, headers=eraser)
    assert first.status_code == 202 and first.get_json()["user"] == owner
    second = client.post("/api/v1/erasures", json={"external_id": "customer-42"}, headers=eraser)
    assert second.status_code == 202 and second.get_json()["user"] == owner
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Erasure)) == 1
        user = db.session.scalar(sa.select(User).where(User.public_id == owner))
        assert "customer-42" not in (user.external_subject or "")
    for step in range(5):
        worker.run_once(app, now=utcnow() + timedelta(seconds=step))
    shown = client.get(f"/api/v1/erasures/{owner}", headers=eraser).get_json()
    assert shown["status"] == "done"
    assert _listed(emulator, owner) == set()


def test_flask_users_erase(make_app: Callable[..., Flask], make_user: Callable[..., Any]) -> None:
    """`flask users erase` queues once and says so; asking again reports the erasure."""
    app = make_app()
    alice = make_user("alice")
    runner = app.test_cli_runner()
    first = runner.invoke(args=["users", "erase", "alice"])
    assert first.exit_code == 0 and "queued" in first.output, first.output
    again = runner.invoke(args=["users", "erase", alice.public_id])
    assert again.exit_code == 0 and "already asked (pending)" in again.output, again.output
    missing = runner.invoke(args=["users", "erase", "nobody"])
    assert missing.exit_code != 0 and "no user named" in missing.output


def test_erasure_removes_the_name_from_the_audit_log(make_app: Callable[..., Flask]) -> None:
    """The audit entries about an erased account keep what happened, not who it was."""
    app = make_app()
    runner = app.test_cli_runner()
    created = runner.invoke(
        args=["users", "create", "carol", "--email", "carol@example.com", "--password-stdin"],
        input="a long passphrase 1\n",
    )
    assert created.exit_code == 0, created.output
    assert "carol" in runner.invoke(args=["audit", "--json"]).output
    assert runner.invoke(args=["users", "erase", "carol"]).exit_code == 0
    entries = runner.invoke(args=["audit", "--json"]).output
    assert "carol" not in entries and "user.created" in entries and "[erased]" in entries


def test_webhook_events_still_queued_about_their_uploads_go_out_without_their_names(
    make_app: Callable[..., Flask], make_user: Callable[..., Any], emulator: Any, receiver: Any
) -> None:
    """An erasure clears the file name and metadata from the events about the person's uploads
    (queued here: the worker has not run), so receivers never get them; another user's events
    keep theirs."""
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    root, alice, bob = make_user("root", is_admin=True), make_user("alice"), make_user("bob")
    _, receiver.secret = factories.add_webhook_endpoint(app, receiver.url, ["upload.completed"])
    client = app.test_client()
    made = {}
    for user in (alice, bob):
        token = factories.issue_token(app, user)
        upload = factories.create_upload(client, token, metadata={"album": f"{user.username}'s"})
        factories.send_file(upload)
        done = client.post(f"/api/v1/uploads/{upload['id']}/complete", headers=token)
        assert done.status_code == 200 and done.get_json()["status"] == "ready", done.get_json()
        made[user.username] = upload["id"]
    queued = factories.webhook_events(app, "upload.completed")
    assert len(queued) == 2 and all("cat.png" in e.payload for e in queued)

    admin = factories.issue_token(app, root)
    asked = client.post("/api/v1/erasures", json={"user": alice.public_id}, headers=admin)
    assert asked.status_code == 202

    worker.run_once(app, worker_id="w1")
    sent = {r.json["data"]["upload"]["id"]: r.json["data"]["upload"] for r in receiver.wait_for(2)}
    assert (sent[made["alice"]]["filename"], sent[made["alice"]]["metadata"]) == (None, {})
    assert (sent[made["bob"]]["filename"], sent[made["bob"]]["metadata"]) == (
        "cat.png",
        {"album": "bob's"},
    )
    assert [r.verified for r in receiver.requests] == [True, True]  # signed as sent


def test_an_event_about_their_upload_written_during_the_erasure_is_cleared_at_its_end(
    app: Flask, make_user: Callable[..., Any], emulator: Any
) -> None:
    """An upload that settles while the erasure runs writes its event after the ask: the
    erasure's last turn clears that one too."""
    from broker.webhooks import outbox

    root, alice = make_user("root", is_admin=True), make_user("alice")
    upload_id = factories.upload_image(app, alice.id)
    asked = app.test_client().post(
        "/api/v1/erasures", json={"user": alice.public_id}, headers=factories.issue_token(app, root)
    )
    assert asked.status_code == 202
    late = {"upload": {"id": upload_id, "filename": "late.png", "metadata": {"who": "alice"}}}
    with app.app_context():
        outbox.emit(db.session, "upload.completed", late, subject=upload_id)
        db.session.commit()
    for _ in range(10):
        worker.run_once(app, worker_id="w1")
        if _erasure(app).status == "done":
            break
    assert _erasure(app).status == "done"
    [event] = factories.webhook_events(app, "upload.completed")
    assert "late.png" not in event.payload and "alice" not in event.payload

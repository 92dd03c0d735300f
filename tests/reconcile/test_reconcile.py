"""Reconciliation: with faults injected and images added and deleted behind the broker's back,
one run brings the database and Cloudflare into agreement (counted on both sides), deletes
nothing the broker still needs, stays within the budget's background share and meets no 429;
`--dry-run` changes nothing; usage and the report reach /metrics and the admin page."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from flask import Flask

from broker.emulator.testing import make_image
from broker.platform.config import settings_of
from broker.platform.db import db, utcnow
from broker.reconcile import run
from broker.uploads.models import Upload
from broker.upstream.cloudflare import get_client
from tests import factories

PNG = make_image(8, 8)
TOKEN = "scrape-me-0123456789"


def _upload(emulator: Any, creator: str, count: int, app: Flask | None = None, user_id: int = 0):
    """Put `count` images at Cloudflare under `creator`; record each as a ready row with `app`."""
    ids = []
    with emulator.client() as cf:
        for _ in range(count):
            image_id = cf.upload(PNG, creator=creator)["id"]
            ids.append(image_id)
            if app is not None:
                factories.record_upload(app, user_id, image_id)
    return ids


def _listed(emulator: Any, creator: str) -> set[str]:
    found: set[str] = set()
    params: dict[str, Any] = {"creator": creator, "per_page": 1000}
    with emulator.client() as cf:
        while True:
            result = cf.get("/v2", params=params).json()["result"]
            found |= {i["id"] for i in result["images"]}
            if not result.get("continuation_token"):
                return found
            params["continuation_token"] = result["continuation_token"]


def _behind_the_back_delete(emulator: Any, image_ids: list[str]) -> None:
    with emulator.client() as cf:
        for image_id in image_ids:
            assert cf.request("DELETE", f"/v1/{image_id}").status_code == 200


def _rows(app: Flask, user_id: int, status: str) -> set[str]:
    with app.app_context():
        return set(
            db.session.scalars(
                sa.select(Upload.image_id).where(Upload.user_id == user_id, Upload.status == status)
            )
        )


def _no_429(app: Flask, emulator: Any) -> None:
    assert emulator.emulator.controls.limiter._blocked_until == {}
    status = app.extensions["budget"].status()
    assert status.paused_for == 0 and status.background == status.used


def test_one_run_brings_both_sides_into_agreement_under_faults(
    make_app: Callable[..., Flask], make_user: Callable[..., Any], emulator: Any
) -> None:
    """30 ready images, 3 deleted at Cloudflare behind the broker's back, 4 added there under
    alice's creator, one of another app, two drafts (one gone): a dry run reports and changes
    nothing; one run under 20 % faults adopts the 4, marks the 3 and the gone draft deleted
    (with their events), leaves bob, the other app's image and the live draft alone."""
    app = make_app(RECONCILE_GRACE=0, METRICS_TOKEN=TOKEN)
    app.extensions["cloudflare"]._sleep = lambda _seconds: None  # back-off counted, not slept
    alice, bob = make_user("alice"), make_user("bob")
    mine = _upload(emulator, alice.public_id, 30, app, alice.id)
    bobs = set(_upload(emulator, bob.public_id, 5, app, bob.id))
    _behind_the_back_delete(emulator, mine[:3])
    orphans = set(_upload(emulator, alice.public_id, 4))
    [foreign] = _upload(emulator, "another-app-user", 1)
    with emulator.client() as cf:
        drafts = [cf.direct_upload(creator=alice.public_id)["id"] for _ in range(2)]
    for draft in drafts:
        factories.record_upload(app, alice.id, draft, status="pending")
    _behind_the_back_delete(emulator, drafts[:1])
    runner = app.test_cli_runner()

    dry = runner.invoke(args=["reconcile", "--dry-run", "--per-page", "10"])
    assert dry.exit_code == 0, dry.output
    assert "orphans=4" in dry.output and "ready_gone=3" in dry.output, dry.output
    assert "drafts_gone=1" in dry.output and "adopted=0" in dry.output
    assert _rows(app, alice.id, "ready") == set(mine)  # nothing changed
    assert factories.webhook_events(app) == []

    emulator.inject_fault("*", status=500, error_rate=0.2)
    done = runner.invoke(args=["reconcile", "--per-page", "10"])
    assert done.exit_code == 0, done.output
    emulator.clear_faults()
    # Agreement, counted on both sides.
    ready = _rows(app, alice.id, "ready")
    assert ready == _listed(emulator, alice.public_id) == set(mine[3:]) | orphans
    assert len(ready) == 31
    assert _rows(app, bob.id, "ready") == _listed(emulator, bob.public_id) == bobs
    assert _rows(app, alice.id, "deleted") == set(mine[:3]) | {drafts[0]}
    assert _rows(app, alice.id, "pending") == {drafts[1]}
    assert _listed(emulator, "another-app-user") == {foreign}
    kinds = sorted(e.type for e in factories.webhook_events(app))
    assert kinds == ["upload.completed"] * 4 + ["upload.deleted"] * 4
    _no_429(app, emulator)

    again = runner.invoke(args=["reconcile", "--per-page", "10"])
    assert again.exit_code == 0, again.output
    assert "orphans=0" in again.output and "ready_gone=0" in again.output
    assert "drafts_gone=0" in again.output and "listed=37" in again.output

    metrics = app.test_client().get("/metrics", headers=factories.bearer_header(TOKEN)).text
    assert 'broker_reconcile_last{kind="listed"} 37' in metrics
    assert 'broker_reconcile_last{kind="orphans"} 0' in metrics
    audit = runner.invoke(args=["audit", "--action", "reconcile.applied"])
    assert audit.output.count("reconcile.applied") == 2  # the two runs that could change things


def test_orphans_deleted_when_the_setting_says_so(
    make_app: Callable[..., Flask], make_user: Callable[..., Any], emulator: Any
) -> None:
    """With BROKER_RECONCILE_ORPHANS=delete an orphan is deleted at Cloudflare, not adopted."""
    app = make_app(RECONCILE_GRACE=0, RECONCILE_ORPHANS="delete")
    alice = make_user("alice")
    kept = set(_upload(emulator, alice.public_id, 2, app, alice.id))
    _upload(emulator, alice.public_id, 2)
    result = app.test_cli_runner().invoke(args=["reconcile"])
    assert (
        result.exit_code == 0
        and "orphans=2" in result.output
        and "orphans_deleted=2" in result.output
    )
    assert _listed(emulator, alice.public_id) == kept == _rows(app, alice.id, "ready")


def test_nothing_young_and_nothing_on_an_incomplete_listing_is_touched(
    make_app: Callable[..., Flask], make_user: Callable[..., Any], emulator: Any
) -> None:
    """Within BROKER_RECONCILE_GRACE an upload in flight is left alone; when the budget's
    background share runs out mid-listing, the run stops, says so, and marks nothing gone."""
    app = make_app(UPSTREAM_BUDGET=20, UPSTREAM_BACKGROUND_RESERVE=17, UPSTREAM_BACKGROUND_SHARE=2)
    alice = make_user("alice")
    mine = _upload(emulator, alice.public_id, 40, app, alice.id)
    _behind_the_back_delete(emulator, mine[:2])
    _upload(emulator, alice.public_id, 1)  # an image whose row is being written right now
    with app.app_context():
        report = run.reconcile(db.session, get_client(), settings_of(app), per_page=10)
        assert (report.orphans, report.too_recent, report.ready_gone) == (0, 1, 0)
        assert not report.complete and "budget" in (report.problem or "")
    assert _rows(app, alice.id, "ready") == set(mine)
    _no_429(app, emulator)
    assert app.extensions["budget"].status().used <= 20 - 17

    cli = app.test_cli_runner().invoke(args=["reconcile", "--per-page", "10"])
    assert cli.exit_code != 0 and "incomplete" in cli.output and "run it again later" in cli.output
    later = utcnow() + timedelta(hours=1)
    # An hour on, a whole budget window later: the listing completes, the two are found.
    with app.app_context():
        app.extensions["budget"].clock = lambda: later.timestamp()
        report = run.reconcile(db.session, get_client(), settings_of(app), per_page=100, now=later)
        assert report.complete and report.ready_gone == 2 and report.adopted == 1


def test_usage_on_the_admin_page_in_metrics_and_from_the_shell(
    make_app: Callable[..., Flask], make_user: Callable[..., Any], emulator: Any
) -> None:
    """`flask usage` asks Cloudflare's stats; the admin page and /metrics show the count, the
    allowance, per-user counts, and the warning once the allowance is nearly used up."""
    app = make_app(METRICS_TOKEN=TOKEN, USAGE_WARN_RATIO=0.00001)
    make_user("root", is_admin=True)
    alice = make_user("alice")
    _upload(emulator, alice.public_id, 3, app, alice.id)
    shown = app.test_cli_runner().invoke(args=["usage"])
    assert shown.exit_code == 0, shown.output
    assert "images: 3 of 100000 allowed" in shown.output and alice.public_id in shown.output
    assert "close to its image allowance" in shown.output
    metrics = app.test_client().get("/metrics", headers=factories.bearer_header(TOKEN)).text
    assert 'broker_cloudflare_images{kind="current"} 3' in metrics
    assert 'broker_cloudflare_images{kind="allowed"} 100000' in metrics
    assert "broker_cloudflare_images_allowance_warning 1" in metrics
    assert "broker_users_with_images 1" in metrics and "broker_user_images_max 3" in metrics
    page = app.test_client()
    factories.log_in(page, "root")
    html = page.get("/admin").text
    assert "3 of 100000 images allowed" in html and "close to the allowance" in html
    assert alice.public_id in html and "Never run" in html


def test_the_worker_reconciles_on_a_shared_turn_and_a_killed_run_loses_nothing(
    make_app: Callable[..., Flask], make_user: Callable[..., Any], emulator: Any
) -> None:
    """With intervals set, the first turn comes one interval after the first worker starts;
    of two workers one takes each turn; a run killed after listing (nothing applied) is simply
    done again by the next turn, which brings both sides into agreement."""
    from broker import worker
    from broker.reconcile import check

    app = make_app(RECONCILE_GRACE=0, RECONCILE_INTERVAL=3600, USAGE_INTERVAL=3600)
    alice = make_user("alice")
    mine = _upload(emulator, alice.public_id, 5, app, alice.id)
    _behind_the_back_delete(emulator, mine[:1])
    start = utcnow()
    assert worker.run_once(app, now=start, worker_id="a")["agree_with_cloudflare"] == 0
    with app.app_context():  # a worker killed mid-run: it listed and planned, then died
        listing = check.list_account(get_client())
        check.plan(db.session, listing, grace=0, now=start)
        db.session.rollback()
    assert _rows(app, alice.id, "ready") == set(mine)
    turn = start + timedelta(seconds=3601)
    done = [
        worker.run_once(app, now=turn, worker_id=name)["agree_with_cloudflare"]
        for name in ("a", "b")
    ]
    assert sorted(done) == [0, 2]  # one turn: the usage refresh and one row marked gone
    assert _rows(app, alice.id, "ready") == _listed(emulator, alice.public_id) == set(mine[1:])

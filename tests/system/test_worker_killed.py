"""A worker killed with SIGKILL in the middle of an erasure, with the emulator failing a fifth of
all calls, as real processes (`make test-system`): compose.yaml's emulator and worker commands,
`flask users erase` and `flask reconcile` run as an operator runs them, on PostgreSQL.

Alice has 120 ready images and 5 more at Cloudflare that no row knows (creates whose answer
was lost); Bob has 10, of which 3 are deleted and 4 added behind the broker's back; one image
belongs to another app. The first worker is killed while it holds the erasure's lease, after
deleting images upstream and before recording them; a reconciliation killed while it confirms
changes nothing, and the next one brings both sides into agreement (counted on both sides);
the second worker takes the erasure over once the dead worker's lease (`BROKER_ERASURE_LEASE`,
shortened here to LEASE seconds, which still outlasts every step between the kill and the
takeover) runs out and finishes it: nothing of Alice's left at the emulator, one `user.erased`
event, Bob's images untouched; asking again changes nothing; no 429 anywhere.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import requests
import sqlalchemy as sa
from cryptography.fernet import Fernet

from broker import create_app
from broker.emulator.testing import ImagesClient, make_image
from broker.platform.db import db
from tests import factories
from tests.conftest import _reset_schema, base_config
from tests.system.topology import BIN, broker_env, compose_commands, topology, wait_for

# The erasure's lease (BROKER_ERASURE_LEASE): long enough for everything the test does while the
# dead worker holds it (two reconciliations, ~10 s on an idle machine), short enough that
# waiting for it to run out is not most of the run (the production default is 120 s).
LEASE = 45
pytestmark = pytest.mark.timeout(LEASE + 300)

FLASK = ["flask", "--app", "broker"]
ALICE_IMAGES = 120
LOST = 5  # at Cloudflare under Alice's creator, unknown to the broker
BOB_IMAGES = 10
BOB_GONE = 3  # deleted at Cloudflare behind the broker's back
BOB_ADDED = 4  # added at Cloudflare under Bob's creator behind the broker's back
FOREIGN = "another-app-user"
FAULTS = {"endpoint": "*", "status": 500, "error_rate": 0.2}
# Slow deletions while the first worker runs, so that its turn (50 images) is caught half-way.
SLOW_DELETES = {"endpoint": "image_delete", "latency_ms": 80, "error_rate": 1.0}
# Slow details while the first reconciliation confirms, so that it is caught half-way.
SLOW_DETAILS = {"endpoint": "image_details", "latency_ms": 300, "error_rate": 1.0}
# The first worker is killed once at least this many of Alice's images are gone upstream.
KILL_AFTER = 10
PNG = make_image(8, 8)


def _account(emu_url: str) -> ImagesClient:
    """A REST client of the emulator's account (the test's own calls, behind the broker)."""
    server = SimpleNamespace(url=emu_url, account_id="emulator-account", api_token="emulator-token")
    return ImagesClient(cast(Any, server))


def _at_cloudflare(cf: ImagesClient, creator: str) -> set[str] | None:
    """The ids listed under `creator`; None when an (injected) fault answered a page."""
    ids: set[str] = set()
    params: dict[str, Any] = {"creator": creator, "per_page": 1000}
    while True:
        answer = cf.get("/v2", params=params)
        if answer.status_code != 200:
            return None
        page = answer.json()["result"]
        ids |= {image["id"] for image in page["images"]}
        if not page.get("continuation_token"):
            return ids
        params["continuation_token"] = page["continuation_token"]


def _listed(cf: ImagesClient, creator: str) -> set[str]:
    """The ids listed under `creator`, asking again past injected faults."""
    found: list[set[str]] = []

    def ask() -> bool:
        ids = _at_cloudflare(cf, creator)
        if ids is not None:
            found.append(ids)
        return ids is not None

    wait_for(ask, 30, f"a listing of {creator}", interval=0.05)
    return found[-1]


def _fault(emu_url: str, fault: dict[str, Any]) -> str:
    """Inject a fault at the emulator; return its id."""
    answer = requests.post(f"{emu_url}/_emulator/faults", json=fault, timeout=5)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["fault"]["id"])


def _unfault(emu_url: str, fault_id: str = "") -> None:
    """Remove one fault (or every fault)."""
    path = f"/_emulator/faults/{fault_id}" if fault_id else "/_emulator/faults"
    requests.delete(emu_url + path, json={}, timeout=5).raise_for_status()


def _counters(emu_url: str) -> dict[str, Any]:
    return dict(requests.get(f"{emu_url}/_emulator/counters", timeout=5).json())


def _one(engine: sa.Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar()


def _images(engine: sa.Engine, user_id: int, status: str) -> set[str]:
    """The image ids of the user's upload rows in `status`."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT image_id FROM uploads WHERE user_id = :u AND status = :s"),
            {"u": user_id, "s": status},
        )
        return {image_id for (image_id,) in rows}


def _erasure(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM erasures")).one()
    values = dict(row._mapping)
    for name in ("lease_until", "completed_at"):
        moment = values[name]
        if moment is not None and moment.tzinfo is None:
            values[name] = moment.replace(tzinfo=UTC)
    return values


def _leased(erasure: dict[str, Any]) -> bool:
    until = erasure["lease_until"]
    return until is not None and until > datetime.now(UTC)


def _counts(output: str) -> dict[str, int]:
    """The counts `flask reconcile` printed (`name=value`)."""
    return {name: int(value) for name, value in re.findall(r"(\w+)=(\d+)", output)}


def test_a_worker_killed_mid_erasure_under_faults(
    postgres_url: str, tmp_path: Path, report: Callable[[str, list[str]], None]
) -> None:
    commands = compose_commands()
    _reset_schema(postgres_url)
    engine = sa.create_engine(postgres_url, pool_pre_ping=True)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "EMULATOR_"))},
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }
    figures: list[str] = []
    try:
        with topology(tmp_path, env) as topo:
            emulator, emu_url = topo.start_emulator(commands["emulator"], tmp_path / "emulator")
            topo.env.update(
                broker_env(emu_url),
                BROKER_ENV="testing",
                BROKER_DATABASE_URL=postgres_url,
                BROKER_SECRET_KEY=secrets.token_urlsafe(32),
                BROKER_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
                BROKER_INSTANCE_PATH=str(tmp_path / "instance"),
                BROKER_LOG_LEVEL="INFO",
                BROKER_CLOUDFLARE_BATCH="off",
                # Reconciliation acts on everything (nothing here is in flight), and only when
                # the operator runs it: the worker's own turns stay off.
                BROKER_RECONCILE_GRACE="0",
                BROKER_RECONCILE_INTERVAL="0",
                BROKER_USAGE_INTERVAL="0",
                BROKER_ERASURE_LEASE=str(LEASE),
            )
            topo.run(commands["setup"], timeout=180)
            for name in ("alice", "bob"):
                topo.run(
                    [*FLASK, "users", "create", name, "--password-stdin"], stdin="a long password\n"
                )
            with engine.connect() as conn:
                users = {
                    name: (user_id, public_id)
                    for name, user_id, public_id in conn.execute(
                        sa.text("SELECT username, id, public_id FROM users")
                    )
                }
            (alice, alice_pid), (bob, bob_pid) = users["alice"], users["bob"]

            # Seed: images at the emulator, rows in the broker's database.
            seeder = create_app(base_config(postgres_url, str(tmp_path / "seed")))
            with _account(emu_url) as cf:

                def put(creator: str, count: int, owner: int | None = None) -> list[str]:
                    ids = [cf.upload(PNG, creator=creator)["id"] for _ in range(count)]
                    for image_id in ids if owner is not None else ():
                        factories.record_upload(seeder, owner, image_id)
                    return ids

                alices = set(put(alice_pid, ALICE_IMAGES, alice))
                lost = set(put(alice_pid, LOST))
                bobs = put(bob_pid, BOB_IMAGES, bob)
                for image_id in bobs[:BOB_GONE]:
                    assert cf.request("DELETE", f"/v1/{image_id}").status_code == 200
                added = set(put(bob_pid, BOB_ADDED))
                foreign = set(put(FOREIGN, 1))
                with seeder.app_context():
                    db.engine.dispose()
                assert _listed(cf, alice_pid) == alices | lost

                # The operator asks; faults on; the first worker starts on it.
                asked = topo.run([*FLASK, "users", "erase", "alice"])
                assert "queued" in asked, asked
                _fault(emu_url, FAULTS)
                slow = _fault(emu_url, SLOW_DELETES)
                first = topo.start("worker", commands["worker"], group=True)

                def mid_turn() -> dict[str, int] | None:
                    """Some of Alice's images gone upstream, not all recorded, lease held."""
                    if not first.alive():
                        raise AssertionError(f"worker exited:\n{first.output()[-3000:]}")
                    erasure = _erasure(engine)
                    holder = erasure["lease_holder"] or ""
                    if not (_leased(erasure) and f":{first.pid}:" in holder):
                        return None
                    listed = _at_cloudflare(cf, alice_pid)
                    if listed is None:
                        return None
                    gone = len(alices - listed)
                    recorded = len(_images(engine, alice, "deleted"))
                    return {"gone": gone} if gone >= KILL_AFTER and gone > recorded else None

                wait_for(mid_turn, 120, "the first worker half-way through a turn", 0.1)
                first.kill9()
                seen_at_kill = alices - _listed(cf, alice_pid)
                recorded_at_kill = _images(engine, alice, "deleted")
                killed = _erasure(engine)
                assert _leased(killed) and f":{first.pid}:" in killed["lease_holder"]
                assert killed["status"] == "pending"
                _unfault(emu_url, slow)
                # The second worker starts at once; it may not touch the leased erasure.
                second = topo.start("worker", commands["worker"], group=True)

                # A reconciliation killed while it confirms what is gone changes nothing.
                slow = _fault(emu_url, SLOW_DETAILS)
                asked_before = _counters(emu_url)["counters"].get("image_details", 0)
                cut = topo.start("reconcile", [*FLASK, "reconcile"], group=True)
                wait_for(
                    lambda: (
                        _counters(emu_url)["counters"].get("image_details", 0) >= asked_before + 3
                    ),
                    60,
                    "the reconciliation to confirm",
                )
                cut.kill9()
                _unfault(emu_url, slow)
                assert _one(engine, "SELECT count(*) FROM reconcile_reports") == 0
                assert _images(engine, alice, "deleted") == recorded_at_kill
                assert _images(engine, bob, "ready") == set(bobs)

                # What the dead worker left: images deleted upstream that no row says are gone
                # (the deletion it had in flight was finished by Cloudflare after it died: at
                # most one more than seen at the kill), and the erasure still under its lease.
                gone_at_kill = alices - _listed(cf, alice_pid)
                assert seen_at_kill <= gone_at_kill and len(gone_at_kill - seen_at_kill) <= 1
                assert recorded_at_kill < gone_at_kill, (gone_at_kill, recorded_at_kill)
                figures.append(
                    f"worker killed (SIGKILL, process group) holding the erasure's lease: "
                    f"{len(gone_at_kill)} of Alice's images deleted upstream "
                    f"({len(gone_at_kill - seen_at_kill)} by the call in flight at the kill), "
                    f"{len(recorded_at_kill)} recorded"
                )

                # One reconciliation, under the faults, brings both sides into agreement.
                done = _counts(topo.run([*FLASK, "reconcile"]))
                assert done["ready_gone"] == BOB_GONE + len(gone_at_kill) - len(recorded_at_kill)
                assert (done["orphans"], done["adopted"]) == (BOB_ADDED, BOB_ADDED), done
                assert done["drafts_gone"] == 0 and done["too_recent"] == 0, done
                bob_ready = _images(engine, bob, "ready")
                assert bob_ready == _listed(cf, bob_pid) == set(bobs[BOB_GONE:]) | added
                alice_ready = _images(engine, alice, "ready")
                # Alice is being erased: her images no row knows are the erasure's to delete.
                assert (
                    alice_ready | lost == _listed(cf, alice_pid) == (alices - gone_at_kill) | lost
                )
                assert _listed(cf, FOREIGN) == foreign
                # Still the dead worker's: the second worker has not touched it yet.
                still = _erasure(engine)
                assert _leased(still) and f":{first.pid}:" in still["lease_holder"], still
                left = (still["lease_until"] - datetime.now(UTC)).total_seconds()
                figures.append(
                    f"reconcile after the kill: listed={done['listed']} "
                    f"ready_gone={done['ready_gone']} adopted={done['adopted']}; "
                    f"Bob {len(bob_ready)} ready = {len(bob_ready)} at the emulator, "
                    f"Alice {len(alice_ready)} ready + {LOST} unknown = "
                    f"{len(alice_ready) + LOST} at the emulator; "
                    f"{left:.0f} s of the dead worker's {LEASE} s lease left"
                )

                # The dead worker's lease runs out; the second worker finishes the erasure.
                wait_for(
                    lambda: _erasure(engine)["status"] == "done",
                    LEASE + 120,
                    "the second worker to finish the erasure",
                    interval=1.0,
                )
                finished = _erasure(engine)
                # Taken over only once the dead worker's lease had run out.
                assert finished["completed_at"] > killed["lease_until"], (finished, killed)
                _unfault(emu_url)
                assert _listed(cf, alice_pid) == set()
                assert _images(engine, alice, "ready") == set()
                assert _images(engine, alice, "deleted") == alices
                assert _listed(cf, bob_pid) == _images(engine, bob, "ready") == bob_ready
                assert _listed(cf, FOREIGN) == foreign
                erased = "SELECT payload FROM webhook_events WHERE type = 'user.erased'"
                with engine.connect() as conn:
                    events = list(conn.execute(sa.text(erased)).scalars())
                assert len(events) == 1 and alice_pid in events[0], events
                # Each image counted once: the rows the worker deleted and the unknown ones
                # it found in the listing (the ones the dead worker deleted were the
                # reconciliation's).
                assert finished["images_deleted"] == (
                    ALICE_IMAGES - len(gone_at_kill) + len(recorded_at_kill) + LOST
                ), finished
                figures.append(
                    f"erasure done by the second worker: images_deleted="
                    f"{finished['images_deleted']} failures={finished['failures']}; "
                    f"0 of Alice's images at the emulator; 1 user.erased event"
                )

                # Asking again changes nothing: no new event after a whole pass.
                again = topo.run([*FLASK, "users", "erase", alice_pid])
                assert "already asked (done)" in again, again
                assert second.stop(35) == 0, second.output()[-3000:]
                topo.run([*FLASK, "worker", "--once"])
                with engine.connect() as conn:
                    assert list(conn.execute(sa.text(erased)).scalars()) == events
                    actions = list(
                        conn.execute(
                            sa.text("SELECT action FROM audit_records WHERE target = :t"),
                            {"t": alice_pid},
                        ).scalars()
                    )
                assert actions.count("user.erasure_requested") == 1, actions
                assert actions.count("user.erased") == 1, actions

                # And the next reconciliation finds nothing to do.
                _fault(emu_url, FAULTS)
                last = _counts(topo.run([*FLASK, "reconcile"]))
                _unfault(emu_url)
                assert last["listed"] == len(bob_ready) + len(foreign), last
                assert last["orphans"] == last["ready_gone"] == last["adopted"] == 0, last
                counters = _counters(emu_url)
                assert counters["throttled"] == 0, counters
                for worker in (first, second):
                    assert "worker job erase_users failed" not in worker.output()
                    assert "could not be done" not in worker.output()
                failed = len(re.findall(r'" 500 -', emulator.output()))
                assert "-> 500, retrying" in first.output() + second.output()
                figures.append(
                    f"again: no new event; last reconcile listed={last['listed']} with nothing "
                    f"to do; emulator: {counters['total']} calls, {failed} answered 500 "
                    f"(injected), 0 answered 429"
                )
    finally:
        engine.dispose()
    report("a worker killed mid-erasure under 20 % faults", figures)

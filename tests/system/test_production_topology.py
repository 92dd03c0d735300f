"""The whole system as operators run it, on loopback, under faults (`make test-system`).

PostgreSQL, Redis, the emulator (its own process, notifications on), two gunicorn web
instances, three workers and a webhook receiver that verifies every delivery with the
`standardwebhooks` library. 300 uploads from five users — 140 whose clients call `/complete`,
140 silent ones, 20 that never send a file — while the emulator fails about a fifth of all
calls, one web instance is killed with SIGKILL, one worker is killed while it holds a webhook
delivery lease and another while it holds upload verification leases, and the receiver goes
away twice. The run is one module-scoped fixture; each test below asserts one promise about it,
and the summary table is printed at the end of the pytest run.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from cryptography.fernet import Fernet

from broker.emulator.testing import make_image
from tests.conftest import require
from tests.factories import csrf_from
from tests.system.topology import (
    BIN,
    Front,
    Process,
    Receiver,
    broker_env,
    compose_commands,
    listening_socket,
    stop_gracefully,
    topology,
    wait_for,
    wait_http,
)

# About 4 minutes alone on a 2-core machine; the limit leaves room for a machine shared with others.
pytestmark = pytest.mark.timeout(600)

USERS = 5
COOPERATIVE = 140
SILENT = 140
NEVER_SENT = 20
TOTAL = COOPERATIVE + SILENT + NEVER_SENT
CLIENT_THREADS = 8
# Settings that scale the run to minutes: the shortest upload expiry Cloudflare accepts
# (120 s) and a short grace; leases keep their production lengths.
NEVER_SENT_EXPIRY = 120
EXPIRY_GRACE = 5
# Per hour (so a slow machine cannot outlast the window) and IP: sign-ups and token requests
# spend exactly this many across both instances.
AUTH_LIMIT = 2 * USERS + 2
# Upper bounds of "in time": a ready upload within a verification lease (60 s) plus the
# longest check interval (30 s) of its file, with slack for a loaded machine; an expired one
# within grace + the expiry job's period (10 s) + a lease of its expiry.
READY_WITHIN = 60 + 30 + 30
EXPIRED_WITHIN = EXPIRY_GRACE + 10 + 60 + 30
SETTLE_TIMEOUT = 240
NOTIFY_SECRET = "system-notify-secret"
METRICS_TOKEN = "system-metrics-token"
# Emulator faults while the load runs: about one call in five fails or is dropped.
FAULTS = (
    {"endpoint": "*", "status": 503, "error_rate": 0.10},
    {"endpoint": "*", "status": 500, "error_rate": 0.05},
    {"endpoint": "*", "drop": True, "error_rate": 0.05},
    {"endpoint": "*", "latency_ms": 150, "error_rate": 0.10},
)
# Emulator endpoints that are not Cloudflare API calls (the clients' file POSTs, delivery).
NOT_API = {"upload_url", "upload_preflight", "delivery", "unknown"}
# The operator's CLI, as compose.yaml's commands call it.
FLASK = ["flask", "--app", "broker"]


@dataclass
class Upload:
    """One upload as its client saw it."""

    n: int
    kind: str  # cooperative | silent | never
    user: int
    id: str = ""
    file_sent_at: datetime | None = None


@dataclass
class Kill:
    """A worker killed while holding leases, and what it held."""

    what: str
    worker: str
    leased: list[Any]


@dataclass
class Run:
    """Everything the assertions look at."""

    uploads: list[Upload]
    rows: dict[str, dict[str, Any]]
    deliveries: list[dict[str, Any]]
    received: list[dict[str, Any]]
    counters: dict[str, int]
    emulator_log: str
    logs: dict[str, str]
    kills: list[Kill]
    web_kill: str
    stops: dict[str, int | None]
    metrics: str
    failed_cli: str
    limited_status: int
    control_status: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    failovers: int = 0
    timeline: list[str] = field(default_factory=list)


def _register(front: Front, session: requests.Session, name: str, password: str) -> None:
    """Sign up on the registration page, as a person would (form, CSRF token, redirect)."""
    page = front.request(session, "GET", "/auth/register")
    assert page.status_code == 200, page.text[:500]
    answer = front.request(
        session,
        "POST",
        "/auth/register",
        data={
            "username": name,
            "password": password,
            "confirm": password,
            "csrf_token": csrf_from(page.text),
        },
        allow_redirects=False,
    )
    assert answer.status_code == 302, answer.text[:2000]
    session.cookies.clear()


def _sign_up(front: Front, name: str, password: str) -> str:
    """Register on the page, then get an API token as an app does; return the token."""
    with requests.Session() as session:
        _register(front, session, name, password)
        answer = front.request(
            session,
            "POST",
            "/api/v1/auth/tokens",
            json={"username": name, "password": password, "device_name": "system"},
        )
    assert answer.status_code == 201, answer.text
    return str(answer.json()["token"])


def _owner_pid(owner: str) -> int:
    """Return the pid in a lease owner (`host:pid:thread`, see broker.worker)."""
    return int(owner.split(":")[1])


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class Client:
    """An app's end user: retries what a real client retries, with the same Idempotency-Key."""

    def __init__(self, front: Front, token: str) -> None:
        self.front = front
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(
        self, session: requests.Session, method: str, path: str, ok: tuple[int, ...], **kw: Any
    ) -> requests.Response:
        """Send until an answer in `ok`; retry outages, 5xx, 409 (key in use) and 429."""
        deadline = time.monotonic() + 200
        headers = {**self.headers, **kw.pop("headers", {})}
        pause = threading.Event()
        while True:
            try:
                response = self.front.request(session, method, path, headers=headers, **kw)
            except requests.ConnectionError:
                response = None
            if response is not None and response.status_code in ok:
                return response
            if response is not None and response.status_code not in (409, 429, 500, 502, 503, 504):
                raise AssertionError(f"{method} {path}: {response.status_code} {response.text}")
            assert time.monotonic() < deadline, f"{method} {path} never succeeded"
            retry_after = response.headers.get("Retry-After") if response is not None else None
            pause.wait(min(float(retry_after or 0.5), 2.0))


def _send_file(session: requests.Session, url: str, n: int) -> None:
    """POST the file to the one-time URL, as a browser would; retry what failed upstream."""
    fmt = "PNG" if n % 2 else "JPEG"
    data = make_image(24 + n % 40, 16 + n % 24, fmt, color=(n % 255, 80, 160))
    pause = threading.Event()
    deadline = time.monotonic() + 60
    tried = False
    while True:
        try:
            response = session.post(
                url, files={"file": (f"photo-{n}.{fmt.lower()}", data)}, timeout=30
            )
        except requests.ConnectionError:
            response = None
        if response is not None and (response.ok or (response.status_code == 409 and tried)):
            return
        if response is not None and response.status_code < 500:
            raise AssertionError(f"file POST {n}: {response.status_code} {response.text}")
        tried = True
        assert time.monotonic() < deadline, f"file of upload {n} never got through"
        pause.wait(0.3)


def _drive(client: Client, upload: Upload, created: list[str], lock: threading.Lock) -> None:
    """Create the upload, send its file (unless 'never'), say complete (if cooperative)."""
    expires_in = NEVER_SENT_EXPIRY if upload.kind == "never" else 1800
    with requests.Session() as session:
        response = client.call(
            session,
            "POST",
            "/api/v1/uploads",
            (201,),
            json={"metadata": {"n": upload.n, "kind": upload.kind}, "expires_in": expires_in},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
        body = response.json()
        upload.id = body["id"]
        with lock:
            created.append(upload.id)
        if upload.kind == "never":
            return
        _send_file(session, body["upload_url"], upload.n)
        upload.file_sent_at = _utcnow()
        if upload.kind == "cooperative":
            client.call(session, "POST", f"/api/v1/uploads/{upload.id}/complete", (200, 202))


def _leases(engine: sa.Engine, table: str) -> dict[str, list[Any]]:
    """Return live leases on `table` by owner."""
    t = sa.table(table, sa.column("id"), sa.column("lease_owner"), sa.column("lease_until"))
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t).where(t.c.lease_owner.is_not(None))).all()
    now = _utcnow()
    held: dict[str, list[Any]] = defaultdict(list)
    for row_id, owner, until in rows:
        if _aware(until) is not None and _aware(until) > now:
            held[owner].append(row_id)
    return held


def _retrying(engine: sa.Engine) -> bool:
    """Tell whether a delivery that failed an attempt still waits for its retry."""
    return bool(
        _rows(engine, "SELECT id FROM webhook_deliveries WHERE status = 'pending' AND attempts > 0")
    )


def _rows(engine: sa.Engine, sql: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(sql))]


@pytest.fixture(scope="module")
def run(
    postgres_url: str, tmp_path_factory: pytest.TempPathFactory, report: Callable[..., None]
) -> Iterator[Run]:
    """Start the topology, drive the load and the faults, wait for every upload and event."""
    require(shutil.which("redis-server") is not None, "needs redis-server (Debian: redis-server)")
    from tests.conftest import _reset_schema

    started = time.monotonic()
    timings: dict[str, float] = {}
    work = tmp_path_factory.mktemp("system")
    commands = compose_commands()
    _reset_schema(postgres_url)
    engine = sa.create_engine(postgres_url, pool_pre_ping=True)
    receiver = Receiver()
    receiver.start()
    web_sockets = [listening_socket(), listening_socket()]
    web_urls = [f"http://127.0.0.1:{s.getsockname()[1]}" for s in web_sockets]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "EMULATOR_"))},
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }
    try:
        with topology(work, env) as topo:
            redis_uri = topo.start_redis(commands["redis"])
            emulator, emu_url = topo.start_emulator(
                commands["emulator"],
                work / "emulator",
                env={
                    # Cloudflare's notification reaches the first web instance (the one that
                    # lives); while the broker is down a notification is simply lost.
                    "EMULATOR_NOTIFY_URL": f"{web_urls[0]}/hooks/cloudflare",
                    "EMULATOR_NOTIFY_SECRET": NOTIFY_SECRET,
                },
            )
            topo.env.update(
                {
                    "BROKER_ENV": "testing",
                    "BROKER_SECRET_KEY": secrets.token_urlsafe(32),
                    "BROKER_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
                    "BROKER_DATABASE_URL": postgres_url,
                    "BROKER_INSTANCE_PATH": str(work / "instance"),
                    "BROKER_LOG_LEVEL": "INFO",
                    "BROKER_RATELIMIT_STORAGE_URI": redis_uri,
                    "BROKER_AUTH_RATE_LIMIT": f"{AUTH_LIMIT} per hour",
                    "BROKER_METRICS_TOKEN": METRICS_TOKEN,
                    **broker_env(emu_url),
                    # This suite counts the global API's calls (list_v2, image_details, …) at
                    # the emulator; the batch API has its own tests (tests/upstream).
                    "BROKER_CLOUDFLARE_BATCH": "off",
                    "BROKER_CLOUDFLARE_WEBHOOK_SECRET": NOTIFY_SECRET,
                    "BROKER_WEBHOOK_ALLOW_PRIVATE": "true",
                    "BROKER_EXPIRY_GRACE": str(EXPIRY_GRACE),
                    "BROKER_MAX_PENDING_UPLOADS": "1000",
                    "BROKER_MAX_UPLOADS_PER_DAY": "1000",
                    "WEB_CONCURRENCY": "1",
                }
            )
            topo.run(commands["setup"], timeout=180)
            # Web instances and workers boot while the operator registers the app's endpoint.
            webs: list[Process] = []
            for sock in web_sockets:
                webs.append(topo.start_web(commands["web"], sock))
            workers = [topo.start("worker", commands["worker"]) for _ in range(3)]
            added = topo.run([*FLASK, "webhooks", "add", receiver.url, "--events", "*"])
            secret = re.search(r"(whsec_\S+)", added)
            assert secret, added
            receiver.set_secret(secret.group(1))
            for web, url in zip(webs, web_urls, strict=True):
                wait_http(f"{url}/readyz", process=web)
            for sock in web_sockets:
                sock.close()  # the web instances hold their own copies
            control_status = {
                web.name: topo.run(
                    [
                        str(BIN / "gunicornc"),
                        "-s",
                        f"/tmp/broker-web-{web.pid}.ctl",
                        "-c",
                        "show workers",
                    ]
                )
                for web in webs
            }
            timings["setup"] = time.monotonic() - started

            # Users sign up on the page and get API tokens the way apps do, spread over both
            # instances; login attempts are counted in Redis, so the one after AUTH_LIMIT of
            # them is refused whichever instance it reaches.
            front = Front(web_urls)
            passwords = {f"user{n}": secrets.token_urlsafe(12) for n in range(USERS)}
            with ThreadPoolExecutor(USERS) as pool:
                tokens = list(
                    pool.map(lambda name: _sign_up(front, name, passwords[name]), passwords)
                )
            with requests.Session() as session:
                for _ in range(AUTH_LIMIT - 2 * USERS):
                    answer = front.request(
                        session,
                        "POST",
                        "/api/v1/auth/tokens",
                        json={
                            "username": "user0",
                            "password": "wrong password",
                            "device_name": "x",
                        },
                    )
                    assert answer.status_code == 401, answer.text
                limited_status = front.request(
                    session,
                    "POST",
                    "/api/v1/auth/tokens",
                    json={"username": "user1", "password": "wrong password", "device_name": "x"},
                ).status_code

            uploads = [
                Upload(
                    n,
                    "never" if n < NEVER_SENT else ("cooperative" if n % 2 else "silent"),
                    n % USERS,
                )
                for n in range(TOTAL)
            ]
            clients = [Client(front, token) for token in tokens]
            requests.post(
                f"{emu_url}/_emulator/counters/reset", json={}, timeout=5
            ).raise_for_status()
            for fault in FAULTS:
                requests.post(f"{emu_url}/_emulator/faults", json=fault, timeout=5)

            created: list[str] = []
            lock = threading.Lock()
            kills: list[Kill] = []
            web_kill = ""
            chaos_error: list[BaseException] = []
            load_started = time.monotonic()
            timeline: list[str] = []

            def mark(what: str) -> None:
                timeline.append(f"{what} +{time.monotonic() - load_started:.0f}s")

            def respawn(dead: Process) -> None:
                workers.remove(dead)
                workers.append(topo.start("worker", commands["worker"]))

            def worker_holding(table: str) -> tuple[Process, list[Any]] | None:
                for owner, ids in _leases(engine, table).items():
                    for worker in workers:
                        if worker.alive() and worker.pid == _owner_pid(owner):
                            return worker, ids
                return None

            def chaos() -> None:
                nonlocal web_kill
                try:
                    wait_for(lambda: len(created) >= 40, 120, "40 uploads created")
                    webs[1].kill9()
                    web_kill = f"{webs[1].name} (pid {webs[1].pid}) after {len(created)} creates"
                    mark("web killed")

                    # A worker in the middle of a delivery: the receiver holds the request.
                    wait_for(lambda: len(receiver.records()) >= 5, 120, "first deliveries")
                    receiver.hold.set()
                    wait_for(receiver.holding.is_set, 60, "a delivery to hold")
                    found = wait_for(
                        lambda: worker_holding("webhook_deliveries"), 10, "a delivery lease"
                    )
                    victim, ids = found
                    victim.kill9()
                    kills.append(Kill("webhook delivery", f"{victim.name} pid {victim.pid}", ids))
                    mark("delivery holder killed")
                    receiver.hold.clear()
                    receiver.released.set()
                    respawn(victim)

                    # A worker in the middle of verifying: Cloudflare answers slowly meanwhile.
                    slow = [
                        requests.post(
                            f"{emu_url}/_emulator/faults",
                            json={"endpoint": name, "latency_ms": 3000, "error_rate": 1.0},
                            timeout=5,
                        ).json()["fault"]["id"]
                        for name in ("list_v2", "image_details", "image_delete")
                    ]
                    victim, ids = wait_for(
                        lambda: worker_holding("uploads"), 90, "a verification lease"
                    )
                    victim.kill9()
                    kills.append(
                        Kill("upload verification", f"{victim.name} pid {victim.pid}", ids)
                    )
                    for fault_id in slow:
                        requests.delete(
                            f"{emu_url}/_emulator/faults/{fault_id}", json={}, timeout=5
                        )
                    respawn(victim)

                    # The receiver is away twice, each time shorter than the first retry (5 s);
                    # the second outage waits until what failed in the first was delivered, so
                    # no delivery fails twice (its next retry would be 5 minutes later).
                    pause = threading.Event()
                    mark("verifier killed")
                    receiver.unavailable = True
                    pause.wait(3)
                    receiver.unavailable = False
                    wait_for(lambda: not _retrying(engine), 60, "retries after the 503s")
                    receiver.stop()
                    pause.wait(3)
                    receiver.start()
                    mark("receiver back")
                except BaseException as exc:  # reported by the main thread
                    chaos_error.append(exc)

            chaos_thread = threading.Thread(target=chaos, name="chaos")
            chaos_thread.start()
            with ThreadPoolExecutor(CLIENT_THREADS) as pool:
                futures = [pool.submit(_drive, clients[u.user], u, created, lock) for u in uploads]
                for future in futures:
                    future.result()
            timings["load"] = time.monotonic() - load_started
            mark("load done")
            chaos_thread.join(180)
            assert not chaos_thread.is_alive(), "the chaos script did not finish"
            if chaos_error:
                raise chaos_error[0]
            requests.delete(f"{emu_url}/_emulator/faults", json={}, timeout=5)

            def settled() -> bool:
                states = _rows(engine, "SELECT status FROM uploads")
                pending = _rows(
                    engine, "SELECT id FROM webhook_deliveries WHERE status <> 'succeeded'"
                )
                # At least: a second upload or event (a duplicate) fails the tests, not the wait.
                return (
                    len(states) >= TOTAL
                    and all(s["status"] != "pending" for s in states)
                    and not pending
                    and len(_rows(engine, "SELECT id FROM webhook_events")) >= TOTAL
                )

            settle_started = time.monotonic()
            wait_for(
                settled,
                SETTLE_TIMEOUT,
                "every upload terminal and every event delivered",
                interval=1.0,
            )
            timings["settle"] = time.monotonic() - settle_started
            mark("settled")

            metrics = requests.get(
                f"{web_urls[0]}/metrics",
                headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
                timeout=10,
            ).text
            failed_cli = topo.run([*FLASK, "webhooks", "deliveries", "--status", "failed"])
            counters = requests.get(f"{emu_url}/_emulator/counters", timeout=5).json()["counters"]
            rows = {
                r["id"]: r
                for r in _rows(
                    engine,
                    "SELECT id, status, expires_at, completed_at, status_changed_at FROM uploads",
                )
            }
            deliveries = _rows(engine, "SELECT id, status, attempts FROM webhook_deliveries")
            # Operators stop the system with SIGTERM: every survivor finishes and exits 0.
            stops = stop_gracefully([*workers, webs[0]], timeout=35)
            emulator.stop(10)
            timings["total"] = time.monotonic() - started
            result = Run(
                uploads=uploads,
                rows=rows,
                deliveries=deliveries,
                received=receiver.records(),
                counters=counters,
                emulator_log=emulator.output(),
                logs={p.name: p.output() for p in topo.processes},
                kills=kills,
                web_kill=web_kill,
                stops=stops,
                metrics=metrics,
                failed_cli=failed_cli,
                limited_status=limited_status,
                control_status=control_status,
                timings=timings,
                failovers=front.failovers,
                timeline=timeline,
            )
    finally:
        receiver.stop()
        engine.dispose()
        for sock in web_sockets:
            sock.close()
    report("system run: the production topology under faults", _table(result))
    yield result


def _table(run: Run) -> list[str]:
    """The figures the run is judged by, one line each."""
    states = Counter(r["status"] for r in run.rows.values())
    ids_per_event = _ids_per_event(run)
    resent = sum(
        n - 1 for n in Counter(r["id"] for r in run.received if r["answer"] == 204).values()
    )
    api = sum(n for name, n in run.counters.items() if name not in NOT_API)
    t = run.timings
    return [
        f"uploads          {len(run.uploads)} by {USERS} users: {COOPERATIVE} cooperative, "
        f"{SILENT} silent, {NEVER_SENT} never sent",
        "terminal states  " + ", ".join(f"{s} {n}" for s, n in sorted(states.items())),
        f"deliveries       {len(ids_per_event)} events to 1 endpoint, {len(run.received)} "
        f"requests received, {sum(1 for r in run.received if not r['verified'])} unverified",
        f"duplicates       {sum(1 for ids in ids_per_event.values() if len(ids) > 1)} events "
        f"with a second webhook-id; {resent} webhook-ids received again (at-least-once)",
        f"upstream calls   {api} API calls ({api / len(run.uploads):.2f} per upload), "
        f"{_count_429(run.emulator_log)} answered 429",
        "lease takeovers  "
        + "; ".join(f"{len(k.leased)} {k.what} leases of {k.worker}" for k in run.kills),
        f"web instance     {run.web_kill} killed; {run.failovers} requests failed over",
        f"time             {t['total']:.0f} s (setup {t['setup']:.0f} s, load {t['load']:.0f} s, "
        f"settle {t['settle']:.0f} s)",
        "timeline         " + ", ".join(run.timeline),
    ]


def _ids_per_event(run: Run) -> dict[tuple[str, str], set[str]]:
    events: dict[tuple[str, str], set[str]] = defaultdict(set)
    for record in run.received:
        if record["verified"]:
            events[(record["type"], record["upload"])].add(record["id"])
    return events


def _count_429(log: str) -> int:
    return len(re.findall(r'HTTP/1\.[01]" 429 ', log))


def test_every_upload_reaches_its_terminal_state_in_time(run: Run) -> None:
    """Cooperative and silent uploads become ready, never-sent ones expired, within bounds."""
    late = []
    for upload in run.uploads:
        row = run.rows[upload.id]
        if upload.kind == "never":
            assert row["status"] == "expired", (upload, row)
            lag = _aware(row["status_changed_at"]) - _aware(row["expires_at"])
            if lag > timedelta(seconds=EXPIRED_WITHIN):
                late.append((upload.n, upload.kind, lag))
        else:
            assert row["status"] == "ready", (upload, row)
            assert upload.file_sent_at is not None
            lag = _aware(row["completed_at"]) - upload.file_sent_at
            if lag > timedelta(seconds=READY_WITHIN):
                late.append((upload.n, upload.kind, lag))
    assert len(run.rows) == TOTAL  # nothing created twice by a retried request
    assert not late, late


def test_each_event_is_delivered_with_one_webhook_id_and_a_valid_signature(run: Run) -> None:
    """Every state change arrives, verified, under exactly one webhook-id."""
    assert all(r["verified"] for r in run.received), [r for r in run.received if not r["verified"]]
    events = _ids_per_event(run)
    expected = {("upload.completed", u.id) for u in run.uploads if u.kind != "never"}
    expected |= {("upload.expired", u.id) for u in run.uploads if u.kind == "never"}
    delivered = {
        key
        for key in events
        if any(r["answer"] == 204 and (r["type"], r["upload"]) == key for r in run.received)
    }
    assert set(events) == expected
    assert delivered == expected
    assert all(len(ids) == 1 for ids in events.values()), {
        k: v for k, v in events.items() if len(v) > 1
    }
    assert all(d["status"] == "succeeded" for d in run.deliveries)
    assert run.failed_cli.strip() == "no deliveries"


def test_the_emulator_never_answered_429(run: Run) -> None:
    """The shared budget kept every process under Cloudflare's rate limit."""
    assert re.search(r'HTTP/1\.[01]" 20[01] ', run.emulator_log), "no access log to read"
    assert _count_429(run.emulator_log) == 0


def test_leases_of_killed_workers_were_taken_over(run: Run) -> None:
    """Work a SIGKILLed worker held was finished by the others once its lease ran out."""
    assert {k.what for k in run.kills} == {"webhook delivery", "upload verification"}
    by_id = {d["id"]: d for d in run.deliveries}
    for kill in run.kills:
        assert kill.leased, kill
        if kill.what == "webhook delivery":
            assert all(by_id[i]["status"] == "succeeded" for i in kill.leased)
        else:
            assert all(run.rows[i]["status"] in ("ready", "expired") for i in kill.leased)


def test_no_traceback_in_any_log(run: Run) -> None:
    """No process logged a crash, not even around the kills and faults."""
    crashed = {name: log for name, log in run.logs.items() if "Traceback" in log}
    assert not crashed, {
        name: log[log.index("Traceback") - 500 :][:3000] for name, log in crashed.items()
    }


def test_operators_view_of_the_run(run: Run) -> None:
    """Metrics show every status (zeros too), Redis shares limits, instances stop cleanly."""
    assert 'broker_uploads{status="ready"} ' + str(COOPERATIVE + SILENT) in run.metrics
    assert f'broker_uploads{{status="expired"}} {NEVER_SENT}' in run.metrics
    assert 'broker_uploads{status="pending"} 0' in run.metrics
    assert f'broker_webhook_deliveries{{status="succeeded"}} {TOTAL}' in run.metrics
    assert 'broker_webhook_deliveries{status="failed"} 0' in run.metrics
    assert run.limited_status == 429  # counted in Redis across both web instances
    assert all(code == 0 for code in run.stops.values()), run.stops
    assert len(run.control_status) == 2 and all(run.control_status.values())

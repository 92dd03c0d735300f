"""Benchmark completion detection and webhook delivery: 1000 uploads through the broker.

    .venv/bin/python tests/bench/bench_completion.py      (or `make bench`)

Real parts over real HTTP — the broker app (its API through the test client, its worker via
`worker.run_once`), the Cloudflare Images emulator, a webhook receiver verifying every delivery
with the `standardwebhooks` library — on simulated time (time-machine): clients create their
upload slots over CREATE_SPAN seconds and send the file 1-20 s later; half of them then call
`/complete`, half stay silent. The worker is driven every TICK simulated seconds.

Prints upstream API calls per completed upload (emulator counters; floor 1.0 = the create call),
p50/p95 time from the file upload to the webhook's arrival for each half, and whether any
300-second window went over the broker's budget or Cloudflare's 1200-call limit. Exits non-zero
when a target is missed: ≤ 1.2 calls per upload, p95 ≤ 2 s cooperative and ≤ 30 s silent.
"""

from __future__ import annotations

import bisect
import os
import random
import sys
import tempfile
import threading
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
import time_machine  # noqa: E402
from standardwebhooks.webhooks import Webhook, WebhookVerificationError  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402
from werkzeug.wrappers import Request, Response  # noqa: E402

N = int(os.environ.get("BENCH_UPLOADS", "1000"))
CREATE_SPAN = float(os.environ.get("BENCH_CREATE_SPAN", "360"))  # seconds over which slots open
SEND_DELAY = (1.0, 20.0)  # seconds between getting the slot and sending the file
TICK = 0.1
TAIL = 90.0  # simulated seconds after the last upload to let everything settle
BUDGET, RESERVE, WINDOW = 1150, 100, 300
CLOUDFLARE_LIMIT = 1200
TARGET_CALLS = 1.2
TARGET_P95_COOPERATIVE = 2.0
TARGET_P95_SILENT = 30.0
T0 = datetime(2030, 3, 1, 9, 0, tzinfo=UTC)


class Receiver:
    """The app's backend: records when each upload's event arrived (simulated clock)."""

    def __init__(self) -> None:
        self.secret = ""
        self.arrivals: dict[str, float] = {}
        self.types: dict[str, str] = {}
        self.bad = 0
        self.duplicates = 0
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):  # type: ignore[no-untyped-def]
        request = Request(environ)
        body = request.get_data()
        try:
            payload = Webhook(self.secret).verify(body, dict(request.headers))
        except WebhookVerificationError:
            with self.lock:
                self.bad += 1
            return Response(status=400)(environ, start_response)
        upload_id = payload["data"]["upload"]["id"]
        with self.lock:
            if upload_id in self.arrivals:
                self.duplicates += 1
            else:
                self.arrivals[upload_id] = time.time()
                self.types[upload_id] = payload["type"]
        return Response(status=204)(environ, start_response)


def percentile(values: list[float], p: float) -> float:
    """Return the p-th percentile (nearest rank)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = round(p / 100 * len(ordered) + 0.5)
    return ordered[min(len(ordered) - 1, max(0, rank - 1))]


def main() -> int:
    """Run the scenario and print the figures; return 1 when a target is missed."""
    import logging

    from flask_migrate import upgrade

    from broker import create_app, worker
    from broker.auth import tokens, users
    from broker.emulator.testing import EmulatorServer, make_image
    from broker.platform.db import db
    from broker.webhooks import endpoints

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    tmp = tempfile.mkdtemp(prefix="bench-completion-")
    receiver = Receiver()
    hook_server = make_server("127.0.0.1", 0, receiver, threaded=True)
    threading.Thread(target=hook_server.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{hook_server.server_port}/hook"
    png = make_image(32, 24)
    rng = random.Random(20301)

    with time_machine.travel(T0, tick=False) as clock, EmulatorServer() as emu:
        # Record every upstream API call the emulator's rate limiter sees (simulated seconds).
        hits: list[float] = []
        refused = [0]
        limiter = emu.emulator.controls.limiter
        original_hit = limiter.hit

        def counting_hit(token: str, now: float) -> int | None:
            hits.append(now)
            answer = original_hit(token, now)
            if answer is not None:
                refused[0] += 1
            return answer

        limiter.hit = counting_hit  # type: ignore[method-assign]
        app = create_app(
            {
                "ENV": "testing",
                "SECRET_KEY": "bench-secret-key-not-for-production",
                "DATABASE_URL": f"sqlite:///{tmp}/bench.sqlite3",
                "INSTANCE_PATH": tmp,
                "LOG_LEVEL": "ERROR",
                "WORKER_INLINE": False,
                "WEBHOOK_ALLOW_PRIVATE": True,
                "MAX_PENDING_UPLOADS": 100000,
                "MAX_UPLOADS_PER_DAY": 100000,
                "UPSTREAM_BUDGET": BUDGET,
                "UPSTREAM_BACKGROUND_RESERVE": RESERVE,
                "UPSTREAM_BUDGET_WINDOW": WINDOW,
                "CLOUDFLARE_API_BASE": emu.api_base,
                "CLOUDFLARE_ACCOUNT_ID": emu.account_id,
                "CLOUDFLARE_API_TOKEN": emu.api_token,
                "CLOUDFLARE_ACCOUNT_HASH": emu.account_hash,
                "CLOUDFLARE_DELIVERY_BASE": emu.url,
                "CLOUDFLARE_UPLOAD_ORIGIN": emu.url,
                # The global budget's figures: the batch API is bench_scale.py's subject.
                "CLOUDFLARE_BATCH": "off",
            }
        )
        with app.app_context():
            upgrade()
            user = users.create_user(db.session, "bench", "bench password long enough")
            db.session.commit()
            auth = {"Authorization": f"Bearer {tokens.issue(db.session, user, 'bench').secret}"}
            _, receiver.secret = endpoints.add_endpoint(db.session, hook_url, ["*"], app.config)
            db.session.commit()
        client = app.test_client()

        # The scenario: (time, kind, client index); sorted so the loop can pop in order.
        events: list[tuple[float, int, str, int]] = []
        for i in range(N):
            created = rng.uniform(0, CREATE_SPAN)
            sent = created + rng.uniform(*SEND_DELAY)
            events.append((created, 0, "create", i))
            events.append((sent, 1, "send", i))
        events.sort()
        queue = deque(events)
        slots: dict[int, dict] = {}
        sent_at: dict[str, float] = {}
        cooperative: dict[str, bool] = {}
        end = max(e[0] for e in events) + TAIL
        started = time.perf_counter()
        t = 0.0
        worker.run_once(app)  # first pass: hourly jobs (key sync) out of the way
        while t <= end:
            clock.move_to(T0 + timedelta(seconds=t))
            while queue and queue[0][0] <= t:
                _, _, kind, i = queue.popleft()
                if kind == "create":
                    resp = client.post("/api/v1/uploads", json={}, headers=auth)
                    if resp.status_code != 201:
                        print(f"create failed: {resp.status_code} {resp.get_data(as_text=True)}")
                        return 1
                    slots[i] = resp.get_json()
                else:
                    slot = slots[i]
                    answer = requests.post(
                        slot["upload_url"], files={"file": ("p.png", png)}, timeout=30
                    )
                    if answer.status_code != 200:
                        print(f"file upload failed: {answer.status_code} {answer.text[:200]}")
                        return 1
                    sent_at[slot["id"]] = time.time()
                    cooperative[slot["id"]] = i % 2 == 0
                    if cooperative[slot["id"]]:
                        client.post(f"/api/v1/uploads/{slot['id']}/complete", headers=auth)
            worker.run_once(app)
            if not queue and len(receiver.arrivals) >= N:
                break
            t = round(t + TICK, 6)
        wall = time.perf_counter() - started
        by_endpoint = {k: v for k, v in sorted(emu.counters().items()) if v}

    api_calls = len(hits)
    completed = sum(1 for k in sent_at if receiver.types.get(k) == "upload.completed")
    latencies = {True: [], False: []}  # type: dict[bool, list[float]]
    missing = 0
    for upload_id, at in sent_at.items():
        arrived = receiver.arrivals.get(upload_id)
        if arrived is None:
            missing += 1
            continue
        latencies[cooperative[upload_id]].append(arrived - at)
    hits.sort()
    worst = max(
        (bisect.bisect_left(hits, h + WINDOW) - idx for idx, h in enumerate(hits)), default=0
    )
    per_upload = api_calls / max(1, completed)
    coop50, coop95 = percentile(latencies[True], 50), percentile(latencies[True], 95)
    silent50, silent95 = percentile(latencies[False], 50), percentile(latencies[False], 95)

    print(f"uploads: {N} created over {CREATE_SPAN:.0f} s (simulated), files sent 1-20 s later")
    print(
        f"completed and delivered: {completed} (missing {missing}, "
        f"duplicates {receiver.duplicates}, bad signatures {receiver.bad})"
    )
    print(
        f"upstream API calls: {api_calls} -> {per_upload:.3f} per completed upload "
        f"(floor 1.000, target <= {TARGET_CALLS})"
    )
    print("requests by emulator endpoint: " + ", ".join(f"{k} {v}" for k, v in by_endpoint.items()))
    print(
        f"cooperative (/complete): p50 {coop50:.2f} s  p95 {coop95:.2f} s "
        f"(target p95 <= {TARGET_P95_COOPERATIVE} s, n={len(latencies[True])})"
    )
    print(
        f"silent:                  p50 {silent50:.2f} s  p95 {silent95:.2f} s "
        f"(target p95 <= {TARGET_P95_SILENT} s, n={len(latencies[False])})"
    )
    print(
        f"busiest 300 s window: {worst} calls (broker budget {BUDGET}, "
        f"Cloudflare {CLOUDFLARE_LIMIT}); emulator 429s: {refused[0]}"
    )
    exceeded = worst > BUDGET or refused[0] > 0
    print(f"budget exceeded: {'YES' if exceeded else 'no'}")
    print(f"wall time: {wall:.1f} s")
    ok = (
        completed == N
        and missing == 0
        and receiver.bad == 0
        and per_upload <= TARGET_CALLS
        and coop95 <= TARGET_P95_COOPERATIVE
        and silent95 <= TARGET_P95_SILENT
        and not exceeded
    )
    print("result:", "all targets met" if ok else "TARGET MISSED")
    hook_server.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

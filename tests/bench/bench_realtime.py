"""Benchmark: completion on real time, real processes (`make bench`; not a test).

The emulator (Cloudflare's notifications off, as until an operator configures them), the broker
under gunicorn with one worker process, and a webhook receiver verifying every delivery with the
`standardwebhooks` library. Clients create an upload, send the file 1-3 s later (1-20 s in part
2), and either call `/complete` (cooperative) or stay silent. Prints, side by side:

1. headroom (defaults, batch API on): cooperative p95 file → `/complete` 200 and file → webhook;
   silent p95 file → webhook;
2. the global budget binding (batch API off, 1000 uploads over 6 minutes; a 1150-call budget as
   in bench_completion.py, since the default 1000 cannot carry 1000 creates in 6 minutes): global
   API calls per completed upload, counted at the emulator, and upstream 429s.

Shorter runs: `--uploads 300 --span 120` (part 2), `--quick 20` (part 1's uploads). The worker
polls every `--poll` seconds (0.2; the default setting is 1 s: add it to the silent figures).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import requests
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.bench_scale import counters, paced, start_broker, start_emulator  # noqa: E402
from tests.bench.bench_uploads import broker_settings, percentile  # noqa: E402

TARGETS = {"coop_200": 0.5, "coop_hook": 1.0, "silent_hook": 5.0, "calls": 1.25}


class Receiver:
    """The app's backend: when each upload's signed event arrived (wall clock)."""

    def __init__(self) -> None:
        self.secret = ""
        self.arrivals: dict[str, float] = {}
        self.types: dict[str, str] = {}
        self.bad = 0
        self.lock = threading.Lock()

    def __call__(self, environ: Any, start_response: Any) -> Any:
        request = Request(environ)
        try:
            payload = Webhook(self.secret).verify(request.get_data(), dict(request.headers))
        except WebhookVerificationError:
            with self.lock:
                self.bad += 1
            return Response(status=400)(environ, start_response)
        upload_id = payload["data"]["upload"]["id"]
        with self.lock:
            self.arrivals.setdefault(upload_id, time.time())
            self.types.setdefault(upload_id, payload["type"])
        return Response(status=204)(environ, start_response)


def prepare(settings: dict[str, Any], hook_url: str) -> tuple[str, str]:
    """Migrate, create a user and a webhook endpoint; return the bearer and the signing secret."""
    import secrets

    from flask_migrate import upgrade

    from broker import create_app
    from broker.auth import tokens, users
    from broker.platform.db import db
    from broker.webhooks import endpoints

    app = create_app(dict(settings))
    with app.app_context():
        upgrade()
        user = users.create_user(db.session, f"rt{secrets.token_hex(4)}", "bench password long")
        db.session.commit()
        bearer = tokens.issue(db.session, user, "bench").secret
        _, signing = endpoints.add_endpoint(db.session, hook_url, ["*"], app.config)
        db.session.commit()
        db.engine.dispose()
        app.extensions["budget"].engine.dispose()
    return bearer, signing


def run(
    tmp: Path, receiver: Receiver, hook_url: str, extra: dict[str, Any], uploads: int,
    span: float, send_delay: tuple[float, float], poll: float, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """Run one scenario; return latencies, counters and outcomes."""
    tmp.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        emulator_url = start_emulator(stack, tmp)
        settings = {
            **broker_settings(tmp, emulator_url, f"sqlite:///{tmp}/broker.sqlite3"),
            "CLOUDFLARE_BATCH_BASE": f"{emulator_url}/batch",
            "WEBHOOK_ALLOW_PRIVATE": True,
            "WORKER_POLL_INTERVAL": poll,
            "UPSTREAM_BUDGET": 1000,
            **extra,
        }
        bearer, receiver.secret = prepare(settings, hook_url)
        [url] = start_broker(stack, tmp, settings, 1, worker=True)
        headers = {"Authorization": f"Bearer {bearer}"}
        time.sleep(2)  # the worker's first pass (the hourly key sync) out of the way
        requests.post(f"{emulator_url}/_emulator/counters/reset", timeout=10)
        rng = random.Random(seed)
        delays = [rng.uniform(*send_delay) for _ in range(uploads)]
        png = _png()
        lock = threading.Lock()
        sent_at: dict[str, float] = {}
        ok_at: dict[str, float] = {}
        cooperative: dict[str, bool] = {}
        failures: dict[str, int] = {}

        def fail(what: str) -> None:
            with lock:
                failures[what] = failures.get(what, 0) + 1

        def client(i: int) -> None:
            with requests.Session() as http:
                r = http.post(f"{url}/api/v1/uploads", json={}, headers=headers, timeout=30)
                if r.status_code != 201:
                    return fail(f"create {r.status_code}")
                body = r.json()
                time.sleep(delays[i])  # the person picks the file
                r = http.post(body["upload_url"], files={"file": ("p.png", png)}, timeout=30)
                if r.status_code != 200:
                    return fail(f"file {r.status_code}")
                sent = time.time()
                coop = i % 2 == 0
                with lock:
                    sent_at[body["id"]] = sent
                    cooperative[body["id"]] = coop
                if not coop:
                    return None
                complete = f"{url}/api/v1/uploads/{body['id']}/complete"
                for _ in range(300):  # as the upload page does: again after Retry-After
                    r = http.post(complete, headers=headers, timeout=30)
                    if r.status_code == 200:
                        with lock:
                            ok_at[body["id"]] = time.time()
                        return None
                    time.sleep(float(r.headers.get("Retry-After", "1")))
                return fail("complete never 200")

        started = time.monotonic()
        paced(uploads / span, span, client, threads=max(32, int(uploads / span * 25)))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(receiver.arrivals) < len(sent_at):
            time.sleep(0.2)
        wall = time.monotonic() - started
        seen = counters(emulator_url)
    coop = [k for k in sent_at if cooperative[k]]
    silent = [k for k in sent_at if not cooperative[k]]

    def waits(keys: list[str], at: dict[str, float]) -> list[float]:
        return [at[k] - sent_at[k] for k in keys if k in at]

    completed = sum(1 for k in sent_at if receiver.types.get(k) == "upload.completed")
    return {
        "sent": len(sent_at),
        "completed": completed,
        "failures": failures,
        "coop_200": waits(coop, ok_at),
        "coop_hook": waits(coop, receiver.arrivals),
        "silent_hook": waits(silent, receiver.arrivals),
        "global": seen.get("global_api", 0),
        "batch": seen.get("batch", 0),
        "throttled": seen.get("throttled", 0),
        "endpoints": seen.get("counters", {}),
        "wall": wall,
    }


def _png() -> bytes:
    from broker.emulator.testing import make_image

    return make_image(32, 24)


def _p(values: list[float], p: float) -> str:
    return f"{percentile(values, p):.2f}" if values else "  -  "


def main() -> int:
    """Run both parts and print them side by side."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", type=int, default=60, help="part 1: uploads (one a second)")
    parser.add_argument("--uploads", type=int, default=1000, help="part 2: uploads")
    parser.add_argument("--span", type=float, default=360, help="part 2: seconds they arrive in")
    parser.add_argument("--poll", type=float, default=0.2, help="the worker's idle poll (s)")
    parser.add_argument("--skip", default="", help="parts to skip, e.g. 2")
    opts = parser.parse_args()
    skip = {p.strip() for p in opts.skip.split(",") if p.strip()}
    receiver = Receiver()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per delivery
    hook = make_server("127.0.0.1", 0, receiver, threaded=True)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{hook.server_port}/hook"
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-realtime-") as name:
        tmp = Path(name)
        if "1" not in skip:
            results["1. headroom, batch on"] = run(
                tmp / "one", receiver, hook_url, {"CLOUDFLARE_BATCH": "auto"},
                opts.quick, float(opts.quick), (1.0, 3.0), opts.poll, 1,
            )  # fmt: skip
        if "2" not in skip:
            receiver.arrivals.clear()
            receiver.types.clear()
            results["2. budget binding, batch off"] = run(
                tmp / "two", receiver, hook_url,
                {"CLOUDFLARE_BATCH": "off", "UPSTREAM_BUDGET": 1150,
                 "UPSTREAM_BACKGROUND_RESERVE": 100, "UPSTREAM_BUDGET_WINDOW": 300},
                opts.uploads, opts.span, (1.0, 20.0), opts.poll, 2,
            )  # fmt: skip
    hook.shutdown()
    print(f"worker poll {opts.poll:g} s; emulator notifications off; p50 / p95 in seconds")
    print(
        f"{'scenario':<30} {'sent':>5} {'done':>5} {'coop file→200':>14} "
        f"{'coop file→hook':>15} {'silent file→hook':>17} {'global/upload':>13} {'429':>4}"
    )
    for label, r in results.items():
        per_upload = r["global"] / max(1, r["completed"])
        print(
            f"{label:<30} {r['sent']:>5} {r['completed']:>5} "
            f"{_p(r['coop_200'], 50):>6} /{_p(r['coop_200'], 95):>6} "
            f"{_p(r['coop_hook'], 50):>7} /{_p(r['coop_hook'], 95):>6} "
            f"{_p(r['silent_hook'], 50):>9} /{_p(r['silent_hook'], 95):>6} "
            f"{per_upload:>13.3f} {r['throttled']:>4}"
        )
        calls = dict(sorted(r["endpoints"].items()))
        print(f"{'':<30} calls by endpoint: {json.dumps(calls)}")
        if r["failures"] or receiver.bad:
            print(f"{'':<30} failures: {json.dumps(r['failures'])}, bad signatures {receiver.bad}")
    print(
        f"targets: coop p95 file→200 ≤ {TARGETS['coop_200']} s, file→hook ≤ "
        f"{TARGETS['coop_hook']} s; silent p95 ≤ {TARGETS['silent_hook']} s (part 1); "
        f"≤ {TARGETS['calls']} global calls per upload, no 429 (part 2)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What an operator watches: the overdue-work gauge of /metrics, the workers' heartbeats and
`flask worker health` (a real worker process), every series explained in the README, the
guide's Prometheus rules (promtool) and its Caddyfile (caddy)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import time_machine
from flask import Flask

from broker import operations, worker
from broker.operations import WorkerHeartbeat
from broker.platform.db import db, utcnow
from broker.uploads.models import Upload
from broker.webhooks.models import WebhookDelivery
from tests.conftest import require
from tests.factories import add_webhook_endpoint, create_user, queue_events, record_upload
from tests.support.guide import GUIDE, block, run
from tests.system.topology import wait_for
from tests.test_worker import _env as worker_env

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "scrape-me-0123456789"


def scrape(app: Flask) -> str:
    """GET /metrics with the scrape token, as Prometheus does."""
    page = app.test_client().get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert page.status_code == 200
    return page.get_data(as_text=True)


def test_overdue_work_is_the_oldest_due_item_of_each_queue(make_app: Callable[..., Flask]) -> None:
    """Nothing due: 0. A completion check due 90 s ago and a delivery due 30 s ago (no worker
    ran them): 90 and 30; items not yet due and finished ones do not count."""
    app = make_app(METRICS_TOKEN=TOKEN, WEBHOOK_ALLOW_PRIVATE=True)
    assert 'broker_work_overdue_seconds{queue="completion"} 0.0' in scrape(app)
    user = create_user(app, "alice")
    overdue = record_upload(app, user.id, "img-overdue", status="pending")
    later = record_upload(app, user.id, "img-later", status="pending")
    done = record_upload(app, user.id, "img-done", status="ready")
    add_webhook_endpoint(app, "http://127.0.0.1:9/hooks")
    queue_events(app, 1)
    now = utcnow()
    with app.app_context():
        for upload_id, due in ((overdue, -90), (later, 60), (done, -900)):
            db.session.get(Upload, upload_id).next_check_at = now + timedelta(seconds=due)  # type: ignore[union-attr]
        db.session.execute(
            sa.update(WebhookDelivery).values(next_attempt_at=now - timedelta(seconds=30))
        )
        db.session.commit()
    with time_machine.travel(now, tick=False):
        text = scrape(app)
    assert 'broker_work_overdue_seconds{queue="completion"} 90.0' in text
    assert 'broker_work_overdue_seconds{queue="webhook_delivery"} 30.0' in text


def test_the_guide_explains_every_series(make_app: Callable[..., Flask]) -> None:
    """Each metric /metrics serves has a row in the operations guide's metrics table."""
    names = re.findall(
        r"^# HELP (\w+) ", scrape(make_app(METRICS_TOKEN=TOKEN, CLOUDFLARE_BATCH="auto")), re.M
    )
    assert len(names) == 18  # every series the broker serves, so a new one needs its row
    guide = GUIDE.read_text()
    missing = [name for name in names if f"| `{name}" not in guide]
    assert missing == []


def test_each_worker_shows_its_heartbeat_age(make_app: Callable[..., Flask]) -> None:
    """Two workers beat; 42 s later one beats again: /metrics gives each worker's age (0 and
    42). A clean stop removes the worker's series; a row a day old is forgotten."""
    app = make_app(METRICS_TOKEN=TOKEN)
    start = utcnow()
    first = worker.Worker(app, worker_id="host-a:11:1")
    second = worker.Worker(app, worker_id="host-b:12:1")
    with time_machine.travel(start, tick=False):
        first.run_once()
        second.run_once()
        assert _ages(scrape(app)) == {"host-a:11:1": 0.0, "host-b:12:1": 0.0}
    with time_machine.travel(start + timedelta(seconds=42), tick=False):
        second.run_once()  # its heartbeat is due again (every 10 s); the first one is stuck
        assert _ages(scrape(app)) == {"host-a:11:1": 42.0, "host-b:12:1": 0.0}
        second.retire()
        assert _ages(scrape(app)) == {"host-a:11:1": 42.0}
    later = start + operations.FORGET_AFTER + timedelta(seconds=60)
    with time_machine.travel(later, tick=False):
        worker.Worker(app, worker_id="host-c:13:1").run_once()
        assert _ages(scrape(app)) == {"host-c:13:1": 0.0}  # host-a's day-old row is gone


def test_a_restarted_process_replaces_its_predecessors_row(make_app: Callable[..., Flask]) -> None:
    """A container restarts its worker with the same host and process id: the new worker's
    first beat drops the old, stale row, so no alert fires for a worker that came back."""
    app = make_app(METRICS_TOKEN=TOKEN)
    start = utcnow()
    with time_machine.travel(start, tick=False):
        worker.Worker(app, worker_id="old").run_once()
        worker.Worker(app, worker_id="sibling").run_once()
    with time_machine.travel(start + timedelta(seconds=400), tick=False):
        worker.Worker(app, worker_id="sibling").run_once()  # alive, same process: kept
        worker.Worker(app, worker_id="new").run_once()
        assert _ages(scrape(app)) == {"new": 0.0, "sibling": 0.0}


def _ages(text: str) -> dict[str, float]:
    found = re.findall(
        r'^broker_worker_heartbeat_age_seconds\{worker="([^"]+)"\} (\S+)$', text, re.M
    )
    return {name: float(age) for name, age in found}


def _health(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "flask", "--app", "broker", "worker", "health"], env=env)


def test_worker_health_follows_a_real_worker(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    """`flask --app broker worker health`, run as compose's healthcheck runs it: 1 before any
    worker ran; 0 once `flask --app broker worker` has started; 1 once that worker was killed
    and its last heartbeat is past BROKER_WORKER_STALE_AFTER; 0 again while a new worker runs
    on the host; after that one's clean stop (its row removed) 1, naming the killed one."""
    app = make_app()
    env = worker_env(app, tmp_path)  # what a reader's `flask worker` runs with
    before = _health(env)
    assert before.returncode == 1 and "has written a heartbeat" in before.stderr, before.stderr
    killed = _run_worker_until(env, tmp_path / "first.log", signal.SIGKILL)
    with app.app_context():  # its row stays; 400 s later by its clock, it is stale
        db.session.execute(
            sa.update(WorkerHeartbeat).values(beat_at=utcnow() - timedelta(seconds=400))
        )
        db.session.commit()
    stale = _health(env)
    said = re.search(rf"worker {killed} is stale: last heartbeat (\d+) s ago", stale.stderr)
    assert stale.returncode == 1 and said, stale.stderr
    assert 400 <= int(said.group(1)) < 460  # 400 s, and the seconds this test took
    stopped = _run_worker_until(env, tmp_path / "second.log", signal.SIGTERM)
    with app.app_context():
        assert set(db.session.scalars(sa.select(WorkerHeartbeat.worker_id))) == {killed}
    assert stopped != killed
    after = _health(env)
    assert after.returncode == 1 and f"worker {killed} is stale" in after.stderr, after.stderr


def test_worker_health_without_its_database_says_so(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    """A database that does not answer: exit 1 with one line naming the error, no traceback."""
    env = {**worker_env(make_app(), tmp_path), "BROKER_DATABASE_URL": "sqlite:////nonexistent/x"}
    done = _health(env)
    assert done.returncode == 1
    assert done.stderr == "Error: cannot read the heartbeats: OperationalError\n", done.stderr


def _run_worker_until(env: dict[str, str], log_path: Path, stop: signal.Signals) -> str:
    """Start `flask --app broker worker`; once it has started, check `worker health` says 0;
    stop the worker with `stop`; return the worker id the health command named."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "broker", "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: proc.poll() is not None or "started" in log_path.read_text(errors="replace"),
            60,
            "the worker's start",
        )
        fresh = _health(env)
        assert fresh.returncode == 0, fresh.stderr + log_path.read_text(errors="replace")
        named = re.fullmatch(r"worker (\S+:\d+:\d+): last heartbeat \d+ s ago\n", fresh.stdout)
        assert named, fresh.stdout
        assert named.group(1).split(":")[1] == str(proc.pid)
    finally:
        proc.send_signal(stop)
        proc.wait(30)
    return named.group(1)


BUDGET = "Over 90 % of the Cloudflare call budget is spent: creates will be refused with 503"
NO_WORKER = (
    "No worker has written a heartbeat for 5 min: nothing completes uploads or sends webhooks"
)
GAVE_UP = "Webhook deliveries gave up in the last 15 min: see flask webhooks deliveries"

# promtool's unit tests: a series as the broker would serve it, the alert it must raise.
RULE_TESTS = f"""
rule_files: [broker-alerts.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'broker_work_overdue_seconds{{queue="completion"}}'
        values: '0 0 200+60x10'
      - series: 'broker_work_overdue_seconds{{queue="webhook_delivery"}}'
        values: '0x12'
      - series: 'broker_webhook_deliveries{{status="failed"}}'
        values: '0 0 0 1 1 1'
      - series: 'broker_upstream_budget_used'
        values: '100 950 950 950 950'
      - series: 'broker_upstream_budget_limit'
        values: '1000x5'
      - series: 'broker_upstream_paused_seconds'
        values: '0 0 290'
      - series: 'broker_upstream_batch_fallback_seconds{{endpoint="list_v2"}}'
        values: '600x40'
      - series: 'up{{job="broker"}}'
        values: '1x12'
      - series: 'broker_worker_heartbeat_age_seconds{{worker="w1:7:1"}}'
        values: '5 5 5 200 320 380 440 500'
      - series: 'broker_worker_heartbeat_age_seconds{{worker="w2:8:1"}}'
        values: '5x7'
    alert_rule_test:
      - eval_time: 1m
        alertname: BrokerCompletionFallingBehind
        exp_alerts: []
      - eval_time: 9m
        alertname: BrokerCompletionFallingBehind
        exp_alerts:
          - exp_labels: {{severity: page, queue: completion}}
            exp_annotations:
              summary: "Completion checks are 620 s overdue: workers down, stuck or too few"
      - eval_time: 9m
        alertname: BrokerWebhookDeliveriesLagging
        exp_alerts: []
      - eval_time: 4m
        alertname: BrokerWebhookDeliveriesFailing
        exp_alerts:
          - exp_labels: {{severity: ticket, status: failed}}
            exp_annotations:
              summary: "{GAVE_UP}"
      - eval_time: 4m
        alertname: BrokerUpstreamBudgetNearlySpent
        exp_alerts:
          - exp_labels: {{severity: ticket}}
            exp_annotations:
              summary: "{BUDGET}"
      - eval_time: 2m
        alertname: BrokerUpstreamRateLimited
        exp_alerts:
          - exp_labels: {{severity: page}}
            exp_annotations:
              summary: "Cloudflare answered 429: every call is paused for 290 s"
      - eval_time: 35m
        alertname: BrokerBatchApiFallback
        exp_alerts:
          - exp_labels: {{severity: ticket, endpoint: list_v2}}
            exp_annotations:
              summary: "list_v2 has used the global API for 30 min: the batch host refuses it"
      - eval_time: 10m
        alertname: BrokerScrapeFailing
        exp_alerts: []
      - eval_time: 4m
        alertname: BrokerWorkerStale
        exp_alerts: []
      - eval_time: 7m
        alertname: BrokerWorkerStale
        exp_alerts:
          - exp_labels: {{severity: ticket, worker: "w1:7:1"}}
            exp_annotations:
              summary: "Worker w1:7:1 has not come round for 500 s: stuck or killed"
      - eval_time: 7m
        alertname: BrokerNoWorker
        exp_alerts: []
      - eval_time: 12m
        alertname: BrokerNoWorker
        exp_alerts: []
  - interval: 1m
    input_series:
      - series: 'up{{job="broker"}}'
        values: '1x10'
      - series: 'broker_webhook_deliveries{{status="failed"}}'
        values: '9 9 9 9 4 4 4 5'
    alert_rule_test:
      - eval_time: 5m
        alertname: BrokerNoWorker
        exp_alerts:
          - exp_labels: {{severity: page}}
            exp_annotations:
              summary: "{NO_WORKER}"
      - eval_time: 5m
        alertname: BrokerWebhookDeliveriesFailing
        exp_alerts: []
      - eval_time: 7m
        alertname: BrokerWebhookDeliveriesFailing
        exp_alerts:
          - exp_labels: {{severity: ticket, status: failed}}
            exp_annotations:
              summary: "{GAVE_UP}"
"""


@pytest.fixture
def promtool() -> str:
    """Debian's promtool (package `prometheus`)."""
    path = shutil.which("promtool")
    require(path is not None, "needs promtool (Debian package prometheus)")
    assert path
    return path


def _files(folder: Path) -> None:
    (folder / "prometheus.yml").write_text(
        block(
            "# prometheus.yml — merge into yours; the token file holds BROKER_METRICS_TOKEN", "yaml"
        )
    )
    (folder / "broker-alerts.yml").write_text(block("# broker-alerts.yml", "yaml"))
    (folder / "broker-metrics-token").write_text("scrape-me-0123456789\n")
    (folder / "rule-tests.yml").write_text(RULE_TESTS)


def _promtool(promtool: str, folder: Path, *args: str) -> str:
    done = run([promtool, *args], cwd=folder)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_promtool_accepts_the_scrape_job_and_the_rules(promtool: str, tmp_path: Path) -> None:
    """`promtool check config` reads the job and, through rule_files, the alert rules."""
    _files(tmp_path)
    out = _promtool(promtool, tmp_path, "check", "config", "prometheus.yml")
    assert "SUCCESS: 9 rules found" in out


def test_each_alert_fires_on_what_it_watches(promtool: str, tmp_path: Path) -> None:
    """`promtool test rules`: completion falling behind, deliveries failing (also while old
    failures are pruned), budget nearly spent, Cloudflare's 429, batch fallback, a stale worker,
    no worker at all — each raises its alert with its summary."""
    _files(tmp_path)
    out = _promtool(promtool, tmp_path, "test", "rules", "rule-tests.yml")
    assert "SUCCESS" in out


def test_caddy_adapts_the_guides_caddyfile(tmp_path: Path) -> None:
    """`caddy adapt` (Debian's caddy) turns it into a config: the two upstreams, the body
    limit, and X-Forwarded-For set to the address Caddy sees."""
    caddy = shutil.which("caddy")
    require(caddy is not None, "needs caddy (Debian package caddy)")
    assert caddy
    path = tmp_path / "Caddyfile"
    path.write_text(block("# /etc/caddy/Caddyfile", "caddy"))
    done = run([caddy, "adapt", "--config", str(path), "--adapter", "caddyfile"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    server = next(iter(config["apps"]["http"]["servers"].values()))
    text = json.dumps(server)
    assert '"broker.example.com"' in text
    assert '"dial": "10.0.0.11:8000"' in text and '"dial": "10.0.0.12:8000"' in text
    assert '"X-Forwarded-For": ["{http.request.remote.host}"]' in text
    assert '"max_size": 1000000' in text

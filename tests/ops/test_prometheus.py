"""The guide's Prometheus scrape job and alert rules: valid for promtool, and they fire."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import require
from tests.ops.guide import block, run

BUDGET = "Over 90 % of the Cloudflare call budget is spent: creates will be refused with 503"
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
    assert "SUCCESS: 7 rules found" in out


def test_each_alert_fires_on_what_it_watches(promtool: str, tmp_path: Path) -> None:
    """`promtool test rules`: completion falling behind, deliveries failing, budget nearly
    spent, Cloudflare's 429, batch fallback — each raises its alert with its summary."""
    _files(tmp_path)
    out = _promtool(promtool, tmp_path, "test", "rules", "rule-tests.yml")
    assert "SUCCESS" in out

"""Liveness and readiness probes."""

from __future__ import annotations

import hmac
import logging

import sqlalchemy as sa
from flask import Blueprint, Response, abort, current_app, jsonify, request

from broker import uploads, webhooks
from broker.budget import get_budget
from broker.db import db

bp = Blueprint("health", __name__)
log = logging.getLogger("broker.health")


@bp.get("/livez")
def livez():  # type: ignore[no-untyped-def]
    """Say the process is up; touches nothing else."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():  # type: ignore[no-untyped-def]
    """Say whether the database answers; 503 with the reason when it does not."""
    try:
        db.session.execute(sa.text("SELECT 1"))
    except Exception as exc:  # any driver error means not ready
        log.warning("readiness check failed: %s", type(exc).__name__)
        db.session.rollback()
        return jsonify({"status": "unavailable", "reason": "database unreachable"}), 503
    return jsonify({"status": "ok", "database": "ok"})


@bp.get("/metrics")
def metrics():  # type: ignore[no-untyped-def]
    """Expose upload, webhook and upstream-budget gauges in Prometheus' text format.

    Off (404) until BROKER_METRICS_TOKEN is set; scrapers send it as a bearer token.
    """
    token = current_app.config.get("METRICS_TOKEN")
    if not token:
        abort(404)
    sent = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(sent.encode(), str(token).encode()):
        return Response("unauthorized\n", 401, {"WWW-Authenticate": 'Bearer realm="metrics"'})
    lines = [
        "# HELP broker_uploads Uploads by status.",
        "# TYPE broker_uploads gauge",
    ]
    counts = uploads.status_counts()
    for status in uploads.STATUSES:
        lines.append(f'broker_uploads{{status="{status}"}} {counts.get(status, 0)}')
    lines += [
        "# HELP broker_webhook_deliveries Outgoing webhook deliveries by status.",
        "# TYPE broker_webhook_deliveries gauge",
    ]
    for status, count in sorted(webhooks.delivery_counts(db.session).items()):
        lines.append(f'broker_webhook_deliveries{{status="{status}"}} {count}')
    budget = get_budget().status()
    lines += [
        "# HELP broker_upstream_budget_used Cloudflare calls counted in the current window.",
        "# TYPE broker_upstream_budget_used gauge",
        f"broker_upstream_budget_used {budget.used}",
        "# HELP broker_upstream_budget_limit Cloudflare calls allowed per window.",
        "# TYPE broker_upstream_budget_limit gauge",
        f"broker_upstream_budget_limit {budget.limit}",
        "# HELP broker_upstream_paused_seconds Seconds left of a pause after Cloudflare's 429.",
        "# TYPE broker_upstream_paused_seconds gauge",
        f"broker_upstream_paused_seconds {budget.paused_for:.1f}",
    ]
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")

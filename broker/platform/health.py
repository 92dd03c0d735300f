"""Liveness and readiness probes."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterable, Mapping

import sqlalchemy as sa
from flask import Blueprint, Flask, Response, abort, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from broker.platform.config import current_settings
from broker.platform.db import Session, db
from broker.platform.extensions import limiter
from broker.platform.routing import needs_no_user

# Each feature's gauges, as functions returning Prometheus text lines (see `register_metrics`).
METRICS_KEY = "broker.metrics"
MetricLines = Callable[[Session], Iterable[str]]

bp = Blueprint("health", __name__)


def register_metrics(app: Flask, collect: MetricLines) -> None:
    """Add a feature's gauges to `/metrics`, after those registered before."""
    app.extensions.setdefault(METRICS_KEY, []).append(collect)


def gauge(
    name: str, description: str, samples: Mapping[str, float] | float, label: str = "status"
) -> list[str]:
    """Render one gauge: a single value, or one sample per value of `label`."""
    lines = [f"# HELP {name} {description}", f"# TYPE {name} gauge"]
    if isinstance(samples, Mapping):
        lines += [f'{name}{{{label}="{key}"}} {value}' for key, value in samples.items()]
    else:
        lines.append(f"{name} {samples}")
    return lines


log = logging.getLogger("broker.health")


@bp.get("/livez")
@needs_no_user
def livez() -> ResponseReturnValue:
    """Say the process is up; touches nothing else."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@needs_no_user
def readyz() -> ResponseReturnValue:
    """Say which dependencies answer: 503 naming the database when it does not; a rate-limit
    storage that does not answer leaves the process ready (it counts on its own meanwhile)."""
    states = {"database": "ok"}
    try:
        db.session.execute(sa.text("SELECT 1"))
    except Exception as exc:  # any driver error means not ready
        log.warning("readiness check failed: %s", type(exc).__name__)
        db.session.rollback()
        states["database"] = "unreachable"
    if not str(current_app.config.get("RATELIMIT_STORAGE_URI") or "memory").startswith("memory"):
        up = limiter.storage.check()
        states["ratelimit_storage"] = "ok" if up else "unreachable: counting in-process"
    if states["database"] != "ok":
        return jsonify({"status": "unavailable", "reason": "database unreachable", **states}), 503
    degraded = any(state != "ok" for state in states.values())
    return jsonify({"status": "degraded" if degraded else "ok", **states})


@bp.get("/metrics")
@needs_no_user
def metrics() -> ResponseReturnValue:
    """Expose the features' gauges (uploads, webhook deliveries, budget) as Prometheus text.

    Off (404) until BROKER_METRICS_TOKEN is set; scrapers send it as a bearer token.
    """
    token = current_settings().metrics_token
    if not token:
        abort(404)
    sent = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(sent.encode(), token.encode()):
        return Response("unauthorized\n", 401, {"WWW-Authenticate": 'Bearer realm="metrics"'})
    lines = [
        line
        for collect in current_app.extensions.get(METRICS_KEY, ())
        for line in collect(db.session)
    ]
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")

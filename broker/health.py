"""Liveness and readiness probes."""

from __future__ import annotations

import logging

import sqlalchemy as sa
from flask import Blueprint, jsonify

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

"""Security review regressions: each test pins a defect that was found and fixed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from flask import Flask

from broker.db import db, utcnow
from broker.models import Upload

PASSWORD = "correct horse battery"


def _ready_upload(app: Flask, user_id: int) -> str:
    """Record a ready, public upload of `user_id` (no upstream call needed to redirect to it)."""
    with app.app_context():
        upload = Upload(
            user_id=user_id,
            image_id="img-security-review",
            status="ready",
            require_signed_urls=False,
            expires_at=utcnow() + timedelta(minutes=30),
        )
        db.session.add(upload)
        db.session.commit()
        return upload.id


# --- 1. the /i/ redirect's session fast path --------------------------------------------------


def test_redirect_fast_path_honours_strong_session_protection_from_config(
    make_app: Callable[..., Flask], make_user: Callable[..., Any], login: Callable[..., Any]
) -> None:
    """SESSION_PROTECTION=strong in the app config: a session replayed from another client is
    refused by the /i/ redirect exactly as flask-login refuses it everywhere else."""
    app = make_app(SESSION_PROTECTION="strong")
    user = make_user()
    client = app.test_client()
    client.environ_base["HTTP_USER_AGENT"] = "victim-browser"
    login(client, "alice", PASSWORD)
    upload_id = _ready_upload(app, user.id)
    assert client.get(f"/i/{upload_id}/thumb").status_code == 302

    stolen = app.test_client()
    stolen.environ_base["HTTP_USER_AGENT"] = "attacker-browser"
    stolen.set_cookie("session", client.get_cookie("session").value)
    assert stolen.get("/api/v1/me").status_code == 401  # flask-login's own verdict
    stolen.set_cookie("session", client.get_cookie("session").value)
    assert stolen.get(f"/i/{upload_id}/thumb").status_code == 401

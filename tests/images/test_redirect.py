"""The `/i/<id>/<variant>` redirect: session and bearer callers, the session fast path following
the login rules (ended sessions, deactivated users, strong session protection)."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
from flask import Flask
from PIL import Image as PILImage

from broker.auth.models import User
from broker.platform.db import db, utcnow
from tests.factories import (
    PASSWORD,
    bearer_header,
    create_user,
    fetch,
    issue_token,
    record_upload,
    upload_image,
)


def test_redirect_endpoint_for_session_and_bearer(broker: Flask, http: requests.Session) -> None:
    user_id = create_user(broker, "alice").id
    auth = issue_token(broker, "alice")
    upload_id = upload_image(broker, user_id, size=(500, 500))
    client = broker.test_client()
    with broker.app_context():
        session_token = db.session.get(User, user_id).session_token
    with client.session_transaction() as session:
        session["_user_id"] = session_token
        session["_fresh"] = True
        session["login_at"] = int(time.time())  # what broker.auth.start_session stamps
    for response in (
        client.get(f"/i/{upload_id}/thumb"),
        broker.test_client().get(f"/i/{upload_id}/thumb", headers=auth),
    ):
        assert response.status_code == 302
        location = response.headers["Location"]
        exp = int(parse_qs(urlsplit(location).query)["exp"][0])
        match = re.fullmatch(r"private, max-age=(\d+)", response.headers["Cache-Control"])
        assert match
        remaining = exp - utcnow().timestamp()
        assert 0 < int(match[1]) < remaining - 60
        assert "Cookie" in response.headers["Vary"]
        served = fetch(http, location)
        assert served.status_code == 200
        assert PILImage.open(io.BytesIO(served.content)).size == (256, 256)


def test_redirect_session_fast_path_follows_the_login_rules(broker: Flask) -> None:
    owner_id = create_user(broker, "alice").id
    owner_auth = issue_token(broker, "alice")
    admin_id = create_user(broker, "root", is_admin=True).id
    upload_id = upload_image(broker, owner_id, size=(100, 100))

    def session_client(user_id: int) -> Any:
        client = broker.test_client()
        with broker.app_context():
            token = db.session.get(User, user_id).session_token
        with client.session_transaction() as session:
            session["_user_id"] = token
            session["login_at"] = int(time.time())
        return client

    owner = session_client(owner_id)
    assert owner.get(f"/i/{upload_id}/thumb").status_code == 302
    assert session_client(admin_id).get(f"/i/{upload_id}/thumb").status_code == 302
    assert owner.get("/i/nope/thumb").status_code == 404
    # An Authorization header is the only credential considered, even beside a good cookie.
    assert owner.get(f"/i/{upload_id}/thumb", headers=bearer_header("brk_wrong")).status_code == 401
    assert owner.get(f"/i/{upload_id}/thumb", headers=owner_auth).status_code == 302
    with broker.app_context():
        user = db.session.get(User, owner_id)
        user.end_sessions()
        db.session.commit()
    assert owner.get(f"/i/{upload_id}/thumb").status_code == 401
    owner = session_client(owner_id)
    with broker.app_context():
        db.session.get(User, owner_id).active = False
        db.session.commit()
    assert owner.get(f"/i/{upload_id}/thumb").status_code == 401


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
    upload_id = record_upload(app, user.id, "img-security-review", private=False)
    assert client.get(f"/i/{upload_id}/thumb").status_code == 302

    stolen = app.test_client()
    stolen.environ_base["HTTP_USER_AGENT"] = "attacker-browser"
    stolen.set_cookie("session", client.get_cookie("session").value)
    assert stolen.get("/api/v1/me").status_code == 401  # flask-login's own verdict
    stolen.set_cookie("session", client.get_cookie("session").value)
    assert stolen.get(f"/i/{upload_id}/thumb").status_code == 401

"""What the tests build, in one place: users and tokens, sessions and their CSRF token, uploads,
webhook endpoints and events, production settings, an app served over real HTTP.

Plain functions taking the app (or client) they work on, so fixtures, helpers and tests of any
package share them; the root conftest wraps the most used ones as fixtures (`make_user`,
`bearer`, `login`, `csrf_headers`). Everything that reaches into the broker's own functions to
set a test up goes through here, so a change of those functions is one change here.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import requests
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.serving import make_server
from werkzeug.test import TestResponse

from broker import create_app
from broker.platform.db import db, utcnow

PASSWORD = "correct horse battery"

# --- settings ---------------------------------------------------------------------------------

# The key every test app encrypts stored secrets with (a fixed Fernet key, for tests only).
TEST_ENCRYPTION_KEY = "dGVzdC1lbmNyeXB0aW9uLWtleS0zMi1ieXRlcyEhISE="


def production_env(database_url: str, instance: str, **extra: str) -> dict[str, str]:
    """Return this process's environment with the BROKER_* of a production web process on
    `database_url`, with real-looking Cloudflare settings (for routes that never call it)."""
    import json
    import os
    import secrets

    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(
        BROKER_ENV="production",
        BROKER_SECRET_KEY=secrets.token_urlsafe(32),
        BROKER_ENCRYPTION_KEYS=json.dumps([TEST_ENCRYPTION_KEY]),
        BROKER_DATABASE_URL=database_url,
        BROKER_INSTANCE_PATH=instance,
        BROKER_CLOUDFLARE_ACCOUNT_ID="a" * 32,
        BROKER_CLOUDFLARE_API_TOKEN="t" * 40,
        BROKER_CLOUDFLARE_ACCOUNT_HASH="h" * 22,
        **extra,
    )
    return env


# The least a production configuration needs; tests add or override what they probe.
PRODUCTION_SETTINGS: dict[str, Any] = {
    "ENV": "production",
    "SECRET_KEY": "s" * 40,
    "ENCRYPTION_KEYS": [TEST_ENCRYPTION_KEY],
    "CLOUDFLARE_ACCOUNT_ID": "a",
    "CLOUDFLARE_API_TOKEN": "t",
    "CLOUDFLARE_ACCOUNT_HASH": "h",
}


def production_settings(**overrides: Any) -> dict[str, Any]:
    """Return the defaults with the production baseline and `overrides`, ready for finalize()."""
    from broker.platform.config import DEFAULTS

    return {**DEFAULTS, **PRODUCTION_SETTINGS, **overrides}


def production_app(instance_path: Any, **overrides: Any) -> Flask:
    """Build a production app on an in-memory SQLite database (for configuration checks)."""
    return create_app(
        {
            **PRODUCTION_SETTINGS,
            "INSTANCE_PATH": str(instance_path),
            "DATABASE_URL": "sqlite://",
            **overrides,
        }
    )


def emulator_config(emulator: Any) -> dict[str, Any]:
    """Return the broker settings that point an app at `emulator`."""
    return {
        "CLOUDFLARE_API_BASE": f"{emulator.url}/client/v4",
        "CLOUDFLARE_ACCOUNT_ID": emulator.account_id,
        "CLOUDFLARE_API_TOKEN": emulator.api_token,
        "CLOUDFLARE_ACCOUNT_HASH": emulator.account_hash,
        "CLOUDFLARE_DELIVERY_BASE": emulator.url,
        "CLOUDFLARE_UPLOAD_ORIGIN": emulator.url,
        "CLOUDFLARE_BATCH_BASE": emulator.batch_base,
        # Most tests count the global API's calls at the emulator; the batch API's own tests
        # (tests/upstream/test_batch.py) turn it on with "auto".
        "CLOUDFLARE_BATCH": "off",
    }


# --- users and tokens -------------------------------------------------------------------------


def create_user(
    app: Flask, username: str = "alice", password: str = PASSWORD, *, is_admin: bool = False
) -> Any:
    """Create and commit a user; return the User DETACHED (expunged, every column loaded).

    Read its attributes freely (id, public_id, username, …); to change it, load it again inside
    an app context: `db.session.get(User, user.id)`. Works with users of any app of the test,
    since every app shares the one database.
    """
    from broker.auth import users

    with app.app_context():
        user = users.create_user(db.session, username, password, is_admin=is_admin)
        db.session.commit()
        db.session.refresh(user)
        db.session.expunge(user)
        return user


def bearer_header(secret: str) -> dict[str, str]:
    """Return the Authorization header carrying a token's secret."""
    return {"Authorization": f"Bearer {secret}"}


def issue_token(app: Flask, user_or_username: Any, name: str = "pytest") -> dict[str, str]:
    """Issue a fresh API token for a user (User or username); return its Authorization header."""
    from broker.auth import tokens, users
    from broker.auth.models import User

    with app.app_context():
        if isinstance(user_or_username, User):
            user = db.session.get(User, user_or_username.id)
        else:
            user = users.find_user(db.session, str(user_or_username))
        assert user is not None, f"no user {user_or_username!r}"
        issued = tokens.issue(db.session, user, name)
        db.session.commit()
        return bearer_header(issued.secret)


# --- browser sessions and CSRF ----------------------------------------------------------------

_CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


def csrf_from(html: str) -> str:
    """Return the CSRF token a page carries in its `<meta name="csrf-token">`."""
    match = _CSRF_META.search(html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def csrf_token(client: FlaskClient) -> str:
    """Return the CSRF token of the client's current (logged-in or anonymous) session."""
    page = client.get("/auth/account")
    if page.status_code != 200:
        page = client.get("/auth/login")
    return csrf_from(page.get_data(as_text=True))


def csrf_headers(client: FlaskClient) -> dict[str, str]:
    """Return `{"X-CSRFToken": …}` for the client's current session."""
    return {"X-CSRFToken": csrf_token(client)}


def log_in(
    client: FlaskClient,
    username: str = "alice",
    password: str = PASSWORD,
    *,
    remember: bool = False,
) -> TestResponse:
    """Log a client in through the real login form; return the login POST's (302) response."""
    page = client.get("/auth/login")
    assert page.status_code == 200, page.status_code
    form = {"username": username, "password": password, "csrf_token": csrf_from(page.text)}
    if remember:
        form["remember"] = "y"
    response = client.post("/auth/login", data=form)
    assert response.status_code == 302, f"login failed: {response.status_code}"
    return response


# --- uploads ----------------------------------------------------------------------------------

UPLOADS = "/api/v1/uploads"


def post_upload(client: FlaskClient, headers: dict[str, str], **body: Any) -> TestResponse:
    """POST /api/v1/uploads with `body`; return the response, whatever it is."""
    return client.post(UPLOADS, json=body, headers=headers)


def create_upload(client: FlaskClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    """Create an upload through the API (201 expected); return its JSON."""
    response = post_upload(client, headers, **body)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def send_file(
    upload: dict[str, Any], fmt: str = "PNG", size: tuple[int, int] = (64, 48)
) -> requests.Response:
    """Send an image to an upload's one-time URL, as the browser or app does (200 expected)."""
    from broker.emulator.testing import make_image

    data = make_image(*size, fmt=fmt)
    response = requests.post(
        upload["upload_url"], files={"file": (f"cat.{fmt.lower()}", data)}, timeout=10
    )
    assert response.status_code == 200, response.text
    return response


def record_upload(
    app: Flask,
    user_id: int,
    image_id: str,
    *,
    status: str = "ready",
    private: bool = True,
    variants: list[str] | None = None,
) -> str:
    """Record an upload row directly (no upstream call); return its id."""
    from broker.uploads.models import Upload

    with app.app_context():
        upload = Upload(
            user_id=user_id,
            image_id=image_id,
            status=status,
            require_signed_urls=private,
            expires_at=utcnow() + timedelta(minutes=30),
            variants=variants,
        )
        db.session.add(upload)
        db.session.commit()
        return upload.id


def upload_image(
    app: Flask,
    user_id: int,
    *,
    private: bool = True,
    size: tuple[int, int] = (2000, 1000),
    status: str = "ready",
    stored_variants: bool = True,
) -> str:
    """Upload a PNG to the app's Cloudflare and record it as the user's upload; return its id."""
    from broker.emulator.testing import make_image
    from broker.upstream.cloudflare import get_client

    with app.app_context():
        image = get_client().upload_image(
            file=make_image(*size, color=(200, 30, 90)), require_signed_urls=private
        )
    return record_upload(
        app,
        user_id,
        image.id,
        status=status,
        private=private,
        variants=image.variants if stored_variants else None,
    )


def later(seconds: float = 2.0) -> datetime:
    """Now plus `seconds`: by default a moment past the completion checks' batching window,
    when due checks are made."""
    return utcnow() + timedelta(seconds=seconds)


def upload_rows(app: Flask) -> list[Any]:
    """Return every Upload row."""
    from broker.uploads.models import Upload

    with app.app_context():
        return list(db.session.scalars(sa.select(Upload)))


def load_upload(app: Flask, upload_id: str) -> Any:
    """Return the Upload row as it is now in the database."""
    from broker.uploads.models import Upload

    with app.app_context():
        return db.session.get(Upload, upload_id)


# --- webhooks ---------------------------------------------------------------------------------


def add_webhook_endpoint(
    app: Flask, url: str, events: Sequence[str] = ("*",), *, now: datetime | None = None
) -> tuple[int, str]:
    """Register a webhook endpoint (behind the app's SSRF rules); return (its id, its secret)."""
    from broker.webhooks import endpoints

    with app.app_context():
        endpoint, secret = endpoints.add_endpoint(db.session, url, events, app.config, now=now)
        db.session.commit()
        return endpoint.id, secret


def webhook_events(app: Flask, event_type: str | None = None) -> list[Any]:
    """Return the outbox's events (of one type, if given)."""
    from broker.webhooks.models import WebhookEvent

    with app.app_context():
        stmt = sa.select(WebhookEvent)
        if event_type:
            stmt = stmt.where(WebhookEvent.type == event_type)
        return list(db.session.scalars(stmt))


def queue_events(app: Flask, count: int, event_type: str = "upload.deleted") -> None:
    """Emit `count` events, one delivery each per subscribed endpoint."""
    from broker.webhooks import outbox

    with app.app_context():
        for n in range(count):
            outbox.emit(db.session, event_type, {"n": n})
        db.session.commit()


# --- images -----------------------------------------------------------------------------------


def mint_url(
    app: Flask, headers: dict[str, str], upload_id: str, variant: str, **params: Any
) -> TestResponse:
    """Ask the API for one delivery URL of an upload; return the response."""
    return app.test_client().get(
        f"/api/v1/images/{upload_id}/url",
        query_string={"variant": variant, **params},
        headers=headers,
    )


def fetch(http: requests.Session, url: str) -> requests.Response:
    """Fetch a delivery URL as a browser would."""
    return http.get(url, timeout=10)


# --- servers ----------------------------------------------------------------------------------


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Serve a WSGI app over real HTTP on a free loopback port (threaded, like gunicorn's
    gthread); yield its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    # shutdown() waits for the serve loop's next poll: the default 0.5 s, paid by every test.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


# An avatar upload profile (one square image, replaced by the next); tests add keys after it.
AVATAR_PROFILE = """
[profiles.avatar]
description = "Your profile picture"
formats = ["jpeg", "png"]
max_width = 512
max_height = 512
aspect_ratio = "1:1"
replace = true
"""

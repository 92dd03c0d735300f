"""The demo account of `make run` (development only): created once, its password printed once."""

from __future__ import annotations

import secrets

from flask import Flask

from broker.auth import users
from broker.platform.db import db

DEMO_USERNAME = "demo"


def ensure_demo_user(app: Flask) -> list[str]:
    """Create the demo account on first run in development; return banner lines."""
    if app.config["ENV"] != "development":
        return []
    if users.find_user(db.session, DEMO_USERNAME) is not None:
        return [
            f"Demo account: {DEMO_USERNAME} (its password was printed when it was created;"
            f" reset with `.venv/bin/flask --app broker users set-password {DEMO_USERNAME}`)"
        ]
    password = "-".join(secrets.token_urlsafe(6) for _ in range(3))
    users.create_user(db.session, DEMO_USERNAME, password)
    db.session.commit()
    return [f"Demo account created: username {DEMO_USERNAME}, password {password} (shown once)"]

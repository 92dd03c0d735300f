"""The demo account of `make run` (development only): created once, its login shown at every start.

The password is kept in the instance folder (readable by its owner only) so that a start that
failed after creating the account, or a closed terminal, never loses it; it is shown again only
while it is still the account's password.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from flask import Flask

from broker.auth import passwords, users
from broker.platform.config import settings_of
from broker.platform.db import db

DEMO_USERNAME = "demo"
PASSWORD_FILE = "demo-password"  # noqa: S105 (a file name)


def _save(path: Path, password: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")


def _login_line(password: str) -> str:
    return f"Demo login: username {DEMO_USERNAME}, password {password}"


def ensure_demo_user(app: Flask) -> list[str]:
    """Create the demo account on first run in development (the caller commits, as `make run`
    does at once); return banner lines with its login."""
    if settings_of(app).env != "development":
        return []
    saved = Path(app.instance_path) / PASSWORD_FILE
    user = users.find_user(db.session, DEMO_USERNAME)
    if user is None:
        password = "-".join(secrets.token_urlsafe(6) for _ in range(3))
        _save(saved, password)  # before the account exists: a crash cannot lose it
        users.create_user(db.session, DEMO_USERNAME, password)
        return [_login_line(password) + " (new account)"]
    stored = saved.read_text().strip() if saved.is_file() else ""
    if stored and passwords.verify_password(user.password_hash, stored):
        return [_login_line(stored)]
    return [
        f"Demo account: {DEMO_USERNAME} (its password was changed; set a new one with"
        f" `.venv/bin/flask --app broker users set-password {DEMO_USERNAME}`)"
    ]

""" "Remember me": a cookie per login, checked against the server, honoured at most 30 days.

Each remembered login gets its own random cookie (`remember_token`); only its SHA-256 is stored,
beside the moment it stops counting, `REMEMBER_MAX` after the login (never extended). Logout,
a password change and deactivation delete every remember token of the user (`User.end_sessions`).
A valid cookie brought by a browser without a live session starts a new session.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

import sqlalchemy as sa
from flask import Flask
from werkzeug.wrappers import Response

from broker.auth.models import RememberToken, User
from broker.platform.db import Session, utcnow
from broker.platform.extensions import REMEMBER_MAX

COOKIE = "remember_token"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def issue(session: Session, user: User, now: datetime | None = None) -> str:
    """Store a new remember token for `user`; return the cookie value (shown only to the
    browser). The user's expired tokens are dropped on the way."""
    now = now or utcnow()
    session.execute(
        sa.delete(RememberToken).where(
            RememberToken.user_id == user.id, RememberToken.expires_at <= now
        )
    )
    secret = secrets.token_urlsafe(32)
    session.add(
        RememberToken(
            user_id=user.id,
            token_hash=_digest(secret),
            created_at=now,
            expires_at=now + REMEMBER_MAX,
        )
    )
    return secret


def find_user(session: Session, secret: str, now: datetime | None = None) -> User | None:
    """Return the active user whose unexpired remember token `secret` is, else None."""
    if not secret or len(secret) > 128:
        return None
    return session.scalar(
        sa.select(User)
        .join(RememberToken, RememberToken.user_id == User.id)
        .where(
            RememberToken.token_hash == _digest(secret),
            RememberToken.expires_at > (now or utcnow()),
            User.active.is_(True),
        )
    )


def forget(session: Session, secret: str) -> None:
    """Delete the remember token `secret` (logging out on one browser)."""
    session.execute(sa.delete(RememberToken).where(RememberToken.token_hash == _digest(secret)))


def set_cookie(response: Response, app: Flask, secret: str) -> None:
    """Give the browser its remember cookie, living exactly as long as the stored token."""
    config = app.config
    response.set_cookie(
        COOKIE,
        secret,
        max_age=int(REMEMBER_MAX.total_seconds()),
        httponly=True,
        secure=bool(config["REMEMBER_COOKIE_SECURE"]),
        samesite=config["REMEMBER_COOKIE_SAMESITE"],
    )


def clear_cookie(response: Response, app: Flask) -> None:
    """Tell the browser to drop its remember cookie."""
    response.delete_cookie(
        COOKIE,
        httponly=True,
        secure=bool(app.config["REMEMBER_COOKIE_SECURE"]),
        samesite=app.config["REMEMBER_COOKIE_SAMESITE"],
    )

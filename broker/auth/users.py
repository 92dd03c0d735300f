"""Accounts: create, authenticate (with rehash), change password, deactivate.

Functions add to the session and leave the commit to the caller (view, CLI command).
"""

from __future__ import annotations

import re
import unicodedata

import sqlalchemy as sa

from broker.auth import passwords, tokens
from broker.auth.models import User
from broker.platform.db import Session, utcnow

USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{2,63}$")
USERNAME_RULES = "3-64 letters, digits, '.', '_' or '-', starting with a letter or digit."


class AccountError(ValueError):
    """An account operation was refused; `field` names the input at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def username_key(username: str) -> str:
    """Return the case-insensitive unique key of a username."""
    return unicodedata.normalize("NFKC", username).casefold()


def find_user(session: Session, username: str) -> User | None:
    """Return the user with this username, ignoring case."""
    return session.scalar(sa.select(User).where(User.username_key == username_key(username)))


def list_users(session: Session) -> list[User]:
    """Return every account, in username order (for operators)."""
    return list(session.scalars(sa.select(User).order_by(User.username_key)))


def check_new_username(session: Session, username: str) -> str:
    """Return the username stripped if a new account may take it; else raise AccountError."""
    username = username.strip()
    if not USERNAME_RE.fullmatch(username):
        raise AccountError("username", USERNAME_RULES)
    if find_user(session, username) is not None:
        raise AccountError("username", "That username is taken.")
    return username


def create_user(
    session: Session,
    username: str,
    password: str,
    *,
    email: str | None = None,
    is_admin: bool = False,
) -> User:
    """Create an account (the caller commits); refuse bad or taken usernames and weak passwords."""
    username = check_new_username(session, username)
    problem = passwords.password_problem(password)
    if problem:
        raise AccountError("password", problem)
    user = User(
        username=username,
        username_key=username_key(username),
        email=(email or "").strip() or None,
        password_hash=passwords.hash_password(password),
        is_admin=is_admin,
    )
    session.add(user)
    session.flush()
    return user


def authenticate(session: Session, username: str, password: str) -> User | None:
    """Return the active user these credentials belong to (rehashing if needed), else None."""
    user = find_user(session, username) if len(username) <= 64 else None
    if len(password) > passwords.MAX_LENGTH:
        return None
    if not passwords.verify_password(user.password_hash if user else None, password):
        return None
    assert user is not None
    if not user.is_active:
        return None
    if passwords.needs_rehash(user.password_hash):
        user.password_hash = passwords.hash_password(password)
    user.last_login_at = utcnow()
    return user


def set_password(session: Session, user: User, password: str) -> None:
    """Set a new password; end every session and revoke every token of the user."""
    problem = passwords.password_problem(password)
    if problem:
        raise AccountError("password", problem)
    user.password_hash = passwords.hash_password(password)
    user.end_sessions()
    tokens.revoke_all(session, user)


def deactivate(session: Session, user: User) -> None:
    """Lock the account out: no login, sessions ended, tokens revoked."""
    user.active = False
    user.end_sessions()
    tokens.revoke_all(session, user)

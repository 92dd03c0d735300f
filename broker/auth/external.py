"""Accounts of the app's own users: one per (issuer, external id), created on first use.

The issuer is whoever vouches for the id: an OpenID Connect issuer (its `iss`) for bearer JWTs,
or a service key's namespace. Such an account has no password (it cannot log in to the broker's
pages) and is otherwise an account like any other: its public id is the `creator` stamped on its
uploads, the upload limits apply to it, and it sees only its own uploads.
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from broker.auth import passwords
from broker.auth.models import User
from broker.platform.db import Session

# OpenID Connect Core caps `sub` at 255 characters; a service key's ids get the same room.
MAX_SUBJECT = 255


def valid_subject(subject: str) -> bool:
    """Tell whether `subject` can be an external id: 1-255 printable characters."""
    return 0 < len(subject) <= MAX_SUBJECT and subject.isprintable() and subject.strip() == subject


def _username_key(issuer: str, subject: str) -> str:
    # The unique key local usernames live in, but with a ':' no local username can contain,
    # so an external account can neither take nor be taken by a registration.
    digest = hashlib.sha256(f"{issuer}\n{subject}".encode()).hexdigest()
    return f"ext:{digest[:40]}"


def find_account(session: Session, issuer: str, subject: str) -> User | None:
    """Return the account of `subject` at `issuer`, or None."""
    return session.scalar(
        sa.select(User).where(User.external_issuer == issuer, User.external_subject == subject)
    )


def account_and_commit(session: Session, issuer: str, subject: str) -> User:
    """Return the account of `subject` at `issuer`, creating and committing it on first use.

    Commits only a creation (its own unit of work, before the view's). Two first requests at
    once both try to insert; the loser's insert hits the unique key and reads the winner's row.
    """
    user = find_account(session, issuer, subject)
    if user is not None:
        return user
    user = User(
        username=subject[:64],
        username_key=_username_key(issuer, subject),
        password_hash=passwords.NO_PASSWORD,
        external_issuer=issuer,
        external_subject=subject,
    )
    session.add(user)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        user = find_account(session, issuer, subject)
        if user is None:
            raise
    return user

"""Accounts of the app's own users: one per (issuer, external id), created on first use.

The issuer is whoever vouches for the id: an OpenID Connect issuer (its `iss`) for bearer JWTs,
or a service key's namespace. Such an account has no password (it cannot log in to the broker's
pages) and is otherwise an account like any other, created by its first write (a read by
someone with no account yet creates none and finds nothing): its public id is the `creator`
stamped on its uploads, the upload limits apply to it, and it sees only its own uploads.
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa

from broker.auth import passwords
from broker.auth.models import User
from broker.platform.db import Session, upsert_insert

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


def reader(issuer: str, subject: str) -> User:
    """An account not stored anywhere, for a read by someone who has none yet: it owns nothing
    (no row has id 0), so lists are empty and every upload is 404, and nothing is written."""
    return User(
        id=0,
        public_id=None,
        username=subject[:64],
        is_admin=False,
        active=True,
        external_issuer=issuer,
        external_subject=subject,
    )


def create_account(session: Session, issuer: str, subject: str) -> User:
    """Create the account of `subject` at `issuer` in the caller's transaction; return it.

    Two first requests at once both try to insert: the insert does nothing on a conflict, so
    the loser's transaction goes on unspoilt and reads the winner's row instead.
    """
    insert = upsert_insert(session.get_bind().dialect.name)
    session.execute(
        insert(User)
        .values(
            username=subject[:64],
            username_key=_username_key(issuer, subject),
            password_hash=passwords.NO_PASSWORD,
            external_issuer=issuer,
            external_subject=subject,
        )
        .on_conflict_do_nothing()
    )
    user = find_account(session, issuer, subject)
    if user is None:  # the conflict was another account's random id: vanishingly rare
        raise RuntimeError("could not create the external account; try again")
    return user

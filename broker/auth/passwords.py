"""Password hashing with Argon2id (argon2-cffi), rehashing when the parameters change.

Production parameters exceed OWASP's Argon2id minimum (m = 19 MiB, t = 2, p = 1). Apps built
with `ENV=testing` use a cheap Argon2id profile so the suite stays fast; tests assert the
production values themselves.

Each check holds 64 MiB while it runs, and anyone can ask for one (any username, from any
address), so at most `BROKER_PASSWORD_HASH_CONCURRENCY` run at once in a process; a check that
cannot start within `SLOT_WAIT` seconds is refused with 503 `server_busy` and `Retry-After`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError
from flask import current_app, has_app_context

from broker.platform.errors import ApiError

# RFC 9106's second recommended option (64 MiB, t=3, p=4): argon2-cffi's default profile.
PRODUCTION = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=4, type=Type.ID)
# Still Argon2id, never used outside ENV=testing.
TESTING = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=Type.ID)

# Verified against when the username does not exist, so a miss costs as much as a hit.
_DUMMY: dict[int, str] = {}

MIN_LENGTH = 12
MAX_LENGTH = 1024
# Stored for accounts without a password (the app's own users, broker.auth.external): not an
# Argon2 hash, so no password ever matches it.
NO_PASSWORD = "!"  # noqa: S105 (a marker, not a secret)


BUSY_CODE = "server_busy"
BUSY_MESSAGE = "Too many sign-ins are being checked right now; try again in a second."
SLOT_WAIT = 1.0
_SLOTS = "broker.password_slots"


@contextmanager
def _hashing_slot() -> Iterator[None]:
    """Hold one of the app's password-hashing slots (503 when none frees up in time)."""
    if not has_app_context():
        yield  # a script hashing outside any app: nothing to share a bound with
        return
    extensions = current_app.extensions
    slots = extensions.get(_SLOTS)
    if slots is None:
        size = int(current_app.config["PASSWORD_HASH_CONCURRENCY"])
        slots = extensions.setdefault(_SLOTS, threading.BoundedSemaphore(max(size, 1)))
    if not slots.acquire(timeout=SLOT_WAIT):
        raise ApiError(503, BUSY_CODE, BUSY_MESSAGE, headers={"Retry-After": "1"})
    try:
        yield
    finally:
        slots.release()


def hasher() -> PasswordHasher:
    """Return the app's password hasher (production parameters unless ENV is testing)."""
    if has_app_context() and current_app.config.get("ENV") == "testing":
        return TESTING
    return PRODUCTION


def hash_password(password: str) -> str:
    """Hash `password` with Argon2id and a fresh salt."""
    with _hashing_slot():
        return hasher().hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Check `password` against a stored hash in constant time; a missing hash still costs time."""
    ph = hasher()
    # The dummy's first hash too: a burst of misses at start must not make one each.
    with _hashing_slot():
        if password_hash is None or password_hash == NO_PASSWORD:
            key = id(ph)
            if key not in _DUMMY:
                _DUMMY[key] = ph.hash("dummy password for timing")
            password_hash = _DUMMY[key]
            password = password + "\x00never matches"
        try:
            return ph.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False


def needs_rehash(password_hash: str) -> bool:
    """Tell whether a stored hash was made with other parameters than the current ones."""
    try:
        return hasher().check_needs_rehash(password_hash)
    except InvalidHashError:
        return True


def password_problem(password: str) -> str | None:
    """Return why `password` is not acceptable (ASVS V2.1 length rules), or None."""
    if len(password) < MIN_LENGTH:
        return f"Use at least {MIN_LENGTH} characters."
    if len(password) > MAX_LENGTH:
        return f"Use at most {MAX_LENGTH} characters."
    return None

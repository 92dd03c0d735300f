"""The account's delivery signing keys: mirrored from Cloudflare, rotated, retired, purged.

Keys live upstream (`GET /v1/keys`) and in the `signing_keys` table, so every broker process can
sign without an upstream call. The newest key that is not retired signs. `rotate_key` creates a
new key upstream and retires the others; a retired key keeps verifying the URLs it signed until
its `delete_after`, when `purge_retired_keys` (run by `sync_keys`, so by the worker) deletes it
upstream and here. Key values are secrets: nothing here logs or returns them.

The functions take the Cloudflare client and `now`, and leave the commit to the caller (the CLI
command or the worker job), as every domain module does.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from flask import Flask, current_app
from sqlalchemy.exc import IntegrityError

from broker.images.models import SigningKey
from broker.images.signing import Signer
from broker.platform.config import current_settings
from broker.platform.db import Session, db, utcnow
from broker.upstream.cloudflare import (
    CloudflareImages,
    CloudflareNotFound,
    Priority,
    SigningKeyValue,
)

log = logging.getLogger("broker.keys")

EXTENSION_KEY = "signing_keys"
# How long a process reuses the signing key it loaded before asking the database again; a key
# rotated by another process is picked up within this time (the old key still verifies).
CACHE_SECONDS = 5.0


def fingerprint(value: str) -> str:
    """Return a short, non-reversible tag of a key value, safe to show and log."""
    return hashlib.sha256(value.encode()).hexdigest()[:12]


def new_key_name(now: datetime) -> str:
    """Return a fresh key name: alphanumeric, ≤ 20 characters, sortable by creation time."""
    return f"k{now:%Y%m%d%H%M%S}{secrets.token_hex(2)}"


@dataclass
class KeySync:
    """What a key sync changed (names only, never values)."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Tell whether anything was added, updated, removed or purged."""
        return bool(self.added or self.updated or self.removed or self.purged)


def _reconcile(
    session: Session, upstream: Sequence[SigningKeyValue], now: datetime, result: KeySync
) -> None:
    """Make the table mirror `upstream` (in its creation order), keeping retirement state."""
    stored = {k.name: k for k in session.scalars(sa.select(SigningKey))}
    seen = set()
    for key in upstream:
        seen.add(key.name)
        row = stored.get(key.name)
        if row is None:
            try:
                # Another process may insert the same key at the same moment: a savepoint keeps
                # the unique violation from spoiling the caller's transaction.
                with session.begin_nested():
                    session.add(SigningKey(name=key.name, value=key.value, created_at=now))
                result.added.append(key.name)
            except IntegrityError:
                continue
        elif row.value != key.value:
            # A key deleted and re-created under the same name (e.g. `default`) is a new key.
            row.value = key.value
            row.created_at = now
            row.retired_at = None
            row.delete_after = None
            result.updated.append(key.name)
    for name, row in stored.items():
        if name not in seen:
            session.delete(row)
            result.removed.append(name)
    session.flush()


def _due(session: Session, now: datetime) -> list[SigningKey]:
    return list(
        session.scalars(
            sa.select(SigningKey).where(SigningKey.delete_after <= now).order_by(SigningKey.id)
        )
    )


def _delete_upstream(client: CloudflareImages, rows: Sequence[SigningKey]) -> list[str]:
    """Delete keys upstream (already-gone ones count as deleted); return their names."""
    for row in rows:
        with contextlib.suppress(CloudflareNotFound):
            client.delete_signing_key(row.name, priority=Priority.BACKGROUND)
        log.info("signing key %s deleted after its grace period", row.name)
    return [row.name for row in rows]


def purge_retired_keys(
    session: Session, client: CloudflareImages, now: datetime | None = None
) -> list[str]:
    """Delete retired keys whose grace period is over, upstream then here; return their names."""
    due = _due(session, now or utcnow())
    purged = _delete_upstream(client, due)
    for row in due:
        session.delete(row)
    session.flush()
    return purged


def sync_keys(session: Session, client: CloudflareImages, now: datetime | None = None) -> KeySync:
    """Purge keys past their grace period, then mirror the upstream key list into the table.

    Every upstream call happens before the first write, so the transaction holds no write
    lock while waiting on Cloudflare (SQLite has a single writer).
    """
    now = now or utcnow()
    due = _due(session, now)
    result = KeySync(purged=_delete_upstream(client, due))
    upstream = client.list_signing_keys(priority=Priority.BACKGROUND)
    for row in due:
        session.delete(row)
    session.flush()
    _reconcile(session, upstream, now, result)
    if result.changed:
        log.info(
            "signing keys synced: added=%s updated=%s removed=%s purged=%s",
            result.added,
            result.updated,
            result.removed,
            result.purged,
        )
    invalidate_cache()
    return result


def rotate_key(
    session: Session,
    client: CloudflareImages,
    now: datetime | None = None,
    grace: float | None = None,
) -> SigningKey:
    """Create a new key upstream and sign with it from now on; retire the others for `grace`
    seconds (default `BROKER_KEY_ROTATION_GRACE`), after which they are deleted."""
    now = now or utcnow()
    if grace is None:
        grace = current_settings().key_rotation_grace
    name = new_key_name(now)
    keys = client.create_signing_key(name)
    result = KeySync()
    _reconcile(session, keys, now, result)
    new = session.scalars(sa.select(SigningKey).where(SigningKey.name == name)).one()
    for row in session.scalars(
        sa.select(SigningKey).where(SigningKey.retired_at.is_(None), SigningKey.id != new.id)
    ):
        row.retired_at = now
        row.delete_after = now + timedelta(seconds=grace)
    session.flush()
    log.info("signing key rotated: %s signs now, old keys deleted after %ss", name, grace)
    invalidate_cache()
    return new


def active_key(session: Session) -> SigningKey | None:
    """Return the key that signs new URLs: the newest one not retired (else the newest one)."""
    return session.scalars(
        sa.select(SigningKey)
        .order_by(
            SigningKey.retired_at.is_not(None),
            SigningKey.created_at.desc(),
            SigningKey.id.desc(),
        )
        .limit(1)
    ).first()


def list_keys(session: Session) -> list[SigningKey]:
    """Return every stored key, the signing one first."""
    return list(
        session.scalars(
            sa.select(SigningKey).order_by(
                SigningKey.retired_at.is_not(None),
                SigningKey.created_at.desc(),
                SigningKey.id.desc(),
            )
        )
    )


class KeyCache:
    """The signing key of one app, loaded from the database at most every CACHE_SECONDS."""

    def __init__(self, ttl: float = CACHE_SECONDS) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._signer: Signer | None = None
        self._ident: tuple[str, str] | None = None
        self._loaded = -float("inf")

    def get(self) -> Signer | None:
        """Return the current signer (None when no key is stored)."""
        if time.monotonic() - self._loaded < self.ttl:
            return self._signer
        with self._lock:
            if time.monotonic() - self._loaded >= self.ttl:
                # A process-wide cache, read from whichever request finds it stale.
                row = active_key(db.session)
                ident = (row.name, row.value) if row is not None else None
                if ident != self._ident:
                    self._signer = Signer(*ident) if ident is not None else None
                    self._ident = ident
                self._loaded = time.monotonic()
        return self._signer

    def invalidate(self) -> None:
        """Forget the loaded key so the next `get` reads the database."""
        self._loaded = -float("inf")


def init_app(app: Flask) -> None:
    """Give the app its signing key cache."""
    app.extensions[EXTENSION_KEY] = KeyCache()


def current_signer() -> Signer | None:
    """Return the current app's signer for new URLs (cached; None when no key is stored)."""
    cache: KeyCache = current_app.extensions[EXTENSION_KEY]
    return cache.get()


def invalidate_cache() -> None:
    """Make this app re-read the signing key (after a sync or rotation in this process)."""
    cache = current_app.extensions.get(EXTENSION_KEY)
    if cache is not None:
        cache.invalidate()

"""Encryption at rest for the secrets the broker must read back: webhook endpoint secrets and
signing-key values (HMAC needs the raw value, so they cannot be hashed like passwords and API
tokens).

A column declared `EncryptedText` is encrypted on write and decrypted on read with the app's
`Keyring`: Fernet (AES-128-CBC + HMAC-SHA256, an authenticated cipher) under the keys of
`BROKER_ENCRYPTION_KEYS`, newest first — the newest encrypts, every key decrypts, so a key can be
rotated: put a new key first, run `flask encryption reencrypt`, then drop the old key. The keys
are separate from `BROKER_SECRET_KEY`: a leaked session key does not open the database, nor a
database dump the secrets.

Outside production a missing key is generated once into `instance/dev-encryption.key` (like
`make run`'s emulator settings), so `make run`, `flask` commands and migrations agree on it;
production refuses to start without `BROKER_ENCRYPTION_KEYS`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from flask import Flask, current_app

from broker.platform.config import settings_of

EXTENSION_KEY = "encryption"
DEV_KEY_FILE = "dev-encryption.key"


class EncryptionError(Exception):
    """A stored secret cannot be decrypted with any key of BROKER_ENCRYPTION_KEYS."""


def generate_key() -> str:
    """Return a fresh key for BROKER_ENCRYPTION_KEYS."""
    return Fernet.generate_key().decode()


class Keyring:
    """The app's keys: the first encrypts, any decrypts."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self._fernet = MultiFernet([Fernet(k) for k in keys])

    def encrypt(self, plain: str) -> str:
        """Return `plain` encrypted under the newest key (a url-safe ASCII token)."""
        return self._fernet.encrypt(plain.encode()).decode()

    def decrypt(self, token: str) -> str:
        """Return the plain text of `token` (EncryptionError when no key opens it)."""
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise EncryptionError(
                "a stored secret cannot be decrypted with any key in BROKER_ENCRYPTION_KEYS"
            ) from None

    def rotate(self, token: str) -> str:
        """Return `token` re-encrypted under the newest key."""
        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken:
            raise EncryptionError(
                "a stored secret cannot be decrypted with any key in BROKER_ENCRYPTION_KEYS"
            ) from None


def current_keyring() -> Keyring:
    """Return the keyring of the current app."""
    keyring: Keyring = current_app.extensions[EXTENSION_KEY]
    return keyring


class EncryptedText(sa.types.TypeDecorator[str]):
    """A text column stored encrypted with the current app's keyring, read back decrypted."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: sa.Dialect) -> str | None:
        """Encrypt on the way into the database."""
        return None if value is None else current_keyring().encrypt(value)

    def process_result_value(self, value: str | None, dialect: sa.Dialect) -> str | None:
        """Decrypt on the way out."""
        return None if value is None else current_keyring().decrypt(value)


def encrypted_columns(metadata: sa.MetaData) -> list[tuple[sa.Table, sa.Column[Any]]]:
    """Return every (table, column) of `metadata` declared `EncryptedText`."""
    return [
        (table, column)
        for table in metadata.sorted_tables
        for column in table.columns
        if isinstance(column.type, EncryptedText)
    ]


def _stored_tokens(
    connection: sa.Connection, metadata: sa.MetaData
) -> Iterator[tuple[sa.TableClause, sa.ColumnClause[Any], str, Any, str]]:
    """Yield (table, its key column, column name, key, stored token) of every encrypted value
    (through untyped columns: the stored tokens, never the plain text)."""
    for table, column in encrypted_columns(metadata):
        (pk,) = table.primary_key.columns
        raw = sa.table(table.name, sa.column(pk.name), sa.column(column.name))
        rows = connection.execute(
            sa.select(raw.c[pk.name], raw.c[column.name]).where(raw.c[column.name].is_not(None))
        ).all()
        for ident, token in rows:
            yield raw, raw.c[pk.name], column.name, ident, token


def check(connection: sa.Connection, metadata: sa.MetaData, keyring: Keyring) -> tuple[int, int]:
    """Try to decrypt every stored value; return (how many opened, how many did not)."""
    opened = failed = 0
    for *_where, token in _stored_tokens(connection, metadata):
        try:
            keyring.decrypt(token)
        except EncryptionError:
            failed += 1
        else:
            opened += 1
    return opened, failed


def reencrypt(connection: sa.Connection, metadata: sa.MetaData, keyring: Keyring) -> int:
    """Re-encrypt every encrypted value under the newest key; return how many were rewritten.

    Works on the stored tokens (never the plain text) through untyped columns, in the caller's
    transaction.
    """
    count = 0
    for raw, key, column, ident, token in list(_stored_tokens(connection, metadata)):
        connection.execute(
            sa.update(raw).where(key == ident).values({column: keyring.rotate(token)})
        )
        count += 1
    return count


def _dev_key(instance_path: str) -> str:
    """Read the development key from the instance folder, creating it on first use."""
    path = Path(instance_path) / DEV_KEY_FILE
    if not path.exists():
        # Write aside, then link into place: concurrent first starts agree on one key.
        fd, tmp = tempfile.mkstemp(dir=instance_path, prefix=".dev-key-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(generate_key() + "\n")
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    return path.read_text().strip()


def init_app(app: Flask) -> None:
    """Give the app its keyring (config.finalize has refused production without keys)."""
    # config.finalize has refused keys that are not Fernet keys.
    keys = list(settings_of(app).encryption_keys) or [_dev_key(app.instance_path)]
    app.extensions[EXTENSION_KEY] = Keyring(keys)

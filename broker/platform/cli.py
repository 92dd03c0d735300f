"""`flask encryption …`: make keys for BROKER_ENCRYPTION_KEYS, re-encrypt under the newest."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from broker.platform import encryption
from broker.platform.db import db

encryption_cli = AppGroup("encryption", help="Keys that encrypt stored secrets.")


@encryption_cli.command("generate-key")
def generate_key_command() -> None:
    """Print a new key to put first in BROKER_ENCRYPTION_KEYS."""
    click.echo(encryption.generate_key())


@encryption_cli.command("check")
def check_command() -> None:
    """Decrypt every stored secret with BROKER_ENCRYPTION_KEYS (read only): after a restore."""
    with db.engine.connect() as connection:
        opened, failed = encryption.check(connection, db.metadata, encryption.current_keyring())
    if failed:
        raise click.ClickException(
            f"{failed} stored secret(s) cannot be decrypted with BROKER_ENCRYPTION_KEYS "
            f"({opened} can): restore the keys that were in use when the backup was taken"
        )
    click.echo(f"all {opened} stored secret(s) decrypt")


@encryption_cli.command("reencrypt")
def reencrypt_command() -> None:
    """Re-encrypt every stored secret under the newest key (then older keys can be dropped)."""
    with db.engine.begin() as connection:
        count = encryption.reencrypt(connection, db.metadata, encryption.current_keyring())
    click.echo(f"re-encrypted {count} value(s) under the newest key")

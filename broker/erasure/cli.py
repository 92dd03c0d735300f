"""`flask users erase`: erase an account from the shell (the worker deletes its images)."""

from __future__ import annotations

import click

from broker.auth.cli import _find_account, _issuer_option, users_cli
from broker.erasure import erase
from broker.platform.db import db


@users_cli.command("erase")
@click.argument("who")
@_issuer_option
def erase_command(who: str, issuer: str | None) -> None:
    """Erase an account (by username, public id, or --issuer and external id): locked out at
    once, personal fields removed, every image deleted at Cloudflare by the worker."""
    from broker.auth import external

    user = None
    if issuer is not None:
        user = external.find_account(db.session, issuer, who) or erase.find_erased(
            db.session, issuer, who
        )
        if user is None:
            raise click.ClickException(f"no account for {who!r} in namespace {issuer!r}")
    else:
        user = _find_account(who, None)
    erasure, created = erase.request_erasure(db.session, user)
    db.session.commit()
    state = "queued" if created else f"already asked ({erasure.status.value})"
    click.echo(
        f"Erasure of {erasure.public_id} {state}; {erasure.images_deleted} image(s) deleted so far."
    )

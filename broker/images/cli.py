"""`flask keys sync|rotate|list` and `flask variants sync|list`: signing keys and variants."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from broker.audit import log as audit
from broker.images import keys, variants
from broker.platform.db import db
from broker.platform.text import table, utc_minute
from broker.upstream.cloudflare import UpstreamError, get_client

keys_cli = AppGroup("keys", help="Delivery URL signing keys (values are never shown).")
variants_cli = AppGroup("variants", help="The image variants the app declares.")


def _upstream_failed(exc: UpstreamError) -> click.ClickException:
    return click.ClickException(f"Cloudflare call failed: {exc}")


@keys_cli.command("sync")
def keys_sync() -> None:
    """Mirror the account's signing keys and delete retired keys past their grace period."""
    try:
        result = keys.sync_keys(db.session, get_client())
    except UpstreamError as exc:
        db.session.rollback()
        raise _upstream_failed(exc) from None
    audit.record(
        db.session,
        "signing_keys.synced",
        None,
        after={
            "added": result.added,
            "updated": result.updated,
            "removed": result.removed,
            "purged": result.purged,
        },
    )
    db.session.commit()
    click.echo(
        f"added {len(result.added)}, updated {len(result.updated)}, "
        f"removed {len(result.removed)}, purged {len(result.purged)}"
    )


@keys_cli.command("rotate")
@click.option(
    "--grace",
    type=click.IntRange(min=0),
    default=None,
    help="Seconds to keep the old keys (default BROKER_KEY_ROTATION_GRACE).",
)
def keys_rotate(grace: int | None) -> None:
    """Create a new signing key, sign with it from now on, retire the old ones."""
    try:
        new = keys.rotate_key(db.session, get_client(), grace=grace)
    except UpstreamError as exc:
        db.session.rollback()
        raise _upstream_failed(exc) from None
    audit.record(
        db.session,
        "signing_key.rotated",
        new.name,
        after={"signing": new.name, "fingerprint": keys.fingerprint(new.value), "grace": grace},
    )
    db.session.commit()
    click.echo(f"signing with {new.name} (fingerprint {keys.fingerprint(new.value)})")


@keys_cli.command("list")
def keys_list() -> None:
    """Show the stored keys: name, fingerprint, state and dates in UTC (never the value)."""
    rows = keys.list_keys(db.session)
    if not rows:
        click.echo("no signing keys stored; run `flask keys sync`")
        return
    states = ["signing" if i == 0 else "standby" for i in range(len(rows))]
    lines = table(
        ("NAME", "FINGERPRINT", "STATE", "ADDED", "RETIRED", "DELETED AFTER"),
        [
            (
                row.name,
                keys.fingerprint(row.value),
                "retired" if row.retired_at is not None else state,
                utc_minute(row.created_at),
                utc_minute(row.retired_at),
                utc_minute(row.delete_after),
            )
            for row, state in zip(rows, states, strict=True)
        ],
    )
    click.echo("\n".join(lines))


@variants_cli.command("sync")
def variants_sync() -> None:
    """Create or update the declared variants (BROKER_VARIANTS) upstream."""
    try:
        done = variants.sync_variants(get_client(), variants.declared_variants())
    except UpstreamError as exc:
        raise _upstream_failed(exc) from None
    audit.record(
        db.session, "variants.synced", None, after={item.name: item.action for item in done}
    )
    db.session.commit()
    for item in done:
        click.echo(f"{item.name:<20} {item.action}")


@variants_cli.command("list")
@click.option("--upstream", is_flag=True, help="Ask Cloudflare instead of reading the settings.")
def variants_list(upstream: bool) -> None:
    """Show the declared variants (or, with --upstream, the account's)."""
    if upstream:
        try:
            found = variants.list_upstream(get_client())
        except UpstreamError as exc:
            raise _upstream_failed(exc) from None
        for v in found:
            never = "  never-signed" if v.never_require_signed_urls else ""
            click.echo(f"{v.id:<20} {v.width}x{v.height} {v.fit} metadata={v.metadata}{never}")
        return
    for d in variants.declared_variants():
        never = "  never-signed" if d.never_signed else ""
        click.echo(f"{d.name:<20} {d.width}x{d.height} {d.fit} metadata={d.metadata}{never}")

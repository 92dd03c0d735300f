"""`flask reconcile` and `flask usage`: agreement with Cloudflare, from the shell."""

from __future__ import annotations

import click
from flask.cli import with_appcontext

from broker.audit import log as audit
from broker.platform.config import current_settings
from broker.platform.db import db
from broker.reconcile import run, usage
from broker.reconcile.models import REPORT_COUNTS
from broker.upstream.cloudflare import UpstreamError, get_client


@click.command("reconcile")
@click.option("--dry-run", is_flag=True, help="Report what disagrees; change nothing.")
@click.option(
    "--per-page",
    type=click.IntRange(10, 10000),
    default=1000,
    show_default=True,
    help="Images per listing page.",
)
@with_appcontext
def reconcile_command(dry_run: bool, per_page: int) -> None:
    """Compare Cloudflare's listing with the database and bring them into agreement."""
    report = run.reconcile(
        db.session,
        get_client(),
        current_settings(),
        dry_run=dry_run,
        per_page=per_page,
        actor=audit.current_actor(),
    )
    head = "dry run (nothing changed)" if dry_run else "reconciled"
    counts = "  ".join(f"{name}={getattr(report, name)}" for name in REPORT_COUNTS)
    click.echo(f"{head}  {counts}")
    if report.problem:
        raise click.ClickException(f"incomplete: {report.problem}; run it again later")


@click.command("usage")
@with_appcontext
def usage_command() -> None:
    """Ask Cloudflare for the account's image count and allowance; show the top users."""
    settings = current_settings()
    try:
        row = usage.refresh(db.session, get_client(), warn_ratio=settings.usage_warn_ratio)
    except UpstreamError as exc:
        db.session.rollback()
        raise click.ClickException(f"Cloudflare call failed: {exc}") from None
    db.session.commit()
    click.echo(f"images: {row.current} of {row.allowed} allowed")
    if usage.near_allowance(row, settings.usage_warn_ratio):
        click.echo("warning: the account is close to its image allowance", err=True)
    for name, public_id, count in usage.per_user(db.session):
        click.echo(f"{count:>8}  {public_id}  {name}")

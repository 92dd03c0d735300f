"""`flask audit`: read the audit log from the shell."""

from __future__ import annotations

import json

import click
from flask.cli import with_appcontext

from broker.audit import log
from broker.platform.db import db
from broker.platform.text import table, utc_minute


@click.command("audit")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--action", default=None, help="Only this action (e.g. user.deactivated).")
@click.option("--target", default=None, help="Only this target (a public id, a key's name).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line, with before/after.")
@with_appcontext
def audit_command(limit: int, action: str | None, target: str | None, as_json: bool) -> None:
    """Show administrative actions, newest first: when, who, what, on what."""
    rows = log.recent(db.session, limit=limit, action=action, target=target)
    if as_json:
        for row in rows:
            fields = {
                "id": row.id,
                "at": row.at.isoformat().replace("+00:00", "Z"),
                "actor": row.actor,
                "action": row.action,
                "target": row.target,
                "request_id": row.request_id,
                "before": row.before,
                "after": row.after,
            }
            click.echo(json.dumps(fields, sort_keys=True))
        return
    if not rows:
        click.echo("no audit entries")
        return
    lines = table(
        ("ID", "AT", "ACTOR", "ACTION", "TARGET", "REQUEST"),
        [
            (
                str(row.id),
                utc_minute(row.at),
                row.actor,
                row.action,
                row.target or "-",
                row.request_id or "-",
            )
            for row in rows
        ],
    )
    click.echo("\n".join(lines))

"""`flask webhooks …`: register endpoints, rotate secrets, inspect and redeliver deliveries."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import with_appcontext

from broker.audit import log as audit
from broker.platform.db import db
from broker.webhooks import endpoints, outbox, ssrf
from broker.webhooks.models import DELIVERY_STATUSES, WebhookDelivery, WebhookEndpoint


def _endpoint(public_id: str) -> WebhookEndpoint:
    e = endpoints.find_endpoint(db.session, public_id)
    if e is None:
        raise click.ClickException(f"no webhook endpoint {public_id}")
    return e


def _set_active(endpoint_id: str, active: bool, reason: str | None) -> None:
    e = _endpoint(endpoint_id)
    before = audit.snapshot(e, endpoints.AUDITED)
    endpoints.set_active(e, active, reason)
    action = "webhook_endpoint.enabled" if active else "webhook_endpoint.disabled"
    audit.changed(db.session, action, e.public_id, before, e)
    db.session.commit()


@click.group("webhooks")
def webhooks_cli() -> None:
    """Manage outgoing webhook endpoints and deliveries."""


@webhooks_cli.command("add")
@click.argument("url")
@click.option(
    "--events",
    "events",
    multiple=True,
    required=True,
    help="Event types (repeat or comma-separate), or '*': " + ", ".join(outbox.EVENT_TYPES),
)
@click.option("--description", default="", help="A note for admins.")
@with_appcontext
def add_command(url: str, events: tuple[str, ...], description: str) -> None:
    """Register URL for events; prints its signing secret once."""
    try:
        endpoint, secret = endpoints.add_endpoint(
            db.session, url, events, current_app.config, description=description
        )
    except (ssrf.BlockedAddress, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    db.session.flush()
    audit.record(
        db.session,
        "webhook_endpoint.created",
        endpoint.public_id,
        after=audit.snapshot(endpoint, endpoints.AUDITED),
    )
    db.session.commit()
    click.echo(f"endpoint {endpoint.public_id} {endpoint.url} events={endpoint.events}")
    click.echo(f"secret (shown once, store it now): {secret}")


@webhooks_cli.command("list")
@with_appcontext
def list_command() -> None:
    """List endpoints with their state."""
    for e in endpoints.list_endpoints(db.session):
        state = "active" if e.active else f"disabled ({e.disabled_reason})"
        click.echo(f"{e.public_id}  {state}  events={e.events}  {e.url}")


@webhooks_cli.command("rotate-secret")
@click.argument("endpoint_id")
@click.option("--window", default=86400, show_default=True, help="Seconds the old secret signs.")
@with_appcontext
def rotate_command(endpoint_id: str, window: int) -> None:
    """Give an endpoint a new secret (printed once); the old one signs during the window."""
    e = _endpoint(endpoint_id)
    before = audit.snapshot(e, endpoints.AUDITED)
    secret = endpoints.rotate_secret(e, window=window)
    audit.changed(db.session, "webhook_endpoint.secret_rotated", e.public_id, before, e)
    db.session.commit()
    click.echo(f"new secret (shown once): {secret}")
    click.echo(f"previous secret keeps signing until {e.previous_secret_until:%Y-%m-%d %H:%M:%SZ}")


@webhooks_cli.command("disable")
@click.argument("endpoint_id")
@with_appcontext
def disable_command(endpoint_id: str) -> None:
    """Stop delivering to an endpoint (its pending deliveries wait)."""
    _set_active(endpoint_id, False, "disabled by an admin")
    click.echo(f"disabled {endpoint_id}")


@webhooks_cli.command("enable")
@click.argument("endpoint_id")
@with_appcontext
def enable_command(endpoint_id: str) -> None:
    """Resume delivering to an endpoint."""
    _set_active(endpoint_id, True, None)
    click.echo(f"enabled {endpoint_id}")


@webhooks_cli.command("deliveries")
@click.option("--endpoint", "endpoint_id", default=None, help="Only this endpoint.")
@click.option("--status", type=click.Choice(DELIVERY_STATUSES), default=None)
@click.option("--limit", default=50, show_default=True)
@click.option("--attempts", is_flag=True, help="Show every attempt.")
@with_appcontext
def deliveries_command(
    endpoint_id: str | None, status: str | None, limit: int, attempts: bool
) -> None:
    """List deliveries, newest first."""
    endpoint = _endpoint(endpoint_id) if endpoint_id else None
    rows = endpoints.recent_deliveries(db.session, endpoint=endpoint, status=status, limit=limit)
    if not rows:
        click.echo("no deliveries")
    made = endpoints.attempts_made(db.session, [d.id for d, _, _ in rows])
    for d, ev, e in rows:
        # All attempts, as listed below; the retry schedule restarts at a redeliver.
        since = f" ({d.attempts} since redeliver)" if d.attempts != made[d.id] else ""
        click.echo(
            f"{d.id}  {d.status:<9} {ev.type:<17} {ev.msg_id}  -> {e.public_id}  "
            f"attempts={made[d.id]}{since} last={d.last_status_code or d.last_error or '-'}"
        )
        if attempts:
            for a in endpoints.attempt_log(db.session, d.id):
                click.echo(
                    f"    #{a.number} {a.started_at:%Y-%m-%d %H:%M:%S} {a.duration_ms}ms "
                    f"{a.status_code or ''} {a.error or ''}"
                )


@webhooks_cli.command("redeliver")
@click.argument("delivery_id", type=int)
@with_appcontext
def redeliver_command(delivery_id: int) -> None:
    """Queue a delivery again now (same webhook-id)."""
    d = db.session.get(WebhookDelivery, delivery_id)
    if d is None:
        raise click.ClickException(f"no delivery {delivery_id}")
    before = audit.snapshot(d, endpoints.AUDITED_DELIVERY)
    endpoints.redeliver(d)
    audit.changed(db.session, "webhook_delivery.redelivered", str(d.id), before, d)
    db.session.commit()
    click.echo(f"delivery {delivery_id} queued")

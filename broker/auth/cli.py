"""`flask users …` and `flask tokens …`: manage accounts and API tokens from the shell."""

from __future__ import annotations

import sys
from datetime import timedelta

import click
from flask.cli import AppGroup

from broker.audit import log as audit
from broker.auth import service_keys, tokens, users
from broker.auth.models import User
from broker.platform.config import current_settings
from broker.platform.db import db, utcnow
from broker.platform.text import table, utc_minute

users_cli = AppGroup("users", help="Manage accounts.")
tokens_cli = AppGroup("tokens", help="Manage API bearer tokens.")
service_keys_cli = AppGroup("service-keys", help="Manage the app backend's service keys.")


def _get_user(username: str) -> User:
    user = users.find_user(db.session, username)
    if user is None:
        raise click.ClickException(f"no user named {username!r}")
    return user


def _find_account(who: str, issuer: str | None) -> User:
    """Find an account by username, by public id (`u_…`), or by external id within `issuer`."""
    import sqlalchemy as sa

    from broker.auth import external

    if issuer is not None:
        user = external.find_account(db.session, issuer, who)
        if user is None:
            raise click.ClickException(f"no account for {who!r} in namespace {issuer!r}")
        return user
    if who.startswith("u_"):
        by_id = db.session.scalar(sa.select(User).where(User.public_id == who))
        if by_id is not None:
            return by_id
    return _get_user(who)


# Accounts of the app's own users have no username of theirs: an admin names them by the id
# their identity provider or service key uses, in that namespace.
_issuer_option = click.option(
    "--issuer",
    default=None,
    metavar="NAMESPACE",
    help="Read WHO as an external id in this namespace (an OIDC issuer URL or a service key's "
    "--issuer, e.g. service-keys).",
)


# What the audit log keeps of an account and of an API token (never a secret).
_ACCOUNT_FIELDS = ("username", "email", "is_admin", "active", "external_issuer", "external_subject")
_TOKEN_FIELDS = ("name", "expires_at", "revoked_at")


def _account(user: User) -> dict[str, object]:
    return audit.snapshot(user, _ACCOUNT_FIELDS)


def _new_password() -> str:
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


@users_cli.command("create")
@click.argument("username")
@click.option("--admin", is_flag=True, help="Make the user an administrator.")
@click.option("--email", default=None, help="Optional email address.")
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from standard input (scripts) instead of prompting.",
)
def create_user_command(
    username: str, admin: bool, email: str | None, password_stdin: bool
) -> None:
    """Create an account (asks for the password)."""
    try:
        # A taken or malformed name is refused before anyone types a password for it.
        users.check_new_username(db.session, username)
    except users.AccountError as exc:
        raise click.ClickException(f"{exc.field}: {exc.message}") from None
    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    try:
        user = users.create_user(
            db.session, username, password or _new_password(), email=email, is_admin=admin
        )
        db.session.flush()
        audit.record(db.session, "user.created", user.public_id, after=_account(user))
        db.session.commit()
    except users.AccountError as exc:
        db.session.rollback()
        raise click.ClickException(f"{exc.field}: {exc.message}") from None
    role = "administrator" if admin else "user"
    click.echo(f"Created {role} {user.username} ({user.public_id}).")


@users_cli.command("list")
def list_users_command() -> None:
    """List the accounts: name, namespace (`local`, or who vouches for one of your app's
    users), public id, role, state, when created and last logged in."""
    rows = users.list_users(db.session)
    if not rows:
        click.echo("no users; create one with `flask users create NAME`")
        return
    lines = table(
        ("USERNAME", "NAMESPACE", "PUBLIC ID", "ROLE", "STATE", "CREATED", "LAST LOGIN"),
        [
            (
                user.username,
                user.namespace,
                user.public_id,
                "admin" if user.is_admin else "user",
                "active" if user.active else "deactivated",
                utc_minute(user.created_at),
                utc_minute(user.last_login_at),
            )
            for user in rows
        ],
    )
    click.echo("\n".join(lines))


@users_cli.command("set-password")
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def set_password_command(username: str, password_stdin: bool) -> None:
    """Set a user's password; ends their sessions and revokes their API tokens."""
    user = _get_user(username)
    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    try:
        users.set_password(db.session, user, password or _new_password())
        audit.record(db.session, "user.password_set", user.public_id)
        db.session.commit()
    except users.AccountError as exc:
        db.session.rollback()
        raise click.ClickException(f"{exc.field}: {exc.message}") from None
    click.echo(f"Password of {user.username} changed; sessions ended, API tokens revoked.")


@users_cli.command("deactivate")
@click.argument("who")
@_issuer_option
def deactivate_command(who: str, issuer: str | None) -> None:
    """Lock an account out (by username, public id, or --issuer and external id): no login,
    sessions ended, API tokens revoked."""
    user = _find_account(who, issuer)
    before = _account(user)
    users.deactivate(db.session, user)
    audit.changed(db.session, "user.deactivated", user.public_id, before, user)
    db.session.commit()
    click.echo(f"Deactivated {user.username} ({user.public_id}).")


@users_cli.command("activate")
@click.argument("who")
@_issuer_option
def activate_command(who: str, issuer: str | None) -> None:
    """Let a deactivated account in again (its old tokens stay revoked)."""
    user = _find_account(who, issuer)
    before = _account(user)
    user.active = True
    audit.changed(db.session, "user.activated", user.public_id, before, user)
    db.session.commit()
    click.echo(f"Activated {user.username} ({user.public_id}).")


@users_cli.command("show")
@click.argument("who")
@_issuer_option
def show_command(who: str, issuer: str | None) -> None:
    """Show one account: public id, role, state, and the namespace and id of an external one."""
    user = _find_account(who, issuer)
    click.echo(f"username:    {user.username}")
    click.echo(f"public id:   {user.public_id}")
    click.echo(f"role:        {'admin' if user.is_admin else 'user'}")
    click.echo(f"state:       {'active' if user.active else 'deactivated'}")
    if user.external_issuer is not None:
        click.echo(f"namespace:   {user.external_issuer}")
        click.echo(f"external id: {user.external_subject}")


@tokens_cli.command("create")
@click.argument("username")
@click.option("--name", default="cli", show_default=True, help="Device or purpose of the token.")
@click.option("--days", type=click.IntRange(1, 365), default=None, help="Lifetime in days.")
def create_token_command(username: str, name: str, days: int | None) -> None:
    """Issue an API token for a user and print it once."""
    user = _get_user(username)
    if not user.is_active:
        raise click.ClickException(f"{user.username} is deactivated")
    ttl = timedelta(days=days or current_settings().api_token_ttl_days)
    issued = tokens.issue(db.session, user, name, ttl=ttl)
    db.session.flush()
    audit.record(
        db.session,
        "token.created",
        issued.token.public_id,
        after={"user": user.public_id, **audit.snapshot(issued.token, _TOKEN_FIELDS)},
    )
    db.session.commit()
    click.echo(issued.secret)
    click.echo(
        f"Token {issued.token.public_id} for {user.username}, expires "
        f"{issued.token.expires_at:%Y-%m-%d}. It is shown only now.",
        err=True,
    )


@tokens_cli.command("list")
@click.argument("username")
def list_tokens_command(username: str) -> None:
    """List a user's API tokens with the ids `tokens revoke` takes, newest first."""
    user = _get_user(username)
    rows = tokens.all_tokens(db.session, user)
    if not rows:
        click.echo(f"{user.username} has no API tokens")
        return
    now = utcnow()
    lines = table(
        ("ID", "NAME", "STATE", "CREATED", "EXPIRES", "LAST USED"),
        [
            (
                token.public_id,
                token.name,
                tokens.token_state(token, now),
                utc_minute(token.created_at),
                utc_minute(token.expires_at),
                utc_minute(token.last_used_at),
            )
            for token in rows
        ],
    )
    click.echo("\n".join(lines))


@tokens_cli.command("revoke")
@click.argument("token_id")
def revoke_token_command(token_id: str) -> None:
    """Revoke an API token by its id (tok_…)."""
    import sqlalchemy as sa

    from broker.auth.models import ApiToken

    token = db.session.scalar(sa.select(ApiToken).where(ApiToken.public_id == token_id))
    if token is None:
        raise click.ClickException(f"no token {token_id!r}")
    before = audit.snapshot(token, ("revoked_at",))
    tokens.revoke(token)
    audit.changed(db.session, "token.revoked", token.public_id, before, token)
    db.session.commit()
    click.echo(f"Revoked {token_id}.")


@service_keys_cli.command("create")
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    type=click.Choice(sorted(service_keys.SCOPES)),
    help="What the key may do (repeat for several).",
)
@click.option(
    "--issuer",
    default=None,
    help=f"Namespace of the external user ids it acts for (default {service_keys.DEFAULT_ISSUER}).",
)
def create_service_key_command(name: str, scopes: tuple[str, ...], issuer: str | None) -> None:
    """Create a service key for the app's backend and print it once."""
    try:
        issued = service_keys.issue(db.session, name, list(scopes), issuer=issuer)
    except service_keys.ServiceKeyError as exc:
        raise click.ClickException(exc.message) from None
    service_keys.record_issued(db.session, issued.key)
    db.session.commit()
    click.echo(issued.secret)
    click.echo(
        f"Service key {issued.key.public_id} ({', '.join(sorted(scopes))}) for issuer "
        f"{issued.key.issuer}. It is shown only now.",
        err=True,
    )


@service_keys_cli.command("list")
def list_service_keys_command() -> None:
    """List the service keys: id, name, scopes, state, last use."""
    for key in service_keys.all_keys(db.session):
        state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
        used = f"{key.last_used_at:%Y-%m-%d %H:%M}" if key.last_used_at else "never used"
        scopes = ",".join(sorted(service_keys.scopes_of(key)))
        click.echo(f"{key.public_id}  {key.name}  {scopes}  {key.issuer}  {state}  {used}")


@service_keys_cli.command("revoke")
@click.argument("key_id")
def revoke_service_key_command(key_id: str) -> None:
    """Revoke a service key by its id (svk_…); its next request is refused."""
    key = service_keys.find(db.session, key_id)
    if key is None:
        raise click.ClickException(f"no service key {key_id!r}")
    service_keys.revoke_recorded(db.session, key)
    db.session.commit()
    click.echo(f"Revoked {key_id}.")

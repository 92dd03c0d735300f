"""The `flask --app broker …` commands: each feature adds its command group here."""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    """Register every command group on the app's CLI."""
    from broker.audit.cli import audit_command
    from broker.auth.cli import service_keys_cli, tokens_cli, users_cli
    from broker.erasure import cli as _erasure  # noqa: F401  (adds `users erase`)
    from broker.images.cli import keys_cli, variants_cli
    from broker.platform.cli import encryption_cli
    from broker.reconcile.cli import reconcile_command, usage_command
    from broker.webhooks.cli import webhooks_cli
    from broker.worker import worker_command

    for group in (
        encryption_cli,
        keys_cli,
        variants_cli,
        users_cli,
        tokens_cli,
        service_keys_cli,
        webhooks_cli,
        worker_command,
        audit_command,
        reconcile_command,
        usage_command,
    ):
        app.cli.add_command(group)

"""The `flask --app broker …` commands: each feature adds its command group here."""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    """Register every command group on the app's CLI."""
    groups: list = []
    for group in groups:
        app.cli.add_command(group)

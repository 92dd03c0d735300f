"""`flask users …` and `flask tokens …`: create, set-password, deactivate; create, revoke."""

from __future__ import annotations

import sqlalchemy as sa

from broker.auth.models import ApiToken
from broker.platform.db import db
from tests.factories import PASSWORD


def test_cli_manages_users_and_tokens(app):
    """users create / set-password / deactivate and tokens create / revoke."""
    runner = app.test_cli_runner()
    created = runner.invoke(
        args=["users", "create", "Root", "--admin", "--password-stdin"], input=PASSWORD + "\n"
    )
    assert created.exit_code == 0, created.output
    assert "administrator Root" in created.output
    duplicate = runner.invoke(
        args=["users", "create", "root", "--password-stdin"], input=PASSWORD + "\n"
    )
    assert duplicate.exit_code != 0 and "taken" in duplicate.output
    weak = runner.invoke(args=["users", "create", "bob", "--password-stdin"], input="short\n")
    assert weak.exit_code != 0 and "12 characters" in weak.output

    issued = runner.invoke(args=["tokens", "create", "root", "--name", "ci", "--days", "7"])
    assert issued.exit_code == 0, issued.output
    secret = issued.stdout.strip()
    assert secret.startswith("brk_")
    client = app.test_client()
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"})
    assert me.get_json()["is_admin"] is True

    changed = runner.invoke(
        args=["users", "set-password", "ROOT", "--password-stdin"], input="another long password\n"
    )
    assert changed.exit_code == 0, changed.output
    assert (
        client.get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    )

    second = runner.invoke(args=["tokens", "create", "root"]).stdout.strip()
    with app.app_context():
        token_id = db.session.scalar(
            sa.select(ApiToken.public_id).where(ApiToken.revoked_at.is_(None))
        )
    revoked = runner.invoke(args=["tokens", "revoke", token_id])
    assert revoked.exit_code == 0
    assert (
        client.get("/api/v1/me", headers={"Authorization": f"Bearer {second}"}).status_code == 401
    )

    third = runner.invoke(args=["tokens", "create", "root"]).stdout.strip()
    deactivated = runner.invoke(args=["users", "deactivate", "root"])
    assert deactivated.exit_code == 0
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {third}"}).status_code == 401
    refused = runner.invoke(args=["tokens", "create", "root"])
    assert refused.exit_code != 0 and "deactivated" in refused.output
    missing = runner.invoke(args=["users", "deactivate", "nobody"])
    assert missing.exit_code != 0 and "no user" in missing.output

"""`flask users …` and `flask tokens …`: create, set-password, deactivate; create, revoke."""

from __future__ import annotations

import re

import sqlalchemy as sa

from broker.auth.models import ApiToken, User
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


def test_users_create_with_a_taken_name_fails_before_asking_for_a_password(app):
    """The operator learns the name is taken (or malformed) before typing a password twice."""
    runner = app.test_cli_runner()
    first = runner.invoke(args=["users", "create", "alice", "--password-stdin"], input=PASSWORD)
    assert first.exit_code == 0, first.output
    taken = runner.invoke(args=["users", "create", "ALICE"], input="")
    assert taken.exit_code == 1
    assert "username: That username is taken." in taken.output
    assert "Password" not in taken.output
    malformed = runner.invoke(args=["users", "create", "a b"], input="")
    assert malformed.exit_code == 1 and "Password" not in malformed.output
    assert "letters, digits" in malformed.output
    # A free name still asks (twice) and creates the account.
    fresh = runner.invoke(args=["users", "create", "bob"], input=f"{PASSWORD}\n{PASSWORD}\n")
    assert fresh.exit_code == 0, fresh.output
    assert fresh.output.count("Password") == 1 and "Created user bob" in fresh.output


def test_users_list_shows_every_account_with_role_and_state(app):
    """`users list`: one line per account, admins and deactivated ones marked."""
    runner = app.test_cli_runner()
    assert "no users" in runner.invoke(args=["users", "list"]).output
    for args in (["carol", "--admin"], ["alice"], ["bob"]):
        created = runner.invoke(
            args=["users", "create", *args, "--password-stdin"], input=PASSWORD + "\n"
        )
        assert created.exit_code == 0, created.output
    runner.invoke(args=["users", "deactivate", "bob"])
    with app.app_context():
        ids = dict(db.session.execute(sa.select(User.username, User.public_id)).all())

    listed = runner.invoke(args=["users", "list"])
    assert listed.exit_code == 0, listed.output
    header, *lines = listed.output.splitlines()
    assert header.split() == [
        "USERNAME",
        "NAMESPACE",
        "PUBLIC",
        "ID",
        "ROLE",
        "STATE",
        "CREATED",
        "LAST",
        "LOGIN",
    ]
    rows = [line.split() for line in lines]
    assert [r[:5] for r in rows] == [
        ["alice", "local", ids["alice"], "user", "active"],
        ["bob", "local", ids["bob"], "user", "deactivated"],
        ["carol", "local", ids["carol"], "admin", "active"],
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d", r[5]) and r[7] == "-" for r in rows)


def test_tokens_list_shows_the_ids_that_revoke_takes(app):
    """`tokens list USER`: every token of that user with its state; its ids revoke it."""
    runner = app.test_cli_runner()
    for name in ("alice", "bob"):
        runner.invoke(args=["users", "create", name, "--password-stdin"], input=PASSWORD + "\n")
    assert "alice has no API tokens" in runner.invoke(args=["tokens", "list", "alice"]).output
    phone = runner.invoke(args=["tokens", "create", "alice", "--name", "phone"]).stdout.strip()
    runner.invoke(args=["tokens", "create", "alice", "--name", "laptop"])
    runner.invoke(args=["tokens", "create", "bob", "--name", "bobs-phone"])
    client = app.test_client()
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {phone}"}).status_code == 200

    listed = runner.invoke(args=["tokens", "list", "alice"])
    assert listed.exit_code == 0, listed.output
    header, *lines = listed.output.splitlines()
    assert header.split()[:3] == ["ID", "NAME", "STATE"]
    rows = {line.split()[1]: line.split() for line in lines}
    assert set(rows) == {"phone", "laptop"}  # bob's token is not alice's business
    assert all(r[0].startswith("tok_") and r[2] == "active" for r in rows.values())
    assert rows["laptop"][-1] == "-" and rows["phone"][-1] != "-"  # phone was just used
    assert phone not in listed.output  # ids only, never the secret

    revoked = runner.invoke(args=["tokens", "revoke", rows["phone"][0]])
    assert revoked.exit_code == 0, revoked.output
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {phone}"}).status_code == 401
    again = {
        line.split()[1]: line.split()[2]
        for line in runner.invoke(args=["tokens", "list", "alice"]).output.splitlines()[1:]
    }
    assert again == {"phone": "revoked", "laptop": "active"}
    missing = runner.invoke(args=["tokens", "list", "nobody"])
    assert missing.exit_code == 1 and "no user named 'nobody'" in missing.output

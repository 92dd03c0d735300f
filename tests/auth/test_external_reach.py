"""Credentials the app vouches for (identity-provider JWTs, service keys) open the API only: no
page, no session cookie, no CSRF token, no broker token; and admins reach those accounts from
the shell by namespace and external id."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flask import Flask

ROOT = Path(__file__).resolve().parents[2]
PAGES = ("/upload", "/gallery", "/auth/account", "/")


def _service_key(app: Flask) -> str:
    result = app.test_cli_runner().invoke(
        args=[
            "service-keys",
            "create",
            "shop",
            "--scope",
            "uploads:read",
            "--scope",
            "uploads:write",
        ]
    )
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()[0]


def test_an_identity_provider_token_opens_the_api_and_no_page(broker, idp) -> None:
    client = broker.test_client()
    bearer = {"Authorization": f"Bearer {idp.token(sub='alice-42')}"}
    assert client.get("/api/v1/me", headers=bearer).status_code == 200
    for page in PAGES:
        answer = client.get(page, headers=bearer)
        # Anonymous: the landing page, or the way to the login form. Never the page itself.
        assert answer.status_code in (200, 302), page
        if answer.status_code == 302:
            assert "/auth/login" in answer.headers["Location"], page
    # No session was started for the token's subject (a login-prompt flash is all it holds),
    # so no CSRF token of theirs either: the account page sends them to the login form.
    with client.session_transaction() as session:
        assert "_user_id" not in session and "login_at" not in session
    assert client.get("/auth/account", headers=bearer).status_code == 302
    # The account page is where a session would mint a 90-day `brk_…` token: refused.
    minted = client.post(
        "/auth/account/tokens", data={"name": "stolen"}, headers=bearer, follow_redirects=False
    )
    assert minted.status_code in (302, 401, 403)
    assert "brk_" not in minted.get_data(as_text=True)
    with broker.app_context():
        from broker.auth.models import ApiToken
        from broker.platform.db import db

        assert db.session.query(ApiToken).count() == 0


def test_a_service_key_opens_no_page_either(broker) -> None:
    client = broker.test_client()
    key = {"Authorization": f"Bearer {_service_key(broker)}", "On-Behalf-Of": "c-1"}
    assert client.get("/api/v1/me", headers=key).status_code == 200
    for page in PAGES:
        answer = client.get(page, headers=key)
        assert answer.status_code in (200, 302), page
        assert answer.headers.get("Location", "/auth/login").startswith("/auth/login"), page
    with client.session_transaction() as session:
        assert "_user_id" not in session


def _flask(app: Flask, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `flask --app broker …` as an operator would, against the test's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(
        BROKER_ENV="testing",
        BROKER_DATABASE_URL=app.config["DATABASE_URL"],
        BROKER_INSTANCE_PATH=str(tmp_path),
        BROKER_ENCRYPTION_KEYS=json.dumps(app.config["ENCRYPTION_KEYS"]),
    )
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "broker", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_admins_deactivate_external_accounts_by_namespace_and_id(broker, idp, tmp_path) -> None:
    client = broker.test_client()
    bearer = {"Authorization": f"Bearer {idp.token(sub='alice-42')}"}
    # Their first writes create their accounts (a read would create none).
    public_id = client.post("/api/v1/uploads", json={}, headers=bearer).get_json()["owner"]
    key = {"Authorization": f"Bearer {_service_key(broker)}", "On-Behalf-Of": "customer-7"}
    assert client.post("/api/v1/uploads", json={}, headers=key).status_code == 201

    shown = _flask(broker, tmp_path, "users", "show", "alice-42", "--issuer", idp.url)
    assert shown.returncode == 0, shown.stderr
    assert public_id in shown.stdout and f"namespace:   {idp.url}" in shown.stdout

    off = _flask(broker, tmp_path, "users", "deactivate", "alice-42", "--issuer", idp.url)
    assert off.returncode == 0, off.stderr
    assert f"Deactivated alice-42 ({public_id})." in off.stdout
    refused = client.get("/api/v1/me", headers={"Authorization": f"Bearer {idp.token()}"})
    assert refused.status_code == 403
    assert refused.get_json()["error"]["code"] == "account_deactivated"

    unknown = _flask(broker, tmp_path, "users", "deactivate", "nobody", "--issuer", idp.url)
    assert unknown.returncode == 1
    assert "no account for 'nobody' in namespace" in unknown.stderr

    # A service key's users live in its namespace (service-keys by default); a public id works
    # too (the same commands, run in-process: a new interpreter per call costs seconds).
    runner = broker.test_cli_runner()
    by_key = runner.invoke(args=["users", "deactivate", "customer-7", "--issuer", "service-keys"])
    assert by_key.exit_code == 0, by_key.output
    assert client.get("/api/v1/me", headers=key).status_code == 403
    back = runner.invoke(args=["users", "activate", public_id])
    assert back.exit_code == 0, back.output
    assert client.get("/api/v1/me", headers=bearer).status_code == 200

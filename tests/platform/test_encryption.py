"""Secrets at rest: webhook secrets and signing-key values are encrypted in the database."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet
from flask import Flask

from broker import create_app
from broker.images import keys
from broker.images.models import SigningKey
from broker.platform.config import ConfigError
from broker.platform.db import db
from broker.platform.encryption import DEV_KEY_FILE, EncryptionError
from broker.webhooks.models import WebhookEndpoint
from tests.factories import PRODUCTION_SETTINGS, TEST_ENCRYPTION_KEY, create_user

PASSWORD = "correct horse battery"
NEW_KEY = Fernet.generate_key().decode()


def dump(app: Flask) -> str:
    """Return every stored value of every table as text, as a database dump would hold it."""
    with app.app_context():
        meta = sa.MetaData()
        meta.reflect(db.engine)  # reflected types: the raw stored values, nothing decrypted
        with db.engine.connect() as conn:
            return "\n".join(
                repr(tuple(row))
                for table in meta.sorted_tables
                for row in conn.execute(sa.select(table))
            )


def _register_and_sync(
    app: Flask, make_user: Callable[..., Any], bearer: Callable[..., dict[str, str]]
) -> tuple[str, list[str]]:
    """Register a webhook endpoint through the API and sync the signing keys; return the
    endpoint's secret and the signing-key values."""
    make_user("root", PASSWORD, is_admin=True)
    response = app.test_client().post(
        "/api/v1/webhooks/endpoints",
        json={"url": "http://127.0.0.1:9/hook", "events": ["upload.completed"]},
        headers=bearer(app, "root"),
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    result = app.test_cli_runner().invoke(args=["keys", "sync"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        values = list(db.session.scalars(sa.select(SigningKey.value)))
    assert values
    return response.get_json()["secret"], values


def test_a_database_dump_holds_neither_webhook_secrets_nor_signing_keys(
    make_app: Callable[..., Flask],
    make_user: Callable[..., Any],
    bearer: Callable[..., dict[str, str]],
    emulator: Any,
) -> None:
    """After registering an endpoint, rotating its secret and syncing keys, no secret (nor its
    base64 body) appears anywhere in the database, while the app still reads them to sign."""
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    first, values = _register_and_sync(app, make_user, bearer)
    assert sorted(values) == sorted(v for _, v in emulator.emulator.store.list_keys())
    with app.app_context():
        endpoint = db.session.scalars(sa.select(WebhookEndpoint)).one()
        public_id = endpoint.public_id
    rotated = app.test_client().post(
        f"/api/v1/webhooks/endpoints/{public_id}/rotate-secret",
        json={"window_seconds": 3600},
        headers=bearer(app, "root"),
    )
    assert rotated.status_code == 200, rotated.get_data(as_text=True)
    second = rotated.get_json()["secret"]
    text = dump(app)
    for plain in (first, first.removeprefix("whsec_"), second, second[6:], *values):
        assert plain not in text
    with app.app_context():
        endpoint = db.session.scalars(sa.select(WebhookEndpoint)).one()
        assert (endpoint.secret, endpoint.previous_secret) == (second, first)  # read decrypted
        active = keys.active_key(db.session)
        assert active is not None and active.value in values


def test_rotating_the_encryption_key(
    make_app: Callable[..., Flask],
    make_user: Callable[..., Any],
    bearer: Callable[..., dict[str, str]],
) -> None:
    """New key first: old values still read; `flask encryption reencrypt` rewrites every value
    under it; then the old key can go, and an app holding only the old key can read nothing."""
    old = make_app(WEBHOOK_ALLOW_PRIVATE=True)
    secret, values = _register_and_sync(old, make_user, bearer)
    before = dump(old)

    both = make_app(ENCRYPTION_KEYS=[NEW_KEY, TEST_ENCRYPTION_KEY])
    with both.app_context():
        assert db.session.scalars(sa.select(WebhookEndpoint.secret)).one() == secret
    result = both.test_cli_runner().invoke(args=["encryption", "reencrypt"])
    assert result.exit_code == 0, result.output
    assert f"re-encrypted {1 + len(values)} value(s)" in result.output
    after = dump(both)
    assert after != before
    assert secret not in after

    new_only = make_app(ENCRYPTION_KEYS=f"{NEW_KEY}")  # a plain string works too
    with new_only.app_context():
        assert db.session.scalars(sa.select(WebhookEndpoint.secret)).one() == secret
        assert sorted(db.session.scalars(sa.select(SigningKey.value))) == sorted(values)

    old_only = make_app(ENCRYPTION_KEYS=[TEST_ENCRYPTION_KEY])
    with old_only.app_context(), pytest.raises(EncryptionError):
        db.session.scalars(sa.select(WebhookEndpoint.secret)).one()
    with old_only.app_context():
        db.session.rollback()


def test_production_refuses_to_start_without_an_encryption_key(tmp_path: Path) -> None:
    """No BROKER_ENCRYPTION_KEYS in production: a one-line refusal naming the setting; a key
    that is not a Fernet key is refused everywhere."""
    settings = {**PRODUCTION_SETTINGS, "INSTANCE_PATH": str(tmp_path)}
    del settings["ENCRYPTION_KEYS"]
    with pytest.raises(ConfigError, match="BROKER_ENCRYPTION_KEYS is missing"):
        create_app(settings)
    for env in ("production", "development"):
        bad = {**settings, "ENV": env, "ENCRYPTION_KEYS": ["not-a-key"]}
        with pytest.raises(ConfigError, match="not a Fernet key"):
            create_app(bad)


def test_development_generates_one_key_and_keeps_it(tmp_path: Path) -> None:
    """Without a key, development makes one in the instance folder, and every later process
    (make run, flask commands, migrations) reads that same key."""
    config = {"ENV": "development", "INSTANCE_PATH": str(tmp_path), "SECRET_KEY": "x" * 40}
    first = create_app(dict(config))
    stored = (tmp_path / DEV_KEY_FILE).read_text().strip()
    Fernet(stored)  # a usable key
    second = create_app(dict(config))
    token = first.extensions["encryption"].encrypt("whsec_abc")
    assert second.extensions["encryption"].decrypt(token) == "whsec_abc"
    assert (tmp_path / DEV_KEY_FILE).read_text().strip() == stored


def _migration_app(instance: Path) -> tuple[Flask, sa.Engine]:
    """An app on its own SQLite file, to migrate step by step, and a raw engine on the file."""
    url = f"sqlite:///{instance}/old.sqlite3"
    app = create_app(
        {
            "ENV": "testing",
            "SECRET_KEY": "x" * 40,
            "DATABASE_URL": url,
            "INSTANCE_PATH": str(instance),
            "WORKER_INLINE": False,
            "LOG_LEVEL": "WARNING",
            "ENCRYPTION_KEYS": [TEST_ENCRYPTION_KEY],
        }
    )
    return app, sa.create_engine(url)


def test_the_migration_encrypts_rows_stored_before_it(tmp_path: Path) -> None:
    """Rows written in plain text before the migration are encrypted by `db upgrade`, and
    `db downgrade` gives the plain text back."""
    from flask_migrate import downgrade, upgrade

    app, engine = _migration_app(tmp_path)
    raw = (
        "SELECT secret, previous_secret FROM webhook_endpoints"
        " UNION ALL SELECT value, NULL FROM signing_keys"
    )
    try:
        with app.app_context():
            upgrade(revision="64d9447d37fc")
            with engine.begin() as conn:
                conn.execute(
                    sa.text(
                        "INSERT INTO webhook_endpoints (public_id, url, description, events,"
                        " secret, previous_secret, active, created_at, updated_at) VALUES"
                        " ('we_1', 'https://x', '', '*', 'whsec_current', 'whsec_previous', 1,"
                        " '2026-01-01', '2026-01-01')"
                    )
                )
                conn.execute(
                    sa.text(
                        "INSERT INTO signing_keys (name, value, created_at) "
                        "VALUES ('default', 'key-value-1', '2026-01-01')"
                    )
                )
            upgrade()
            with engine.connect() as conn:
                stored = [v for row in conn.execute(sa.text(raw)) for v in row if v]
            assert len(stored) == 3
            assert not any("whsec_" in v or "key-value" in v for v in stored)
            assert db.session.scalars(sa.select(WebhookEndpoint.previous_secret)).one() == (
                "whsec_previous"
            )
            assert db.session.scalars(sa.select(SigningKey.value)).one() == "key-value-1"
            db.session.remove()
            downgrade(revision="64d9447d37fc")
            with engine.connect() as conn:
                plain = sorted(v for row in conn.execute(sa.text(raw)) for v in row if v)
            assert plain == ["key-value-1", "whsec_current", "whsec_previous"]
            db.engine.dispose()
    finally:
        engine.dispose()


def test_a_dump_holds_neither_the_batch_token_nor_a_stored_upload_url(
    make_app: Callable[..., Flask],
    make_user: Callable[..., Any],
    bearer: Callable[..., dict[str, str]],
) -> None:
    """The batch token and an `Idempotency-Key` create's answer (its one-time upload URL) are
    stored encrypted; the replay and the token still work; `flask encryption check` and
    `reencrypt` cover them."""
    app = make_app(CLOUDFLARE_BATCH="auto")
    make_user("alice")
    headers = {**bearer(app, "alice"), "Idempotency-Key": "create-1"}
    first = app.test_client().post("/api/v1/uploads", json={}, headers=headers)
    assert first.status_code == 201, first.get_data(as_text=True)
    upload_url = first.get_json()["upload_url"]
    token = app.extensions["batch_route"]._read().value  # read back through its keyring
    text = dump(app)
    assert upload_url not in text
    assert token not in text
    replay = app.test_client().post("/api/v1/uploads", json={}, headers=headers)
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_json()["upload_url"] == upload_url
    # A second process reads the stored token instead of fetching one.
    assert make_app(CLOUDFLARE_BATCH="auto").extensions["batch_route"]._read().value == token

    check = app.test_cli_runner().invoke(args=["encryption", "check"])
    assert check.exit_code == 0, check.output
    assert "all 2 stored secret(s) decrypt" in check.output
    both = make_app(CLOUDFLARE_BATCH="auto", ENCRYPTION_KEYS=[NEW_KEY, TEST_ENCRYPTION_KEY])
    result = both.test_cli_runner().invoke(args=["encryption", "reencrypt"])
    assert "re-encrypted 2 value(s)" in result.output
    new_only = make_app(CLOUDFLARE_BATCH="auto", ENCRYPTION_KEYS=[NEW_KEY])
    assert new_only.extensions["batch_route"]._read().value == token
    again = new_only.test_client().post("/api/v1/uploads", json={}, headers=headers)
    assert again.get_json()["upload_url"] == upload_url


def test_the_migration_encrypts_batch_tokens_and_stored_answers(tmp_path: Path) -> None:
    """A batch token and a stored answer written in plain text before the migration are
    encrypted by `db upgrade`; `db downgrade` gives the plain text back."""
    from flask_migrate import downgrade, upgrade

    from broker.api.models import IdempotencyKey

    before = "33dacf6e6ba4"
    app, engine = _migration_app(tmp_path)
    raw = (
        "SELECT token FROM upstream_batch_tokens UNION ALL SELECT response_body FROM"
        " idempotency_keys"
    )
    answer = '{"upload_url":"https://upload.example/one-time"}'
    try:
        with app.app_context():
            upgrade(revision=before)
            user = create_user(app, "before-upgrade")
            with engine.begin() as conn:
                conn.execute(
                    sa.text(
                        "INSERT INTO upstream_batch_tokens (scope, token) VALUES"
                        " ('cloudflare', 'plain-batch-token')"
                    )
                )
                conn.execute(
                    sa.text(
                        "INSERT INTO idempotency_keys (user_id, key, fingerprint,"
                        " response_status, response_body, created_at, expires_at) VALUES"
                        " (:user, 'k', 'f', 201, :answer, '2026-01-01', '2026-01-02')"
                    ),
                    {"answer": answer, "user": user.id},
                )
            upgrade()
            with engine.connect() as conn:
                stored = [row[0] for row in conn.execute(sa.text(raw))]
            assert len(stored) == 2
            assert not any("plain-batch" in v or "upload.example" in v for v in stored)
            assert db.session.scalars(sa.select(IdempotencyKey.response_body)).one() == answer
            assert app.extensions["encryption"].decrypt(stored[0]) == "plain-batch-token"
            db.session.remove()
            downgrade(revision=before)
            with engine.connect() as conn:
                plain = sorted(row[0] for row in conn.execute(sa.text(raw)))
            assert plain == sorted(["plain-batch-token", answer])
            db.engine.dispose()
    finally:
        engine.dispose()

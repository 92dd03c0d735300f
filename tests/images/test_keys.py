"""Signing keys: rotation with a grace period, and the mirror of the account's keys."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import requests
import sqlalchemy as sa
from flask import Flask

from broker.emulator.testing import EmulatorServer
from broker.images import keys
from broker.images.models import SigningKey
from broker.platform.db import db, utcnow
from broker.upstream.cloudflare import get_client
from tests.factories import (
    create_user,
    fetch,
    issue_token,
    mint_url,
    upload_image,
)


def test_rotation_signs_with_the_new_key_and_old_urls_work_until_the_old_key_is_deleted(
    broker: Flask, http: requests.Session, emulator: EmulatorServer
) -> None:
    user_id = create_user(broker, "alice").id
    auth = issue_token(broker, "alice")
    upload_id = upload_image(broker, user_id)
    old_url = mint_url(broker, auth, upload_id, "thumb").get_json()["url"]
    with broker.app_context():
        old_key = keys.active_key(db.session)
        assert old_key is not None
        old_name = old_key.name
    result = broker.test_cli_runner().invoke(args=["keys", "rotate", "--grace", "600"])
    assert result.exit_code == 0, result.output
    with broker.app_context():
        new_key = keys.active_key(db.session)
        assert new_key is not None and new_key.name != old_name
        assert new_key.value not in result.output
        new_signer = keys.Signer(new_key.name, new_key.value)
        old = db.session.scalars(sa.select(SigningKey).where(SigningKey.name == old_name)).one()
        assert old.retired_at is not None
    upstream = {name for name, _ in emulator.emulator.store.list_keys()}
    assert {old_name, new_key.name} <= upstream

    new_url = mint_url(broker, auth, upload_id, "thumb").get_json()["url"]
    parts = urlsplit(new_url)
    exp = parts.query.split("&")[0]
    assert new_url.endswith("sig=" + new_signer.signature(f"{parts.path}?{exp}"))
    assert new_url != old_url
    assert fetch(http, old_url).status_code == 200
    assert fetch(http, new_url).status_code == 200

    listed = broker.test_cli_runner().invoke(args=["keys", "list"])
    assert listed.exit_code == 0, listed.output
    assert old.value not in listed.output and new_key.value not in listed.output
    # Dates in UTC, never seconds: when the old key was retired and when it goes.
    header, *lines = listed.output.splitlines()
    assert header.split() == [
        "NAME",
        "FINGERPRINT",
        "STATE",
        "ADDED",
        "RETIRED",
        "DELETED",
        "AFTER",
    ]
    by_name = {line.split()[0]: line.split()[1:] for line in lines}
    assert by_name[new_key.name][1] == "signing" and by_name[new_key.name][-2:] == ["-", "-"]
    assert by_name[old_name][1] == "retired"
    retired = datetime.strptime(" ".join(by_name[old_name][4:6]), "%Y-%m-%d %H:%MZ")
    deleted = datetime.strptime(" ".join(by_name[old_name][6:8]), "%Y-%m-%d %H:%MZ")
    assert retired.replace(tzinfo=UTC) == old.retired_at.replace(second=0, microsecond=0)
    assert timedelta(seconds=540) <= deleted - retired <= timedelta(seconds=660)

    # Within the grace period a sync keeps the old key; after it, the key is deleted.
    with broker.app_context():
        assert keys.sync_keys(db.session, get_client()).purged == []
        later = utcnow() + timedelta(seconds=601)
        assert keys.sync_keys(db.session, get_client(), now=later).purged == [old_name]
        db.session.commit()
    assert old_name not in {name for name, _ in emulator.emulator.store.list_keys()}
    assert fetch(http, old_url).status_code == 403
    assert fetch(http, new_url).status_code == 200


def test_sync_mirrors_keys_changed_upstream(broker: Flask, emulator: EmulatorServer) -> None:
    store = emulator.emulator.store
    store.put_key("extra1")
    with broker.app_context():
        result = keys.sync_keys(db.session, get_client())
        db.session.commit()
        assert result.added == ["extra1"]
        assert keys.active_key(db.session).name == "extra1"
    store.delete_key("extra1")
    with broker.app_context():
        assert keys.sync_keys(db.session, get_client()).removed == ["extra1"]
        db.session.commit()
        assert keys.active_key(db.session).name == "default"
        assert keys.sync_keys(db.session, get_client()).changed is False

"""Service keys: the app's backend acts for its own users (external ids), within its scopes,
against the emulator over real HTTP; admins create, list and revoke keys by CLI and API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from flask import Flask

from broker import worker
from broker.auth import service_keys, users
from broker.auth.models import ServiceKey, User
from broker.platform.db import db
from broker.uploads.models import Upload
from tests.factories import later, send_file

ALL = ("uploads:write", "uploads:read", "images:urls")


@pytest.fixture
def broker(make_app: Callable[..., Flask]) -> Flask:
    """The broker with its variants and signing keys synced (so URLs can be minted)."""
    # The worker verifies (/complete answers 202); inline verification is tested with uploads.
    app = make_app(MAX_PENDING_UPLOADS=3, COMPLETE_INLINE_BUDGET=0)
    runner = app.test_cli_runner()
    for args in (["variants", "sync"], ["keys", "sync"]):
        result = runner.invoke(args=args)
        assert result.exit_code == 0, result.output
    return app


def _new_key(app: Flask, *scopes: str, issuer: str | None = None) -> str:
    """Create a key with `flask service-keys create`; return the secret it printed once."""
    args = ["service-keys", "create", "shop-backend"]
    for scope in scopes:
        args += ["--scope", scope]
    if issuer:
        args += ["--issuer", issuer]
    result = app.test_cli_runner().invoke(args=args)
    assert result.exit_code == 0, result.output
    secret = result.stdout.splitlines()[0]
    assert secret.startswith("bsk_")
    return secret


def _as(key: str, user: str | None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if user is not None:
        headers["On-Behalf-Of"] = user
    return headers


def _accounts(app: Flask) -> dict[str, User]:
    with app.app_context():
        rows = db.session.scalars(sa.select(User).where(User.external_subject.is_not(None)))
        return {u.external_subject: u for u in rows if u.external_subject}


def test_a_key_creates_completes_lists_and_mints_for_each_external_user(broker, emulator) -> None:
    key = _new_key(broker, *ALL)
    client = broker.test_client()
    mine: dict[str, list[dict[str, Any]]] = {"user-A": [], "user-B": []}
    for user, count in (("user-A", 2), ("user-B", 1)):
        for _ in range(count):
            created = client.post("/api/v1/uploads", json={}, headers=_as(key, user))
            assert created.status_code == 201, created.get_json()
            mine[user].append(created.get_json())

    accounts = _accounts(broker)
    assert sorted(accounts) == ["user-A", "user-B"]  # one account each, made on first use
    for user, uploads in mine.items():
        account = accounts[user]
        assert account.external_issuer == service_keys.DEFAULT_ISSUER
        for up in uploads:
            assert up["owner"] == account.public_id
            assert emulator.emulator.store.get_image(up["image_id"]).creator == account.public_id

    # Each user's first upload gets its file; the backend says so; the worker verifies.
    for user in mine:
        send_file(mine[user][0])
        done = client.post(
            f"/api/v1/uploads/{mine[user][0]['id']}/complete", headers=_as(key, user)
        )
        assert done.status_code == 202
    worker.run_once(broker, now=later())

    for user, uploads in mine.items():
        listed = client.get("/api/v1/uploads", headers=_as(key, user)).get_json()["items"]
        assert sorted(u["id"] for u in listed) == sorted(u["id"] for u in uploads)
        shown = client.get(f"/api/v1/uploads/{uploads[0]['id']}", headers=_as(key, user))
        assert shown.get_json()["status"] == "ready"
        minted = client.get(
            f"/api/v1/images/{uploads[0]['id']}/url?variant=thumb", headers=_as(key, user)
        )
        assert minted.status_code == 200, minted.get_json()
        image = requests.get(minted.get_json()["url"], timeout=10)
        assert image.status_code == 200 and image.headers["Content-Type"].startswith("image/")

    # A's uploads do not exist for B, on every route.
    a_id = mine["user-A"][0]["id"]
    as_b = _as(key, "user-B")
    assert client.get(f"/api/v1/uploads/{a_id}", headers=as_b).status_code == 404
    assert client.post(f"/api/v1/uploads/{a_id}/complete", headers=as_b).status_code == 404
    assert client.get(f"/api/v1/images/{a_id}/url?variant=thumb", headers=as_b).status_code == 404
    batch = client.post(
        "/api/v1/images/urls", json={"items": [{"id": a_id, "variant": "thumb"}]}, headers=as_b
    )
    assert batch.get_json()["items"][0]["error"]["code"] == "not_found"
    assert client.delete(f"/api/v1/uploads/{a_id}", headers=as_b).status_code == 404
    with broker.app_context():
        assert db.session.get(Upload, a_id).status == "ready"

    # The accounts have no password: nobody logs in to the broker's pages as them.
    with broker.app_context():
        for account in accounts.values():
            assert users.authenticate(db.session, account.username, "") is None


def test_limits_apply_per_external_user(broker, emulator) -> None:
    key = _new_key(broker, *ALL)
    client = broker.test_client()
    for _ in range(3):
        assert client.post("/api/v1/uploads", json={}, headers=_as(key, "A")).status_code == 201
    refused = client.post("/api/v1/uploads", json={}, headers=_as(key, "A"))
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "too_many_pending_uploads"
    assert client.post("/api/v1/uploads", json={}, headers=_as(key, "B")).status_code == 201


def test_scopes_are_enforced_route_by_route(broker, make_user, bearer, emulator) -> None:
    reader = _new_key(broker, "uploads:read")
    writer = _new_key(broker, "uploads:write")
    hooks = _new_key(broker, "webhooks:manage")
    client = broker.test_client()
    up = client.post("/api/v1/uploads", json={}, headers=_as(writer, "A")).get_json()

    def status(method: str, path: str, headers: dict[str, str], **kw: Any) -> tuple[int, str]:
        response = client.open(path, method=method, headers=headers, **kw)
        body = response.get_json(silent=True) or {}
        return response.status_code, body.get("error", {}).get("code", "")

    assert status("GET", "/api/v1/uploads", _as(reader, "A"))[0] == 200
    assert status("GET", f"/api/v1/uploads/{up['id']}", _as(reader, "A"))[0] == 200
    assert status("GET", "/api/v1/me", _as(reader, "A"))[0] == 200
    forbidden = [
        ("POST", "/api/v1/uploads", reader, {"json": {}}),
        ("DELETE", f"/api/v1/uploads/{up['id']}", reader, {}),
        ("GET", f"/api/v1/images/{up['id']}/url?variant=thumb", reader, {}),
        ("GET", "/api/v1/uploads", writer, {}),
        ("GET", "/api/v1/webhooks/endpoints", writer, {}),
        ("GET", "/api/v1/uploads", hooks, {}),
        # No scope opens the account and admin routes to a key.
        ("GET", "/api/v1/auth/tokens", writer, {}),
        ("GET", "/api/v1/service-keys", hooks, {}),
        ("GET", "/api/v1/users/u_x/upload-limits", hooks, {}),
    ]
    for method, path, key, kw in forbidden:
        assert status(method, path, _as(key, "A"), **kw) == (403, "insufficient_scope"), path

    # webhooks:manage is the key's own business: no user needed, and no admin account either.
    assert status("GET", "/api/v1/webhooks/endpoints", _as(hooks, None))[0] == 200
    # A user's business needs the user.
    assert status("POST", "/api/v1/uploads", _as(writer, None), json={}) == (
        400,
        "on_behalf_of_required",
    )
    for bad in ("", "x" * 256, "tab\there", " padded"):
        assert status("GET", "/api/v1/uploads", _as(reader, bad))[0] == 400, repr(bad)
    # Keys are for the API: pages and /i/ redirects do not know them.
    page = client.get("/gallery", headers=_as(reader, "A"))
    assert page.status_code == 302 and "/auth/login" in page.headers["Location"]
    assert client.get(f"/i/{up['id']}/thumb", headers=_as(reader, "A")).status_code in (302, 401)


def test_revocation_is_immediate_and_keys_are_listed(broker, make_user, bearer, emulator) -> None:
    admin = bearer(broker, make_user("root", is_admin=True))
    client = broker.test_client()
    created = client.post(
        "/api/v1/service-keys",
        json={"name": "shop", "scopes": ["uploads:write", "uploads:read"]},
        headers=admin,
    )
    assert created.status_code == 201, created.get_json()
    body = created.get_json()
    key, key_id = body["key"], body["id"]
    assert created.headers["Cache-Control"] == "no-store"
    assert client.get("/api/v1/uploads", headers=_as(key, "A")).status_code == 200

    listed = client.get("/api/v1/service-keys", headers=admin).get_json()["keys"]
    assert [(k["id"], k["scopes"], k["revoked_at"]) for k in listed] == [
        (key_id, ["uploads:read", "uploads:write"], None)
    ]
    assert "key" not in listed[0] and listed[0]["last_used_at"] is not None
    with broker.app_context():  # stored hashed: the secret is nowhere in the table
        row = db.session.scalar(sa.select(ServiceKey))
        assert key not in (row.token_hash, row.prefix) and row.token_hash != key

    assert client.delete(f"/api/v1/service-keys/{key_id}", headers=admin).status_code == 204
    refused = client.get("/api/v1/uploads", headers=_as(key, "A"))
    assert refused.status_code == 401
    assert client.get("/api/v1/service-keys", headers=admin).get_json()["keys"][0]["revoked_at"]

    # The CLI sees and revokes the same keys.
    other = _new_key(broker, "uploads:read")
    runner = broker.test_cli_runner()
    listing = runner.invoke(args=["service-keys", "list"]).output
    assert key_id in listing and "revoked" in listing and other not in listing
    with broker.app_context():
        other_id = db.session.scalar(
            sa.select(ServiceKey.public_id).where(ServiceKey.revoked_at.is_(None))
        )
    assert runner.invoke(args=["service-keys", "revoke", other_id]).exit_code == 0
    assert client.get("/api/v1/uploads", headers=_as(other, "A")).status_code == 401


def test_only_admins_create_keys_and_scopes_are_checked(broker, make_user, bearer) -> None:
    client = broker.test_client()
    user = bearer(broker, make_user("alice"))
    admin = bearer(broker, make_user("root", is_admin=True))
    body = {"name": "shop", "scopes": ["uploads:read"]}
    assert client.post("/api/v1/service-keys", json=body, headers=user).status_code == 403
    bad = client.post(
        "/api/v1/service-keys", json={"name": "x", "scopes": ["everything"]}, headers=admin
    )
    assert bad.status_code == 422 and bad.get_json()["error"]["details"][0]["field"] == "scopes"
    cli = broker.test_cli_runner().invoke(
        args=["service-keys", "create", "x", "--scope", "everything"]
    )
    assert cli.exit_code != 0


def test_a_deactivated_external_user_is_refused(broker, emulator) -> None:
    key = _new_key(broker, *ALL)
    client = broker.test_client()
    assert client.post("/api/v1/uploads", json={}, headers=_as(key, "A")).status_code == 201
    with broker.app_context():
        account = db.session.scalar(sa.select(User).where(User.external_subject == "A"))
        users.deactivate(db.session, account)
        db.session.commit()
    refused = client.get("/api/v1/me", headers=_as(key, "A"))
    assert refused.status_code == 403
    assert refused.get_json()["error"]["code"] == "account_deactivated"


def test_keys_with_another_issuer_act_for_other_accounts(broker, emulator) -> None:
    shop = _new_key(broker, *ALL)
    blog = _new_key(broker, *ALL, issuer="blog")
    client = broker.test_client()
    # The first write creates each account.
    a_shop = client.post("/api/v1/uploads", json={}, headers=_as(shop, "A")).get_json()["owner"]
    a_blog = client.post("/api/v1/uploads", json={}, headers=_as(blog, "A")).get_json()["owner"]
    assert a_shop != a_blog
    # A replacement key in the same namespace acts for the same accounts.
    again = _new_key(broker, "uploads:read")
    assert client.get("/api/v1/me", headers=_as(again, "A")).get_json()["public_id"] == a_shop


def test_a_non_ascii_on_behalf_of_is_read_as_utf8(broker) -> None:
    """The header's bytes are UTF-8 (WSGI gives them as latin-1 text): "José" is one account,
    stored as "José", and bytes that are not UTF-8 are a 400."""
    key = _new_key(broker, "uploads:read", "uploads:write")
    client = broker.test_client()
    on_the_wire = "José".encode().decode("latin-1")  # what the server receives as text
    for _ in range(2):  # a write creates the account (a read would not): the same one twice
        gone = client.delete("/api/v1/uploads/nothing-here", headers=_as(key, on_the_wire))
        assert gone.status_code == 404, gone.get_data(as_text=True)
    assert list(_accounts(broker)) == ["José"]
    assert client.get("/api/v1/me", headers=_as(key, on_the_wire)).status_code == 200
    refused = client.get("/api/v1/me", headers=_as(key, "Jos\xe9"))  # latin-1, not UTF-8
    assert refused.status_code == 400
    assert refused.get_json()["error"]["code"] == "invalid_on_behalf_of"

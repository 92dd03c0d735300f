"""Accounts of the app's own users beside the broker's own: a read creates no account, and
every listing of users shows each account's namespace, so `On-Behalf-Of: demo` is never taken
for the local demo."""

from __future__ import annotations

import functools

import sqlalchemy as sa
from flask import Blueprint
from flask_login import current_user

from broker.api import spec
from broker.api.spec import endpoint
from broker.auth.models import User
from broker.platform.db import db
from tests.factories import bearer_header, log_in


def _users(app) -> list[tuple[str, str | None]]:
    with app.app_context():
        rows = db.session.execute(sa.select(User.username, User.external_issuer).order_by(User.id))
        return [tuple(r) for r in rows]


def _service_key(app, admin) -> str:
    created = app.test_client().post(
        "/api/v1/service-keys",
        json={"name": "shop", "scopes": ["uploads:read", "uploads:write", "images:urls"]},
        headers=admin,
    )
    assert created.status_code == 201, created.get_json()
    return created.get_json()["key"]


def test_reads_create_no_account(app, make_user, bearer, emulator) -> None:
    admin = bearer(app, make_user("root", is_admin=True))
    key = _service_key(app, admin)
    client = app.test_client()
    as_customer = {**bearer_header(key), "On-Behalf-Of": "customer-1"}
    before = _users(app)

    assert client.get("/api/v1/uploads/0123456789abcdef", headers=as_customer).status_code == 404
    listed = client.get("/api/v1/uploads", headers=as_customer)
    assert listed.status_code == 200 and listed.get_json()["items"] == []
    me = client.get("/api/v1/me", headers=as_customer).get_json()
    assert me == {
        "public_id": None,
        "username": "customer-1",
        "namespace": "service-keys",
        "is_admin": False,
    }
    # Someone else's upload stays out of reach of an account that does not exist.
    mine = client.post("/api/v1/uploads", json={}, headers=admin).get_json()
    assert client.get(f"/api/v1/uploads/{mine['id']}", headers=as_customer).status_code == 404
    # A batch of signed URLs is a read sent as a POST: none of them, and no account either.
    batch = {"items": [{"id": mine["id"], "variant": "thumb"}]}
    minted = client.post("/api/v1/images/urls", json=batch, headers=as_customer)
    assert minted.status_code == 200, minted.get_json()
    [item] = minted.get_json()["items"]
    assert item["url"] is None and item["error"]["code"] == "not_found"
    assert _users(app) == before

    # The first write creates it.
    created = client.post("/api/v1/uploads", json={}, headers=as_customer)
    assert created.status_code == 201
    assert _users(app) == [*before, ("customer-1", "service-keys")]
    me = client.get("/api/v1/me", headers=as_customer).get_json()
    assert me["public_id"] == created.get_json()["owner"]
    shown = client.get(f"/api/v1/uploads/{created.get_json()['id']}", headers=as_customer)
    assert shown.status_code == 200


def test_a_demo_of_the_app_is_not_the_local_demo(app, make_user, bearer, emulator) -> None:
    make_user("demo")
    admin_user = make_user("root", is_admin=True)
    key = _service_key(app, bearer(app, admin_user))
    client = app.test_client()
    as_demo = {**bearer_header(key), "On-Behalf-Of": "demo"}
    assert client.post("/api/v1/uploads", json={}, headers=as_demo).status_code == 201
    assert client.get("/api/v1/me", headers=as_demo).get_json()["namespace"] == "service-keys"

    listed = app.test_cli_runner().invoke(args=["users", "list"])
    assert listed.exit_code == 0, listed.output
    rows = [line.split()[:2] for line in listed.output.splitlines()]
    assert rows[0] == ["USERNAME", "NAMESPACE"]
    assert sorted(rows[1:]) == [["demo", "local"], ["demo", "service-keys"], ["root", "local"]]

    page = app.test_client()
    log_in(page, "root")
    html = page.get("/admin").get_data(as_text=True)
    assert '<th scope="col">Namespace</th>' in html
    assert "<td>demo</td><td>local</td>" in html
    assert "<td>demo</td><td>service-keys</td>" in html


def test_a_route_declared_reads_only_creates_no_account(make_app, make_user, bearer) -> None:
    """`@endpoint(reads_only=True)` is what the middleware asks: such a POST creates no account
    for an app's user, while the same route undeclared creates one."""
    bp = Blueprint("lookups", __name__, url_prefix="/api/v1/lookups")
    before = list(spec.OPERATIONS)
    try:
        declared = functools.partial(
            endpoint, bp, "POST", responses={200: None}, scope="images:urls"
        )

        @declared("/query", reads_only=True)
        def query() -> tuple[str, int]:
            """Answer the caller's account id (empty: an account that is never stored)."""
            return str(current_user.public_id or ""), 200

        @declared("/write")
        def write() -> tuple[str, int]:
            """Answer the caller's account id."""
            return str(current_user.public_id or ""), 200

        app = make_app()
        app.register_blueprint(bp)
    finally:
        spec.OPERATIONS[:] = before
    key = _service_key(app, bearer(app, make_user("root", is_admin=True)))
    as_customer = {**bearer_header(key), "On-Behalf-Of": "customer-2"}
    client = app.test_client()
    known = _users(app)

    answered = client.post("/api/v1/lookups/query", headers=as_customer)
    assert answered.status_code == 200 and answered.text == ""
    assert _users(app) == known

    answered = client.post("/api/v1/lookups/write", headers=as_customer)
    assert answered.status_code == 200 and answered.text != ""
    assert _users(app) == [*known, ("customer-2", "service-keys")]

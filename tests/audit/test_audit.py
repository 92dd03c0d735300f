"""The audit log: every administrative route and command writes exactly one entry, with its
actor, request id and before/after, and never a secret; `flask audit` and the API read it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click
import sqlalchemy as sa
from flask import Flask

from broker.api import spec
from broker.audit.models import AuditRecord
from broker.platform.db import db
from tests import factories

# Commands that change nothing an administrator answers for, each with why.
NOT_AUDITED = {
    "worker": "runs the background jobs (what they change is theirs, not an admin's)",
    "db": "schema migrations (Flask-Migrate), not a change of accounts, keys or endpoints",
    "encryption generate-key": "prints a new key; stores nothing",
    "encryption check": "reads only",
    "encryption reencrypt": "re-encrypts the same secrets under the newest key: no value changes",
    "routes": "Flask's own: reads only",
    "shell": "Flask's own: an interactive shell",
    "run": "Flask's own: the development server",
    "usage": "stores Cloudflare's own image count (a reading, not an admin's change)",
}
# Read-only commands (listings and views).
READ_ONLY = {"list", "show", "deliveries", "audit"}


@dataclass
class World:
    """What every case may use: the app, an admin's and a user's bearer headers, an endpoint."""

    app: Flask
    admin: dict[str, str]
    alice: Any
    endpoint_id: str
    secrets: list[str] = field(default_factory=list)

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the API as the admin; remember any secret the answer shows."""
        response = self.app.test_client().open(
            path, method=method, headers={**self.admin, **kwargs.pop("headers", {})}, **kwargs
        )
        assert response.status_code < 300, response.text
        body = response.get_json(silent=True) or {}
        for name in ("secret", "key", "token"):
            if isinstance(body.get(name), str):
                self.secrets.append(body[name])
        return body

    def cli(self, *args: str, stdin: str | None = None) -> str:
        """Run a `flask` command; remember what it printed (secrets are printed once)."""
        result = self.app.test_cli_runner().invoke(args=list(args), input=stdin)
        assert result.exit_code == 0, result.output
        self.secrets.extend(w for w in result.output.split() if w.startswith(("brk_", "bsk_")))
        self.secrets.extend(w for w in result.output.split() if w.startswith("whsec_"))
        return result.output

    def delivery_id(self) -> int:
        """Queue one event and return its delivery's id."""
        from broker.webhooks.models import WebhookDelivery

        factories.queue_events(self.app, 1)
        with self.app.app_context():
            return int(db.session.scalar(sa.select(sa.func.max(WebhookDelivery.id))))


API_CASES: dict[tuple[str, str], tuple[str, Callable[[World], None]]] = {
    ("POST", "/api/v1/service-keys"): (
        "service_key.created",
        lambda w: w.api(
            "POST", "/api/v1/service-keys", json={"name": "b", "scopes": ["uploads:read"]}
        ),
    ),
    ("DELETE", "/api/v1/service-keys/<key_id>"): (
        "service_key.revoked",
        lambda w: w.api("DELETE", f"/api/v1/service-keys/{_service_key(w)}"),
    ),
    ("PUT", "/api/v1/users/<public_id>/upload-limits"): (
        "user.limits_changed",
        lambda w: w.api(
            "PUT",
            f"/api/v1/users/{w.alice.public_id}/upload-limits",
            json={"max_pending_uploads": 3, "max_uploads_per_day": 9},
        ),
    ),
    ("POST", "/api/v1/webhooks/endpoints"): (
        "webhook_endpoint.created",
        lambda w: w.api(
            "POST", "/api/v1/webhooks/endpoints", json={"url": _url(w), "events": ["*"]}
        ),
    ),
    ("PATCH", "/api/v1/webhooks/endpoints/<endpoint_id>"): (
        "webhook_endpoint.updated",
        lambda w: w.api(
            "PATCH", f"/api/v1/webhooks/endpoints/{w.endpoint_id}", json={"active": False}
        ),
    ),
    ("POST", "/api/v1/webhooks/endpoints/<endpoint_id>/rotate-secret"): (
        "webhook_endpoint.secret_rotated",
        lambda w: w.api(
            "POST", f"/api/v1/webhooks/endpoints/{w.endpoint_id}/rotate-secret", json={}
        ),
    ),
    ("POST", "/api/v1/webhooks/deliveries/<id:delivery_id>/redeliver"): (
        "webhook_delivery.redelivered",
        lambda w: w.api("POST", f"/api/v1/webhooks/deliveries/{w.delivery_id()}/redeliver"),
    ),
    ("POST", "/api/v1/erasures"): (
        "user.erasure_requested",
        lambda w: w.api("POST", "/api/v1/erasures", json={"user": _new_user(w, "erin")}),
    ),
}
PAGE_CASES: dict[tuple[str, str], tuple[str, Callable[[World], None]]] = {
    ("POST", "/admin/deliveries/<id:delivery_id>/redeliver"): (
        "webhook_delivery.redelivered",
        lambda w: _page_post(w, f"/admin/deliveries/{w.delivery_id()}/redeliver"),
    ),
}
CLI_CASES: dict[str, tuple[str, Callable[[World], None]]] = {
    "users create": (
        "user.created",
        lambda w: w.cli("users", "create", "carol", "--password-stdin", stdin="long enough pw 1\n"),
    ),
    "users set-password": (
        "user.password_set",
        lambda w: w.cli(
            "users", "set-password", "alice", "--password-stdin", stdin="another pw 22\n"
        ),
    ),
    "users deactivate": ("user.deactivated", lambda w: w.cli("users", "deactivate", "alice")),
    "users activate": ("user.activated", lambda w: w.cli("users", "activate", "alice")),
    "tokens create": ("token.created", lambda w: w.cli("tokens", "create", "alice")),
    "tokens revoke": ("token.revoked", lambda w: w.cli("tokens", "revoke", _token(w))),
    "service-keys create": (
        "service_key.created",
        lambda w: w.cli("service-keys", "create", "backend", "--scope", "uploads:write"),
    ),
    "service-keys revoke": (
        "service_key.revoked",
        lambda w: w.cli("service-keys", "revoke", _service_key(w)),
    ),
    "keys sync": ("signing_keys.synced", lambda w: w.cli("keys", "sync")),
    "keys rotate": ("signing_key.rotated", lambda w: w.cli("keys", "rotate")),
    "variants sync": ("variants.synced", lambda w: w.cli("variants", "sync")),
    "users erase": (
        "user.erasure_requested",
        lambda w: w.cli("users", "erase", _new_user(w, "frank")),
    ),
    "reconcile": ("reconcile.applied", lambda w: w.cli("reconcile")),
    "webhooks add": (
        "webhook_endpoint.created",
        lambda w: w.cli("webhooks", "add", _url(w), "--events", "*"),
    ),
    "webhooks rotate-secret": (
        "webhook_endpoint.secret_rotated",
        lambda w: w.cli("webhooks", "rotate-secret", w.endpoint_id),
    ),
    "webhooks disable": (
        "webhook_endpoint.disabled",
        lambda w: w.cli("webhooks", "disable", w.endpoint_id),
    ),
    "webhooks enable": (
        "webhook_endpoint.enabled",
        lambda w: w.cli("webhooks", "enable", w.endpoint_id),
    ),
    "webhooks redeliver": (
        "webhook_delivery.redelivered",
        lambda w: w.cli("webhooks", "redeliver", str(w.delivery_id())),
    ),
}


def _url(w: World) -> str:
    return w.app.config["_AUDIT_RECEIVER_URL"]


def _service_key(w: World) -> str:
    created = w.api("POST", "/api/v1/service-keys", json={"name": "x", "scopes": ["uploads:read"]})
    return str(created["id"])


def _new_user(w: World, name: str) -> str:
    """Create an account (its own `user.created` entry first); return its public id."""
    out = w.cli("users", "create", name, "--password-stdin", stdin="long enough pw 1\n")
    return out.split("(")[1].split(")")[0]


def _token(w: World) -> str:
    from broker.auth.models import ApiToken

    w.cli("tokens", "create", "alice")
    with w.app.app_context():
        return str(db.session.scalar(sa.select(ApiToken.public_id).order_by(ApiToken.id.desc())))


def _page_post(w: World, path: str) -> None:
    client = w.app.test_client()
    factories.log_in(client, "root")
    response = client.post(path, data={"csrf_token": factories.csrf_token(client)})
    assert response.status_code == 302, response.text


def admin_routes(app: Flask) -> set[tuple[str, str]]:
    """Every route that changes something and only an administrator may call."""
    found = {
        (op.method.upper(), op.prefix + rule.rule.removeprefix(op.prefix))
        for op in spec.OPERATIONS
        for rule in app.url_map.iter_rules()
        if op.admin
        and op.method not in ("get", "head", "options")
        and rule.rule == op.prefix + _rule_of(op, rule)
    }
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/admin") and "POST" in (rule.methods or ()):
            found.add(("POST", rule.rule))
    return found


def _rule_of(op: Any, rule: Any) -> str:
    """The Flask rule behind an operation (its path has `{name}` where Flask has `<conv:name>`)."""
    import re

    converted = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule.removeprefix(op.prefix))
    return rule.rule.removeprefix(op.prefix) if converted == op.path else "\0"


def changing_commands(group: click.Group, prefix: str = "") -> set[str]:
    """Every `flask` command, by its full name, that may change something."""
    found: set[str] = set()
    for name, command in group.commands.items():
        full = f"{prefix}{name}"
        if full in NOT_AUDITED:
            continue
        if isinstance(command, click.Group):
            found |= changing_commands(command, full + " ")
        elif name not in READ_ONLY:
            found.add(full)
    return found


def _world(make_app: Callable[..., Flask], make_user: Callable[..., Any], receiver: Any) -> World:
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True, _AUDIT_RECEIVER_URL=receiver.url)
    root = make_user("root", is_admin=True)
    alice = make_user("alice")
    endpoint_id, _ = factories.add_webhook_endpoint(app, receiver.url)
    with app.app_context():
        from broker.webhooks.models import WebhookEndpoint

        public_id = db.session.get(WebhookEndpoint, endpoint_id).public_id
    return World(app, factories.issue_token(app, root), alice, public_id)


def _entries(app: Flask) -> list[AuditRecord]:
    with app.app_context():
        rows = list(db.session.scalars(sa.select(AuditRecord).order_by(AuditRecord.id)))
        db.session.expunge_all()
        return rows


def test_every_admin_route_and_command_writes_exactly_one_entry(make_app, make_user, receiver):
    """Walk every admin-only write route and every changing `flask` command: each adds one
    entry naming its action, actor and request, and no entry holds a secret anyone was shown."""
    w = _world(make_app, make_user, receiver)
    assert admin_routes(w.app) == set(API_CASES) | set(PAGE_CASES)
    assert changing_commands(w.app.cli) == set(CLI_CASES)

    cases = [(f"{m} {p}", *case) for (m, p), case in {**API_CASES, **PAGE_CASES}.items()]
    cases += [(f"flask {name}", *case) for name, case in CLI_CASES.items()]
    for label, action, run in cases:
        seen = {e.id for e in _entries(w.app)}
        run(w)
        new = [e for e in _entries(w.app) if e.id not in seen and e.action == action]
        others = [e for e in _entries(w.app) if e.id not in seen and e.action != action]
        # A case's own setup (a service key to revoke) may write its entry first.
        assert len(new) == 1, (label, [e.action for e in new])
        assert all(o.action.endswith(".created") for o in others), (label, others)
        entry = new[0]
        assert entry.request_id, label
        if label.startswith("flask"):
            assert entry.actor.startswith("cli:"), label
        else:
            assert entry.actor.startswith("user:") and "(root)" in entry.actor, label

    everything = json.dumps([[e.before, e.after, e.target] for e in _entries(w.app)])
    assert w.secrets and not [s for s in w.secrets if s in everything]
    for word in ("password_hash", "token_hash", "whsec_", "bsk_", "brk_", '"secret"', '"value"'):
        assert word not in everything


def test_entries_carry_before_after_and_the_request_id(make_app, make_user, receiver):
    """A limits change records the old and new limits and the X-Request-ID the admin got; a
    refused change (a 404) records nothing."""
    w = _world(make_app, make_user, receiver)
    client = w.app.test_client()
    path = f"/api/v1/users/{w.alice.public_id}/upload-limits"
    body = {"max_pending_uploads": 4, "max_uploads_per_day": None}
    response = client.put(path, json=body, headers=w.admin)
    assert response.status_code == 200
    missing = client.put("/api/v1/users/u_nobody/upload-limits", json=body, headers=w.admin)
    assert missing.status_code == 404
    [entry] = _entries(w.app)
    assert entry.action == "user.limits_changed" and entry.target == w.alice.public_id
    assert entry.request_id == response.headers["X-Request-ID"]
    assert entry.before == {"max_pending_uploads": None, "max_uploads_per_day": None}
    assert entry.after == {"max_pending_uploads": 4, "max_uploads_per_day": None}


def test_a_service_key_is_the_actor_of_what_it_changes(make_app, make_user, receiver):
    """A backend managing webhooks with its service key is named as the actor."""
    w = _world(make_app, make_user, receiver)
    key = w.api("POST", "/api/v1/service-keys", json={"name": "b", "scopes": ["webhooks:manage"]})
    response = w.app.test_client().post(
        f"/api/v1/webhooks/endpoints/{w.endpoint_id}/rotate-secret",
        json={},
        headers=factories.bearer_header(key["key"]),
    )
    assert response.status_code == 200
    entry = _entries(w.app)[-1]
    assert entry.action == "webhook_endpoint.secret_rotated"
    assert entry.actor == f"service-key:{key['id']}"


def test_read_by_the_api_the_command_and_the_admin_page(make_app, make_user, receiver, login):
    """`GET /api/v1/audit` (admins only, filters and pages), `flask audit` (table and JSON) and
    the admin page show the same entries."""
    w = _world(make_app, make_user, receiver)
    w.cli("users", "deactivate", "alice")
    w.cli("users", "activate", "alice")
    w.cli("webhooks", "disable", w.endpoint_id)
    client = w.app.test_client()
    items = client.get("/api/v1/audit", headers=w.admin).get_json()["items"]
    assert [i["action"] for i in items] == [
        "webhook_endpoint.disabled",
        "user.activated",
        "user.deactivated",
    ]
    assert items[2]["before"]["active"] is True and items[2]["after"]["active"] is False
    older = client.get(
        "/api/v1/audit", query_string={"before": items[0]["id"], "limit": 1}, headers=w.admin
    )
    assert [i["action"] for i in older.get_json()["items"]] == ["user.activated"]
    only = client.get("/api/v1/audit?action=user.deactivated", headers=w.admin).get_json()
    assert [i["target"] for i in only["items"]] == [w.alice.public_id]
    alice = factories.issue_token(w.app, "alice")
    assert client.get("/api/v1/audit", headers=alice).status_code == 403
    assert client.get("/api/v1/audit?limit=0", headers=w.admin).status_code == 422

    table = w.cli("audit")
    assert "user.deactivated" in table and w.alice.public_id in table and "cli:" in table
    lines = [json.loads(x) for x in w.cli("audit", "--json", "--limit", "1").splitlines()]
    assert [x["action"] for x in lines] == ["webhook_endpoint.disabled"]
    assert lines[0]["after"]["active"] is False

    page = w.app.test_client()
    login(page, "root")
    html = page.get("/admin").text
    assert (
        "Audit log" in html and "user.deactivated" in html and "webhook_endpoint.disabled" in html
    )

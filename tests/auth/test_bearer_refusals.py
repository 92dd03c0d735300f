"""Refused bearer credentials per RFC 6750: a distinct code in the JSON body and the same
words in `WWW-Authenticate: Bearer … error="invalid_token", error_description="…"`; nothing
said about anyone else's tokens. And `Retry-After` only where waiting helps."""

from __future__ import annotations

import re
from datetime import timedelta

import time_machine

from broker.auth import tokens
from broker.platform import bearer
from broker.platform.db import utcnow
from tests.factories import PASSWORD, bearer_header

CHALLENGE = re.compile(r'^Bearer realm="api", error="invalid_token", error_description="([ -~]+)"$')


def _refusal(client, headers):
    """The 401's body code and the challenge's description (checked against RFC 6750)."""
    response = client.get("/api/v1/uploads", headers=headers)
    assert response.status_code == 401
    match = CHALLENGE.match(response.headers["WWW-Authenticate"])
    assert match, response.headers["WWW-Authenticate"]
    assert '"' not in match.group(1) and "\\" not in match.group(1)
    error = response.get_json()["error"]
    assert error["message"] == match.group(1)
    assert "Retry-After" not in response.headers  # waiting does not help
    return error["code"]


def test_each_refused_token_says_why(app, make_user, bearer) -> None:
    client = app.test_client()
    alice = bearer(app, make_user("alice"))
    assert client.get("/api/v1/uploads", headers=alice).status_code == 200

    # Never issued, or a near copy of a real one: the same answer, naming no one.
    secret = alice["Authorization"].removeprefix("Bearer ")
    forged = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    made_up = tokens.new_secret(tokens.PREFIX)
    assert _refusal(client, bearer_header(forged)) == "token_invalid"
    assert _refusal(client, bearer_header(made_up)) == "token_invalid"
    assert _refusal(client, bearer_header("not-a-token-at-all")) == "token_invalid"

    with time_machine.travel(utcnow() + tokens.DEFAULT_TTL + timedelta(days=1), tick=False):
        assert _refusal(client, alice) == "token_expired"

    assert client.delete("/api/v1/auth/tokens/current", headers=alice).status_code == 204
    assert _refusal(client, alice) == "token_revoked"


def test_no_credential_is_a_plain_challenge(app) -> None:
    """RFC 6750 §3.1: a request without credentials gets no error code in the challenge."""
    response = app.test_client().get("/api/v1/uploads")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert response.get_json()["error"]["code"] == "unauthorized"


def test_a_revoked_service_key_says_so(app, make_user, bearer) -> None:
    admin = bearer(app, make_user("root", is_admin=True))
    client = app.test_client()
    created = client.post(
        "/api/v1/service-keys", json={"name": "shop", "scopes": ["uploads:read"]}, headers=admin
    ).get_json()
    key = {**bearer_header(created["key"]), "On-Behalf-Of": "u-1"}
    assert client.get("/api/v1/uploads", headers=key).status_code == 200
    assert client.delete(f"/api/v1/service-keys/{created['id']}", headers=admin).status_code == 204
    assert _refusal(client, key) == "token_revoked"
    unknown = {**bearer_header("bsk_" + "x" * 43), "On-Behalf-Of": "u-1"}
    assert _refusal(client, unknown) == "token_invalid"


def test_every_refusal_code_is_documented(app) -> None:
    spec = app.test_client().get("/api/v1/openapi.json").get_json()
    documented = {
        code
        for path in spec["paths"].values()
        for op in path.values()
        if isinstance(op, dict)
        for code in _codes(op.get("responses", {}).get("401", {}))
    }
    assert {r.code for r in bearer.REFUSALS.values()} | {"unauthorized"} <= documented


def _codes(response):
    content = response.get("content", {}).get("application/json", {})
    examples = content.get("examples", {})
    return {e["value"]["error"]["code"] for e in examples.values()}


def test_a_new_token_and_a_wrong_password_carry_no_retry_after(app, make_user) -> None:
    make_user("alice")
    client = app.test_client()
    body = {"username": "alice", "password": PASSWORD, "device_name": "x"}
    created = client.post("/api/v1/auth/tokens", json=body)
    wrong = client.post("/api/v1/auth/tokens", json={**body, "password": "wrong password!!"})
    assert created.status_code == 201 and wrong.status_code == 401
    for response in (created, wrong):
        assert "Retry-After" not in response.headers
        assert "X-RateLimit-Limit" in response.headers  # the limit did apply to this route

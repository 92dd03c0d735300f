"""The README's retry table is keyed on error codes: it names exactly the codes the API
documents, and every one of them is produced and asserted by some test (the few that no other
test produces are produced here)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.factories import post_upload

ROOT = Path(__file__).resolve().parents[2]
CODE = re.compile(r"`([a-z][a-z0-9_]*)`")
# Documented only where an OpenID Connect issuer is configured (the document is per app).
WITH_AN_ISSUER = {"identity_provider_unavailable"}


def retry_table_codes() -> set[str]:
    """The error codes in the first column of the README's retry table."""
    text = (ROOT / "README.md").read_text()
    start = text.index("| code (status) | what to do |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1])
    codes = {code for cell in rows for code in CODE.findall(cell)}
    return codes - {"complete", "202"}


def documented_codes(app) -> set[str]:
    """Every error code the OpenAPI document gives an example of."""
    spec = app.test_client().get("/api/v1/openapi.json").get_json()
    codes = set()
    for operations in spec["paths"].values():
        for op in operations.values():
            if not isinstance(op, dict):
                continue
            for response in op.get("responses", {}).values():
                examples = response.get("content", {}).get("application/json", {})
                for example in examples.get("examples", {}).values():
                    value = example.get("value")
                    if isinstance(value, dict) and "error" in value:
                        codes.add(value["error"]["code"])
    return codes


def test_the_retry_table_names_every_documented_code_and_no_other(app) -> None:
    table = retry_table_codes()
    documented = documented_codes(app) | WITH_AN_ISSUER
    assert table - documented == set(), "in the README's table but never answered"
    assert documented - table == set(), "answered but missing from the README's table"


def test_every_code_in_the_table_is_asserted_by_a_test() -> None:
    """Each code appears as a string literal in a test's assertion or its expected values."""
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    missing = sorted(code for code in retry_table_codes() if f'"{code}"' not in sources)
    assert missing == []


def _code(response) -> str:
    return response.get_json()["error"]["code"]


def test_a_body_that_is_not_json_is_415(app, alice) -> None:
    _, auth = alice
    response = app.test_client().post(
        "/api/v1/uploads", data="metadata=x", headers={**auth, "Content-Type": "text/plain"}
    )
    assert (response.status_code, _code(response)) == (415, "unsupported_media_type")


def test_cloudflare_refusing_the_request_is_422_upstream_rejected(app, alice, emulator) -> None:
    _, auth = alice
    emulator.inject_fault("direct_upload", status=400, count=1)
    response = post_upload(app.test_client(), auth)
    assert (response.status_code, _code(response)) == (422, "upstream_rejected")


def test_an_answer_cloudflare_should_not_give_is_502_upstream_error(app, alice, emulator) -> None:
    _, auth = alice
    emulator.inject_fault("direct_upload", status=404, count=1)
    response = post_upload(app.test_client(), auth)
    assert (response.status_code, _code(response)) == (502, "upstream_error")


def test_service_key_refusals(app, make_user, bearer) -> None:
    admin = bearer(app, make_user("root", is_admin=True))
    client = app.test_client()
    bad_scope = client.post(
        "/api/v1/service-keys", json={"name": "shop", "scopes": ["everything"]}, headers=admin
    )
    assert (bad_scope.status_code, _code(bad_scope)) == (422, "invalid_scope")
    bad_issuer = client.post(
        "/api/v1/service-keys",
        json={"name": "shop", "scopes": ["uploads:read"], "issuer": " "},
        headers=admin,
    )
    assert (bad_issuer.status_code, _code(bad_issuer)) == (422, "invalid_issuer")
    key = client.post(
        "/api/v1/service-keys", json={"name": "shop", "scopes": ["uploads:read"]}, headers=admin
    ).get_json()["key"]
    response = client.get(
        "/api/v1/uploads",
        headers={"Authorization": f"Bearer {key}", "On-Behalf-Of": " padded "},
    )
    assert (response.status_code, _code(response)) == (400, "invalid_on_behalf_of")

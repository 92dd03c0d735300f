"""Every status the uploads endpoints document is produced here, and every answer validates
against the OpenAPI document (the SpecCheckingClient checks each response it sees)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from broker import create_app
from broker.api.spec import openapi_document
from tests.conftest import base_config

OPERATIONS = {
    ("post", "/api/v1/uploads"),
    ("get", "/api/v1/uploads"),
    ("get", "/api/v1/uploads/{upload_id}"),
    ("delete", "/api/v1/uploads/{upload_id}"),
    ("get", "/api/v1/users/{public_id}/upload-limits"),
    ("put", "/api/v1/users/{public_id}/upload-limits"),
}


def test_every_documented_status_is_answered_and_valid(
    make_app, make_user, bearer, login, emulator, tmp_path
) -> None:
    app = make_app(MAX_PENDING_UPLOADS=3)
    client = app.test_client()
    # Only the calls meant to time out use a short timeout (on an app of their own): a loaded
    # CI box must not turn an ordinary call into a 504. Their answer is held back three times
    # the timeout, and a slower box only delays it more: they time out however slow it is.
    impatient = make_app(MAX_PENDING_UPLOADS=3, CLOUDFLARE_TIMEOUT=0.3).test_client()
    alice = make_user("alice")
    auth = bearer(app, alice)
    admin = bearer(app, make_user("root", is_admin=True))
    seen: dict[tuple[str, str], set[int]] = defaultdict(set)

    def call(
        method: str, template: str, path: str | None = None, *, via: Any = client, **kwargs: Any
    ) -> Any:
        response = via.open(path or template, method=method.upper(), **kwargs)
        seen[(method, template)].add(response.status_code)
        return response

    post, one = "/api/v1/uploads", "/api/v1/uploads/{upload_id}"
    # First, while the budget is not paused: DELETE's 502 and 504.
    seen[("delete", one)] |= _delete_upstream_statuses(make_app, make_user, bearer, emulator)
    limits = "/api/v1/users/{public_id}/upload-limits"
    mine = call("post", post, json={}, headers=auth).get_json()
    item = one.replace("{upload_id}", mine["id"])
    call("post", post, json={}, headers={**auth, "Idempotency-Key": ""})  # 400
    call("post", post, json={})  # 401
    call("post", post, json={"id": "dup", "require_signed_urls": False}, headers=auth)
    call("post", post, json={"id": "dup", "require_signed_urls": False}, headers=auth)  # 409
    call("post", post, json={"expires_in": 1}, headers=auth)  # 422
    _body_refusals(call, "post", post, post, auth)  # 400, 413, 415
    browser = app.test_client()
    login(browser, "alice")
    call("post", post, json={}, via=browser)  # 403: a session without its CSRF token
    call("post", post, json={}, headers=auth)
    call("post", post, json={}, headers=auth)  # 429: three pending
    call("delete", one, item, headers=auth)
    emulator.inject_fault("direct_upload", status=500, count=1)
    call("post", post, json={}, headers=auth)  # 502
    emulator.inject_fault("direct_upload", latency_ms=900, count=1)
    call("post", post, json={}, headers=auth, via=impatient)  # 504
    emulator.inject_fault("direct_upload", status=429, count=1)
    call("post", post, json={}, headers=auth)  # 503

    call("get", post, headers=auth)
    call("get", post)
    call("get", post, "/api/v1/uploads?scope=all", headers=auth)
    call("get", post, "/api/v1/uploads?limit=0", headers=auth)

    call("get", one, item, headers=auth)
    call("get", one, item)
    call("get", one, one.replace("{upload_id}", "nope"), headers=auth)

    call("delete", one, item)
    call("delete", one, item, via=browser)  # 403: no CSRF token
    call("delete", one, one.replace("{upload_id}", "nope"), headers=auth)
    listed = client.get(post, headers=auth).get_json()["items"]
    targets = [u for u in listed if u["status"] == "pending"]
    # The 429 above paused the shared budget: DELETE now answers 503 without calling upstream.
    call("delete", one, one.replace("{upload_id}", targets[0]["id"]), headers=auth)

    mine_limits = limits.replace("{public_id}", alice.public_id)
    call("get", limits, mine_limits, headers=admin)
    call("get", limits, mine_limits)
    call("get", limits, mine_limits, headers=auth)
    call("get", limits, limits.replace("{public_id}", "u_nobody"), headers=admin)
    call("put", limits, mine_limits, json={"max_pending_uploads": 5}, headers=admin)
    call("put", limits, mine_limits, json={})
    call("put", limits, mine_limits, json={}, headers=auth)
    call("put", limits, limits.replace("{public_id}", "u_nobody"), json={}, headers=admin)
    call("put", limits, mine_limits, json={"max_pending_uploads": -1}, headers=admin)
    _body_refusals(call, "put", limits, mine_limits, admin)

    # A service key naming its user badly: refused before any route (400 on every one).
    runner = app.test_cli_runner()
    made = runner.invoke(args=["service-keys", "create", "backend", "--scope", "uploads:write"])
    key = {"Authorization": f"Bearer {made.stdout.splitlines()[0]}", "On-Behalf-Of": "\x01"}
    # The same key for a user, on routes beyond its one scope: 403 insufficient_scope.
    scoped = {**key, "On-Behalf-Of": "shop-user-1"}
    for method, template in OPERATIONS:
        path = template.replace("{upload_id}", "x").replace("{public_id}", "x")
        call(method, template, path, headers=key)
        if method == "get":
            call(method, template, path, headers=scoped)

    # A database that does not answer: 503 database_unavailable on every route.
    down = create_app(base_config(f"sqlite:///{tmp_path}/missing/dir/db.sqlite3", str(tmp_path)))
    for method, template in OPERATIONS:
        path = template.replace("{upload_id}", "x").replace("{public_id}", "x")
        assert call(method, template, path, headers=auth, via=down.test_client()).status_code == 503

    documented = _documented(app)
    for op in OPERATIONS:
        assert seen[op] == documented[op], f"{op}: answered {seen[op]}, documented {documented[op]}"


def _body_refusals(call: Any, method: str, template: str, path: str, auth: Any) -> None:
    """Send what the JSON reader refuses: not JSON (400), too big (413), not JSON at all (415)."""
    json_type = {"Content-Type": "application/json"}
    assert (
        call(method, template, path, data="{nope", headers={**auth, **json_type}).status_code == 400
    )
    huge = "[" + "0," * (1 << 20) + "0]"
    assert call(method, template, path, data=huge, headers={**auth, **json_type}).status_code == 413
    plain = {**auth, "Content-Type": "text/plain"}
    assert call(method, template, path, data="max=1", headers=plain).status_code == 415


def _delete_upstream_statuses(make_app, make_user, bearer, emulator) -> set[int]:
    """DELETE's 502 and 504, on a second app sharing the database."""
    app = make_app()
    client = app.test_client()
    impatient = make_app(CLOUDFLARE_TIMEOUT=0.3).test_client()
    auth = bearer(app, make_user("bob"))
    created = client.post("/api/v1/uploads", json={}, headers=auth).get_json()
    path = f"/api/v1/uploads/{created['id']}"
    statuses = set()
    emulator.inject_fault("image_delete", status=401, count=1)
    statuses.add(client.delete(path, headers=auth).status_code)
    emulator.inject_fault("image_delete", latency_ms=900, count=1)
    statuses.add(impatient.delete(path, headers=auth).status_code)
    return statuses


def _documented(app: Any) -> dict[tuple[str, str], set[int]]:
    with app.test_request_context():
        doc = openapi_document()
    return {
        (method, path): {int(s) for s in doc["paths"][path][method]["responses"] if s != "default"}
        for method, path in OPERATIONS
    }

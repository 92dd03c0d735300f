"""The batch API: tokens from the global API, the batch host's endpoints, limit, expiry, 103."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import requests

from broker.emulator.testing import EmulatorServer, ImagesClient, make_image


def _code(resp: requests.Response) -> int:
    body = resp.json()
    assert body["success"] is False and body["result"] is None
    return int(body["errors"][0]["code"])


def _batch_token(api: ImagesClient) -> dict[str, Any]:
    resp = api.get("/v1/batch_token")
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()["result"]
    return result


class BatchClient:
    """Calls the batch host with a batch token, as Cloudflare's docs show."""

    def __init__(self, emulator: EmulatorServer, token: str, http: requests.Session) -> None:
        self.base = f"{emulator.batch_base}/images"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.http = http

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        with self.http.request(
            method, self.base + path, headers=self.headers, timeout=10, **kwargs
        ) as resp:
            resp.content  # noqa: B018 - read the body before the connection goes back
            return resp


def test_token_is_a_global_call_and_batch_calls_are_counted_apart(
    emulator: EmulatorServer, api: ImagesClient, http: requests.Session
) -> None:
    issued = _batch_token(api)
    expires = datetime.fromisoformat(issued["expiresAt"].replace("Z", "+00:00"))
    assert 3590 <= (expires - emulator.emulator.now()).total_seconds() <= 3600
    batch = BatchClient(emulator, issued["token"], http)

    # Every documented endpoint answers on the batch host, same bodies as the REST API.
    upload = batch.call("POST", "/v1", files={"file": ("a.png", make_image())})
    assert upload.status_code == 200, upload.text
    image_id = upload.json()["result"]["id"]
    draft = batch.call("POST", "/v2/direct_upload", data={"creator": "u1"}, files={"_": ""})
    assert draft.status_code == 200 and "uploadURL" in draft.json()["result"]
    assert batch.call("GET", f"/v1/{image_id}").json()["result"]["filename"] == "a.png"
    edited = batch.call("PATCH", f"/v1/{image_id}", json={"metadata": {"k": "v"}})
    assert edited.json()["result"]["meta"] == {"k": "v"}
    listed = batch.call("GET", "/v2", params={"sort_order": "desc"})
    assert [i["id"] for i in listed.json()["result"]["images"]] == [image_id]
    assert batch.call("DELETE", f"/v1/{image_id}").status_code == 200

    # Keys, variants, stats, blob and the token endpoint itself are not on the batch host.
    for path in ("/v1/keys", "/v1/variants", "/v1/stats", f"/v1/{image_id}/blob"):
        refused = batch.call("GET", path)
        assert refused.status_code == 404 and _code(refused) == 7003, path
    assert batch.call("GET", "/v1/batch_token").status_code == 404

    counters = emulator.counters()
    assert counters["batch_token"] == 1
    assert counters["batch.upload_v1"] == 1 and counters["batch.direct_upload"] == 1
    assert "upload_v1" not in counters and "direct_upload" not in counters
    kinds = emulator.kinds()
    assert kinds["global_api"] == 1  # only the token fetch
    assert kinds["batch"] == 6 + 5


def test_batch_calls_do_not_spend_the_global_limit(tmp_path: Any, http: requests.Session) -> None:
    config = {"RATE_LIMIT": 3, "RATE_WINDOW": 300}
    with EmulatorServer(tmp_path, config) as emulator, emulator.client() as api:
        batch = BatchClient(emulator, _batch_token(api)["token"], http)
        for _ in range(10):
            assert batch.call("GET", "/v2").status_code == 200
        assert api.get("/v1/stats").status_code == 200
        assert api.get("/v1/stats").status_code == 200
        assert api.get("/v1/stats").status_code == 429


def test_only_batch_tokens_are_accepted_on_the_batch_host(
    emulator: EmulatorServer, api: ImagesClient, http: requests.Session
) -> None:
    with_api_token = BatchClient(emulator, emulator.api_token, http).call("GET", "/v2")
    assert with_api_token.status_code == 401 and _code(with_api_token) == 10000
    assert BatchClient(emulator, "", http).call("GET", "/v2").status_code == 401
    token = _batch_token(api)["token"]
    # And a batch token is no API token.
    url = f"{api.base}/v1/stats"
    with http.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as resp:
        assert resp.status_code == 401


def test_tokens_expire_and_can_be_revoked(
    emulator: EmulatorServer, api: ImagesClient, http: requests.Session
) -> None:
    batch = BatchClient(emulator, _batch_token(api)["token"], http)
    assert batch.call("GET", "/v2").status_code == 200
    emulator.advance(3599)
    assert batch.call("GET", "/v2").status_code == 200
    emulator.advance(2)
    expired = batch.call("GET", "/v2")
    assert expired.status_code == 401 and _code(expired) == 10000

    fresh = BatchClient(emulator, _batch_token(api)["token"], http)
    assert fresh.call("GET", "/v2").status_code == 200
    control = http.post(f"{emulator.url}/_emulator/batch", json={"revoke": True}, timeout=10)
    assert control.status_code == 200 and control.json()["tokens"] == 0
    assert fresh.call("GET", "/v2").status_code == 401


def test_per_token_limit_answers_429_with_retry_after(
    tmp_path: Any, http: requests.Session
) -> None:
    frozen = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    # A stopped clock: the whole burst falls into one second however slow this machine is.
    with EmulatorServer(tmp_path, {"CLOCK": lambda: frozen}) as emulator, emulator.client() as api:
        first = BatchClient(emulator, _batch_token(api)["token"], http)
        second = BatchClient(emulator, _batch_token(api)["token"], http)
        answers = [first.call("GET", "/v2").status_code for _ in range(201)]
        assert answers[:200] == [200] * 200
        assert answers[200] == 429
        limited = first.call("GET", "/v2")
        assert limited.status_code == 429 and _code(limited) == 971
        assert emulator.kinds()["throttled"] == 2
        assert limited.headers["Retry-After"] == "1"
        # Each token has its own 200 per second.
        assert second.call("GET", "/v2").status_code == 200
        emulator.advance(1.01)
        assert first.call("GET", "/v2").status_code == 200


def test_forbidden_endpoint_control_answers_code_103(
    emulator: EmulatorServer, api: ImagesClient, http: requests.Session
) -> None:
    batch = BatchClient(emulator, _batch_token(api)["token"], http)
    control = f"{emulator.url}/_emulator/batch"
    set_ = http.post(control, json={"forbidden": ["list_v2", "direct_upload"]}, timeout=10)
    assert set_.json()["forbidden"] == ["direct_upload", "list_v2"]
    listed = batch.call("GET", "/v2")
    assert listed.status_code == 403
    assert listed.json()["errors"] == [{"code": 103, "message": "forbidden endpoint"}]
    assert _code(batch.call("POST", "/v2/direct_upload", files={"_": ""})) == 103
    # Other endpoints on the batch host, and the same endpoints on the global API, still work.
    assert batch.call("GET", "/v1/nope").status_code == 404
    assert api.get("/v2").status_code == 200
    assert http.get(control, timeout=10).json()["forbidden"] == ["direct_upload", "list_v2"]
    assert http.post(f"{emulator.url}/_emulator/reset", json={}, timeout=10).ok
    assert http.get(control, timeout=10).json()["forbidden"] == []


def test_each_token_is_distinct_and_can_be_revoked_alone(
    tmp_path: Any, http: requests.Session
) -> None:
    """An account holds several batch tokens at once: revoking one leaves the others working,
    and the control reports each token's calls and its busiest second."""
    frozen = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with EmulatorServer(tmp_path, {"CLOCK": lambda: frozen}) as emulator, emulator.client() as api:
        values = [_batch_token(api)["token"] for _ in range(3)]
        assert len(set(values)) == 3
        clients = [BatchClient(emulator, value, http) for value in values]
        for batch in clients:
            assert batch.call("GET", "/v2").status_code == 200
        control = f"{emulator.url}/_emulator/batch"
        revoked = http.post(control, json={"revoke_token": values[1]}, timeout=10)
        assert revoked.status_code == 200 and revoked.json()["tokens"] == 2
        refused = clients[1].call("GET", "/v2")
        assert refused.status_code == 401 and _code(refused) == 10000
        assert clients[0].call("GET", "/v2").status_code == 200
        assert clients[2].call("GET", "/v2").status_code == 200
        assert emulator.batch_token_use(values[0]) == (2, 2)
        assert http.get(control, timeout=10).json()["use"] == [
            {"calls": 2, "peak": 2},
            {"calls": 1, "peak": 1},
            {"calls": 2, "peak": 2},
        ]
        unknown = http.post(control, json={"revoke_token": "nope"}, timeout=10)
        assert unknown.status_code == 404

"""Authentication, the rate-limit model, fault injection, counters and the clock control."""

from __future__ import annotations

import pytest
import requests

from broker.emulator import create_app
from broker.emulator.testing import EmulatorServer, ImagesClient, make_image


def _code(resp: requests.Response) -> int:
    body = resp.json()
    assert body["success"] is False and body["result"] is None
    return body["errors"][0]["code"]


def test_missing_or_wrong_token_is_401(emulator: EmulatorServer, http: requests.Session) -> None:
    url = f"{emulator.url}/client/v4/accounts/{emulator.account_id}/images/v1/stats"
    with http.get(url) as missing:
        assert missing.status_code == 401 and _code(missing) == 10000
    with http.get(url, headers={"Authorization": "Bearer nope"}) as wrong:
        assert wrong.status_code == 401 and _code(wrong) == 10000
    legacy = {"X-Auth-Email": "dev@example.com", "X-Auth-Key": emulator.api_token}
    with http.get(url, headers=legacy) as ok:
        assert ok.status_code == 200


def test_other_account_is_403(emulator: EmulatorServer, http: requests.Session) -> None:
    url = f"{emulator.url}/client/v4/accounts/someone-else/images/v1/stats"
    with http.get(url, headers={"Authorization": f"Bearer {emulator.api_token}"}) as resp:
        assert resp.status_code == 403 and _code(resp) == 5403


def test_unknown_route_and_method_are_enveloped(api: ImagesClient) -> None:
    missing = api.get("/v3/whatever")
    assert missing.status_code == 404 and _code(missing) == 7003
    wrong_method = api.request("PUT", "/v2")
    assert wrong_method.status_code == 405 and _code(wrong_method) == 7001


def test_rate_limit_blocks_every_call_for_the_window(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = {"RATE_LIMIT": 5, "RATE_WINDOW": 60}
    with EmulatorServer(tmp_path, config) as emulator, emulator.client() as api:
        for _ in range(5):
            assert api.get("/v1/stats").status_code == 200
        limited = api.get("/v1/stats")
        assert limited.status_code == 429 and _code(limited) == 971
        assert limited.headers["Retry-After"] == "60"
        emulator.advance(59)
        still = api.get("/v1/keys")
        assert still.status_code == 429 and int(still.headers["Retry-After"]) == 1
        emulator.advance(2)
        assert api.get("/v1/stats").status_code == 200
        # The budget is per token: upload links and delivery are not API calls.
        draft = api.direct_upload()
        with requests.post(
            draft["uploadURL"], files={"file": ("a.png", make_image())}, timeout=10
        ) as up:
            assert up.status_code == 200


def test_sliding_window_frees_budget_as_calls_age(emulator: EmulatorServer) -> None:
    emulator.emulator.controls.limiter.limit = 3
    with emulator.client() as api:
        for _ in range(3):
            assert api.get("/v1/stats").status_code == 200
            emulator.advance(10)
        emulator.advance(300 - 30)  # the first call has left the 300 s window
        assert api.get("/v1/stats").status_code == 200


def test_control_is_disabled_by_default(tmp_path, http: requests.Session) -> None:  # type: ignore[no-untyped-def]
    with EmulatorServer(tmp_path, {"CONTROL_ENABLED": False}) as emulator:
        with http.get(f"{emulator.url}/_emulator/counters") as resp:
            assert resp.status_code == 404
        assert emulator.counters() == {}  # the in-process helpers still work


def test_counters_count_per_endpoint_and_reset(
    emulator: EmulatorServer, api: ImagesClient, http: requests.Session
) -> None:
    api.get("/v1/stats")
    api.get("/v1/stats")
    draft = api.direct_upload()
    api.get(f"/v1/{draft['id']}")
    with http.get(f"{emulator.url}/_emulator/counters") as resp:
        body = resp.json()
    assert body["counters"] == {"stats": 2, "direct_upload": 1, "image_details": 1}
    assert body["total"] == 4
    with http.post(f"{emulator.url}/_emulator/counters/reset", json={}) as resp:
        assert resp.status_code == 200
    assert emulator.counters() == {}


def test_fault_forces_a_status_a_number_of_times(
    emulator: EmulatorServer, api: ImagesClient, http: requests.Session
) -> None:
    fault = {"endpoint": "direct_upload", "status": 503, "latency_ms": 0, "count": 2}
    with http.post(f"{emulator.url}/_emulator/faults", json=fault) as resp:
        assert resp.status_code == 201
        assert resp.json()["fault"]["endpoint"] == "direct_upload"
    for _ in range(2):
        failed = api.post("/v2/direct_upload", files={"_": (None, "")})
        assert failed.status_code == 503 and _code(failed) == 5503
    assert api.get("/v1/stats").status_code == 200  # other endpoints unaffected
    assert api.post("/v2/direct_upload", files={"_": (None, "")}).status_code == 200
    with http.get(f"{emulator.url}/_emulator/faults") as resp:
        assert resp.json()["faults"] == []
    assert emulator.counters()["direct_upload"] == 3


def test_fault_error_rate_zero_never_fires_and_clear_removes(
    emulator: EmulatorServer, api: ImagesClient, http: requests.Session
) -> None:
    emulator.inject_fault("stats", status=500, error_rate=0.0)
    assert api.get("/v1/stats").status_code == 200
    emulator.inject_fault("*", status=500)
    assert api.get("/v1/keys").status_code == 500
    with http.delete(f"{emulator.url}/_emulator/faults", json={}) as resp:
        assert resp.json() == {"faults": []}
    assert api.get("/v1/keys").status_code == 200


def test_fault_can_drop_the_connection(emulator: EmulatorServer, api: ImagesClient) -> None:
    emulator.inject_fault("image_details", drop=True, count=1)
    with pytest.raises(requests.ConnectionError):
        api.get("/v1/anything")
    assert api.get("/v1/anything").status_code == 404


def test_fault_on_delivery_and_rate_limited_status(
    emulator: EmulatorServer, api: ImagesClient, http: requests.Session
) -> None:
    image = api.upload(make_image())
    emulator.inject_fault("delivery", status=502, count=1)
    with http.get(image["variants"][0]) as resp:
        assert resp.status_code == 502
    emulator.inject_fault("stats", status=429, count=1)
    limited = api.get("/v1/stats")
    assert limited.status_code == 429 and "Retry-After" in limited.headers


def test_bad_fault_descriptions_are_refused(
    emulator: EmulatorServer, http: requests.Session
) -> None:
    for bad in ({"status": 42}, {"error_rate": 2}, {"count": 0}, {"surprise": 1}, [1]):
        with http.post(f"{emulator.url}/_emulator/faults", json=bad) as resp:
            assert resp.status_code == 400, bad


def test_clock_control_moves_expiry(
    emulator: EmulatorServer, api: ImagesClient, http: requests.Session
) -> None:
    draft = api.direct_upload()
    with http.post(f"{emulator.url}/_emulator/clock", json={"advance_seconds": 1801}) as resp:
        assert resp.json()["offset_seconds"] == 1801
    with requests.post(
        draft["uploadURL"], files={"file": ("a.png", make_image())}, timeout=10
    ) as resp:
        assert resp.status_code == 410
    with http.post(f"{emulator.url}/_emulator/reset", json={}) as resp:
        assert resp.status_code == 200
    with http.get(f"{emulator.url}/_emulator/clock") as resp:
        assert resp.json()["offset_seconds"] == 0


def test_rate_limit_control(
    emulator: EmulatorServer, api: ImagesClient, http: requests.Session
) -> None:
    with http.post(f"{emulator.url}/_emulator/rate_limit", json={"limit": 1, "window": 30}) as r:
        assert r.json() == {"limit": 1, "window": 30}
    assert api.get("/v1/stats").status_code == 200
    assert api.get("/v1/stats").status_code == 429


def test_factory_reads_prefixed_environment(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("EMULATOR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("EMULATOR_RATE_LIMIT", "7")
    monkeypatch.setenv("EMULATOR_ACCOUNT_ID", "acc")
    app = create_app()
    try:
        assert app.config["RATE_LIMIT"] == 7 and app.config["ACCOUNT_ID"] == "acc"
        assert (tmp_path / "emulator.sqlite3").exists()
    finally:
        app.extensions["cf_images_emulator"].close()
    with EmulatorServer(tmp_path, {"ACCOUNT_ID": "given"}) as emulator:
        assert emulator.account_id == "given"  # an explicit config never reads the environment
        assert emulator.app.config["RATE_LIMIT"] == 1200


def test_a_request_running_across_a_reset_is_not_counted_in_the_new_peak() -> None:
    """A test's peak counts only its own requests: one an earlier test abandoned (still running at
    the emulator when the counters were reset) neither raises the new peak nor, when it ends,
    lowers the count of the requests that came after."""
    from datetime import UTC, datetime

    from broker.emulator.control import Controls

    controls = Controls(lambda: datetime(2026, 12, 6, tzinfo=UTC), 1200, 300.0)
    leftover = controls.enter("upload_url")
    controls.reset_counters()
    mine = [controls.enter("upload_url") for _ in range(3)]
    assert controls.peak_in_flight() == {"upload_url": 3}
    controls.leave("upload_url", leftover)  # the abandoned one ends now
    controls.leave("upload_url", mine[0])
    controls.enter("upload_url")  # three of mine at once again, not two
    assert controls.peak_in_flight() == {"upload_url": 3}
    controls.enter("upload_url")
    assert controls.peak_in_flight() == {"upload_url": 4}

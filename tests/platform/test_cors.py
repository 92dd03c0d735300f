"""CORS: the listed origins' pages may call /api/v1 with a bearer token; no one else may."""

from __future__ import annotations

import pytest

from broker import create_app
from broker.platform.config import ConfigError
from tests.conftest import base_config

APP = "http://127.0.0.1:3000"
OTHER = "http://127.0.0.1:4000"
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
}


@pytest.fixture
def broker(make_app):
    """The broker allowing the app's origin (written with a trailing slash, as people do)."""
    return make_app(CORS_ORIGINS=f"{APP}/, https://shop.example")


def _cors_headers(response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


def test_preflight_from_an_allowed_origin_passes(broker) -> None:
    response = broker.test_client().options("/api/v1/uploads", headers={"Origin": APP, **PREFLIGHT})
    assert response.status_code == 204
    headers = _cors_headers(response)
    assert headers["Access-Control-Allow-Origin"] == APP
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key"} <= allowed
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in headers  # never: cookies stay same-origin
    assert "Origin" in response.headers["Vary"]


def test_preflight_from_another_origin_gets_no_cors_headers(broker) -> None:
    response = broker.test_client().options(
        "/api/v1/uploads", headers={"Origin": OTHER, **PREFLIGHT}
    )
    assert _cors_headers(response) == {}


def test_answers_to_an_allowed_origin_expose_the_headers_clients_need(
    broker, make_user, bearer, emulator
) -> None:
    auth = bearer(broker, make_user("alice"))
    client = broker.test_client()
    headers = {**auth, "Origin": APP, "Idempotency-Key": "k-1"}
    first = client.post("/api/v1/uploads", json={}, headers=headers)
    replay = client.post("/api/v1/uploads", json={}, headers=headers)
    assert first.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    for response in (first, replay):
        assert response.headers["Access-Control-Allow-Origin"] == APP
        exposed = {h.strip() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"Retry-After", "Location", "Idempotent-Replayed"} <= exposed
    # Errors too, so the page can read why.
    refused = client.get("/api/v1/uploads", headers={"Origin": APP})
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == APP
    # Another origin's request still runs (CORS is the browser's rule) but is not shared with it.
    other = client.get("/api/v1/me", headers={**auth, "Origin": OTHER})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_pages_and_cookie_sessions_stay_same_origin(broker, make_user, login, emulator) -> None:
    make_user("alice")
    client = broker.test_client()
    for path in ("/auth/login", "/", "/api/v1/openapi.json"):
        response = client.get(path, headers={"Origin": APP})
        assert ("Access-Control-Allow-Origin" in response.headers) == path.startswith("/api/"), path
    preflight = client.options("/auth/login", headers={"Origin": APP, **PREFLIGHT})
    assert _cors_headers(preflight) == {}
    # A logged-in browser session calling from the app's origin still needs the CSRF token
    # (and its answers never allow credentials, so a browser would not even send the cookie).
    login(client)
    refused = client.post("/api/v1/uploads", json={}, headers={"Origin": APP})
    assert refused.status_code == 403 and refused.get_json()["error"]["code"] == "csrf_failed"
    assert "Access-Control-Allow-Credentials" not in refused.headers


def test_the_browser_module_is_importable_from_an_allowed_origin(broker) -> None:
    response = broker.test_client().get("/static/js/client.js", headers={"Origin": APP})
    response.close()  # a static file is streamed
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == APP
    assert "javascript" in response.headers["Content-Type"]


def test_without_origins_nothing_is_shared(make_app) -> None:
    response = (
        make_app().test_client().options("/api/v1/uploads", headers={"Origin": APP, **PREFLIGHT})
    )
    assert _cors_headers(response) == {}


@pytest.mark.parametrize("bad", ["*", "https://shop.example/path", "shop.example", "ftp://x"])
def test_wildcards_and_non_origins_are_refused_at_start(tmp_path, bad) -> None:
    config = base_config(f"sqlite:///{tmp_path}/x.sqlite3", str(tmp_path), CORS_ORIGINS=bad)
    with pytest.raises(ConfigError, match="BROKER_CORS_ORIGINS"):
        create_app(config)

"""One strict JSON reader: every malformed body is a 400 or a 422 on every route, never a 500."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
import time_machine
from flask import Flask

from broker.platform.db import db
from broker.uploads.models import Upload

PASSWORD = "correct horse battery"
CF_SECRET = "cf-hook-secret"
JSON = {"Content-Type": "application/json", "Accept": "application/json"}
# 1000 levels in 2 KB: enough to overflow the json module's recursion (RecursionError).
DEEP = "[" * 1000 + "]" * 1000


@pytest.fixture
def hostile_app(make_app: Callable[..., Flask]) -> Flask:
    """An app with Cloudflare's notification secret set, so /hooks/cloudflare reads bodies."""
    return make_app(CLOUDFLARE_WEBHOOK_SECRET=CF_SECRET)


def _routes(headers: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """Every route that reads a JSON body, with the headers that get it read."""
    return [
        ("/api/v1/auth/tokens", {}),  # anonymous: the rate limiter's key function reads it first
        ("/auth/login", {}),  # the login form (Flask-WTF reads a JSON body as the form)
        ("/api/v1/uploads", headers),
        ("/api/v1/images/urls", headers),
        ("/hooks/cloudflare", {"cf-webhook-auth": CF_SECRET}),
    ]


@pytest.mark.parametrize(
    "body",
    [
        DEEP,
        '{"username": ' + DEEP + "}",
        '{"metadata": ' + "{" + '"a": {' * 40 + "}" * 41 + "}",  # well-formed but 42 levels deep
        b"\xff\xfe\x00",  # not UTF-8/16/32
        b'{"username": "\xc3\x28"}',  # invalid UTF-8 inside a string
        '{"username": "alice"',  # truncated
    ],
    ids=["deep", "deep-in-object", "over-depth-limit", "bad-encoding", "bad-utf8", "truncated"],
)
def test_unreadable_bodies_are_400_invalid_json_on_every_route(
    hostile_app: Flask,
    make_user: Callable[..., Any],
    bearer: Callable[..., dict[str, str]],
    body: str | bytes,
) -> None:
    """Deep nesting, bad encodings and broken syntax answer 400 invalid_json, authenticated or
    not, through the API, the login form and the inbound hook alike (never a 500)."""
    user = make_user()
    auth = bearer(hostile_app, user)
    client = hostile_app.test_client()
    for path, headers in _routes(auth):
        response = client.post(path, data=body, headers={**JSON, **headers})
        assert response.status_code == 400, (path, response.status_code)
        if path != "/auth/login":  # a page: it shows the form again, as for any bad post
            assert response.get_json()["error"]["code"] == "invalid_json", path


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"metadata": {"a": "\\udc00"}}', "metadata.a"),
        ('{"metadata": {"\\ud800x": "b"}}', "metadata"),
        ('{"metadata": {"a": NaN}}', "metadata.a"),
        ('{"metadata": {"a": [1, Infinity]}}', "metadata.a.1"),
        ('{"metadata": {"a": -Infinity}}', "metadata.a"),
        ('{"metadata": {"a": 1e999}}', "metadata.a"),  # overflows a float to infinity
    ],
    ids=["lone-surrogate", "surrogate-key", "nan", "infinity", "minus-infinity", "overflow"],
)
def test_values_no_field_may_hold_are_422_and_store_nothing(
    hostile_app: Flask,
    make_user: Callable[..., Any],
    bearer: Callable[..., dict[str, str]],
    body: str,
    field: str,
) -> None:
    """Lone surrogates and non-finite numbers in metadata answer 422 naming the field, and no
    upload is created (SQLite used to store NaN as null; PostgreSQL answered 500)."""
    user = make_user()
    client = hostile_app.test_client()
    response = client.post(
        "/api/v1/uploads", data=body, headers={**JSON, **bearer(hostile_app, user)}
    )
    assert response.status_code == 422, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    assert error["details"][0]["field"] == field
    with hostile_app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Upload)) == 0


def test_the_login_limiter_keys_a_hostile_body_by_ip(
    make_app: Callable[..., Flask], make_user: Callable[..., Any]
) -> None:
    """The login form's limiter reads the username from a JSON body before the view runs; an
    unreadable body is keyed by the client's IP instead of crashing, and still counts."""
    app = make_app(AUTH_RATE_LIMIT="2 per minute")
    make_user()
    client = app.test_client()
    # A frozen clock: the window (from its first hit) cannot run out half-way on a slow machine.
    with time_machine.travel(datetime(2031, 3, 1, 9, 0, 10, tzinfo=UTC), tick=False):
        statuses = [
            client.post("/auth/login", data=DEEP, headers=JSON).status_code for _ in range(3)
        ]
    assert statuses == [400, 400, 429]


def test_good_bodies_still_work(
    hostile_app: Flask, make_user: Callable[..., Any], bearer: Callable[..., dict[str, str]]
) -> None:
    """The strict reader takes ordinary JSON (nested metadata, unicode, big integers)."""
    user = make_user()
    body = {"metadata": {"album": "été ☀", "n": 12345678901234567890, "tags": [{"a": 1.5}]}}
    client = hostile_app.test_client()
    response = client.post("/api/v1/uploads", json=body, headers=bearer(hostile_app, user))
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.get_json()["metadata"] == body["metadata"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"imageId": "\\u0000"}', "imageId"),
        ('{"imageId": "\\udc00"}', "imageId"),
        ('{"success": NaN}', "success"),
        ("[1, 2]", None),
        ('"a string"', None),
    ],
    ids=["nul", "lone-surrogate", "nan", "array", "string"],
)
def test_the_cloudflare_hook_answers_unacceptable_json_as_the_api_does(
    hostile_app: Flask, body: str, field: str | None
) -> None:
    """The inbound hook reads its body like the API: a value no field may hold, or JSON that is
    not an object, is 422 `validation_error` (it was 400 there; a NUL image id was a 500 on
    PostgreSQL)."""
    response = hostile_app.test_client().post(
        "/hooks/cloudflare", data=body, headers={**JSON, "cf-webhook-auth": CF_SECRET}
    )
    assert response.status_code == 422, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    assert error["details"][0]["field"] == field


def test_a_chunked_body_over_the_maximum_is_413_not_cut_json(app) -> None:
    """A body without Content-Length (chunked, as gunicorn hands it over) is read only up to
    MAX_CONTENT_LENGTH: a longer one is refused as too large, a shorter one is read whole."""
    import io

    def chunked(body: bytes):
        environ = {
            "CONTENT_LENGTH": "",
            "HTTP_TRANSFER_ENCODING": "chunked",
            "wsgi.input": io.BytesIO(body),
            "wsgi.input_terminated": True,
            "CONTENT_TYPE": "application/json",
        }
        return app.test_client().open(
            "/api/v1/auth/tokens", method="POST", environ_overrides=environ
        )

    limit = app.config["MAX_CONTENT_LENGTH"]
    big = json.dumps({"username": "a" * limit, "password": "x", "device_name": "d"}).encode()
    refused = chunked(big)
    assert refused.status_code == 413, refused.get_json()
    assert refused.get_json()["error"]["code"] == "request_entity_too_large"
    small = json.dumps({"username": "nobody", "password": "x" * 12, "device_name": "d"})
    assert chunked(small.encode()).status_code == 401

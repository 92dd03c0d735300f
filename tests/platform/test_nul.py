"""A NUL character in a path id, a query filter, a JSON body or a form field is refused before
it reaches the database: PostgreSQL refuses text holding NUL outright (each of these was a 500
there), and SQLite answers the same."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from broker.auth.models import ApiToken, ServiceKey
from broker.platform.db import db
from broker.uploads.models import Upload
from tests.factories import PASSWORD, csrf_from

NUL = "\x00"


def _count(app: Flask, model: Any) -> int:
    with app.app_context():
        return db.session.scalar(sa.select(sa.func.count()).select_from(model)) or 0


def test_a_nul_in_a_path_id_is_404_on_the_api_and_the_pages(
    app: Flask,
    make_user: Callable[..., Any],
    bearer: Callable[..., dict[str, str]],
    login: Callable[..., Any],
    csrf_headers: Callable[..., dict[str, str]],
) -> None:
    """Every string id in a path (uploads, tokens, service keys, endpoints, users, the /i/
    redirect, the gallery) with a NUL in it names nothing: 404, in the API's error shape."""
    make_user("root", PASSWORD, is_admin=True)
    auth = bearer(app, "root")
    client = app.test_client()
    for method, path in (
        ("GET", "/api/v1/uploads/a%00b"),
        ("DELETE", "/api/v1/uploads/a%00b"),
        ("POST", "/api/v1/uploads/a%00b/complete"),
        ("GET", "/api/v1/images/a%00b/url?variant=thumb"),
        ("DELETE", "/api/v1/auth/tokens/tok_%00"),
        ("DELETE", "/api/v1/service-keys/svk_%00"),
        ("GET", "/api/v1/webhooks/endpoints/we_%00"),
        ("POST", "/api/v1/webhooks/endpoints/we_%00/rotate-secret"),
        ("GET", "/api/v1/users/u_%00/upload-limits"),
    ):
        response = client.open(path, method=method, headers=auth)
        assert response.status_code == 404, (method, path, response.status_code)
        assert response.get_json()["error"]["code"] == "not_found", path
    browser = app.test_client()
    login(browser, "root", PASSWORD)
    for method, path in (
        ("GET", "/gallery/a%00b"),
        ("GET", "/i/a%00b/thumb"),
        ("POST", "/auth/account/tokens/tok_%00/revoke"),
    ):
        response = browser.open(path, method=method, headers=csrf_headers(browser))
        assert response.status_code == 404, (method, path, response.status_code)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("/api/v1/uploads?scope=all&user=u_%00", "user"),
        ("/api/v1/uploads?cursor=MjAy%00", "cursor"),
        ("/api/v1/webhooks/deliveries?endpoint=we_%00", "endpoint"),
        ("/api/v1/images/abc/url?variant=th%00umb", "variant"),
    ],
    ids=["user-filter", "cursor", "endpoint-filter", "variant"],
)
def test_a_nul_in_a_query_parameter_is_422_naming_it(
    app: Flask,
    make_user: Callable[..., Any],
    bearer: Callable[..., dict[str, str]],
    query: str,
    field: str,
) -> None:
    """A filter or a cursor with a NUL in it is a 422 naming the parameter, like any bad one."""
    make_user("root", PASSWORD, is_admin=True)
    response = app.test_client().get(query, headers=bearer(app, "root"))
    assert response.status_code == 422, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    assert [d["field"] for d in error["details"]] == [field]
    assert "NUL" in error["details"][0]["message"]


def test_a_nul_in_a_json_body_is_422_naming_the_field_and_stores_nothing(
    app: Flask, make_user: Callable[..., Any], bearer: Callable[..., dict[str, str]]
) -> None:
    """The one JSON reader refuses text holding NUL anywhere in a body (values and keys), on
    anonymous and authenticated routes alike, before any row is written."""
    make_user("root", PASSWORD, is_admin=True)
    auth = bearer(app, "root")
    tokens_before = _count(app, ApiToken)
    client = app.test_client()
    login = {"username": "root", "password": PASSWORD, "device_name": "phone"}
    cases: list[tuple[str, dict[str, Any], dict[str, str], str]] = [
        ("/api/v1/auth/tokens", {**login, "username": "ro" + NUL + "ot"}, {}, "username"),
        ("/api/v1/auth/tokens", {**login, "device_name": "phone" + NUL}, {}, "device_name"),
        ("/api/v1/service-keys", {"name": "k" + NUL, "scopes": ["uploads:read"]}, auth, "name"),
        (
            "/api/v1/service-keys",
            {"name": "k", "scopes": ["uploads:read"], "issuer": NUL},
            auth,
            "issuer",
        ),
        ("/api/v1/uploads", {"metadata": {"album": "a" + NUL}}, auth, "metadata.album"),
        ("/api/v1/uploads", {"metadata": {"al" + NUL: "a"}}, auth, "metadata"),
        ("/api/v1/images/urls", {"items": [{"upload_id": NUL}]}, auth, "items.0.upload_id"),
    ]
    for path, body, headers, field in cases:
        response = client.post(path, json=body, headers=headers)
        assert response.status_code == 422, (path, field, response.status_code)
        error = response.get_json()["error"]
        assert error["code"] == "validation_error"
        assert error["details"][0]["field"] == field, (path, error)
    assert _count(app, ApiToken) == tokens_before
    assert _count(app, ServiceKey) == 0
    assert _count(app, Upload) == 0


def test_a_nul_in_a_form_field_shows_the_form_again(
    app: Flask,
    make_user: Callable[..., Any],
    login: Callable[..., Any],
    csrf_headers: Callable[..., dict[str, str]],
) -> None:
    """The login form and the token form refuse a field holding NUL (the form again, naming the
    problem), log nobody in and create nothing."""
    make_user()
    anonymous = app.test_client()
    page = anonymous.get("/auth/login").get_data(as_text=True)
    response = anonymous.post(
        "/auth/login",
        data={"username": "ali" + NUL + "ce", "password": PASSWORD, "csrf_token": csrf_from(page)},
    )
    assert response.status_code == 400
    assert "must not contain NUL" in response.get_data(as_text=True)
    assert anonymous.get("/api/v1/me").status_code == 401

    browser = app.test_client()
    login(browser)
    tokens_before = _count(app, ApiToken)
    response = browser.post(
        "/auth/account/tokens", data={"name": "laptop" + NUL}, headers=csrf_headers(browser)
    )
    assert response.status_code == 422
    assert "must not contain NUL" in response.get_data(as_text=True)
    assert _count(app, ApiToken) == tokens_before

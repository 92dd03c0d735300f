"""Ids in paths are parsed once, by the route's converter: out of range or non-ASCII is 404."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from tests.factories import PASSWORD


@pytest.mark.parametrize(
    "delivery_id", ["9" * 30, "9223372036854775808", "2147483648", "١٢", "0x1f", "-1"]
)
def test_out_of_range_and_non_ascii_delivery_ids_are_404(
    app: Flask,
    make_user: Callable[..., Any],
    bearer: Callable[..., dict[str, str]],
    login: Callable[..., Any],
    csrf_headers: Callable[..., dict[str, str]],
    delivery_id: str,
) -> None:
    """A 30-digit id (an OverflowError in the driver) or another script's digits answer 404 on
    the admin API and the admin page, not 500."""
    make_user("root", PASSWORD, is_admin=True)
    auth = bearer(app, "root")
    client = app.test_client()
    for method, path in (
        ("GET", f"/api/v1/webhooks/deliveries/{delivery_id}"),
        ("POST", f"/api/v1/webhooks/deliveries/{delivery_id}/redeliver"),
    ):
        response = client.open(path, method=method, headers=auth)
        assert response.status_code == 404, (path, response.status_code)
        assert response.get_json()["error"]["code"] == "not_found"
    browser = app.test_client()
    login(browser, "root", PASSWORD)
    response = browser.post(
        f"/admin/deliveries/{delivery_id}/redeliver", headers=csrf_headers(browser)
    )
    assert response.status_code == 404

"""The OpenAPI document and the docs page name the broker by BROKER_PUBLIC_URL (or relatively),
never by the Host header a request brings, and say how they may be cached. Over real HTTP, with
a forged Host header, as a cache-poisoning attempt sends it."""

from __future__ import annotations

from collections.abc import Callable

import requests
from flask import Flask

from tests import factories

EVIL = {"Host": "evil.example"}


def test_a_forged_host_never_reaches_the_document_or_the_page(make_app: Callable[..., Flask]):
    app = make_app()
    with factories.live_server(app) as url, requests.Session() as http:
        document = http.get(f"{url}/api/v1/openapi.json", headers=EVIL, timeout=10)
        page = http.get(f"{url}/api/v1/docs", headers=EVIL, timeout=30)
    assert document.status_code == 200 and page.status_code == 200
    assert document.json()["servers"] == [{"url": "/", "description": "This broker"}]
    assert "evil.example" not in document.text and "evil.example" not in page.text
    assert "BROKER=https://broker.example.com" in page.text  # a placeholder in the snippets


def test_the_configured_public_url_names_the_broker(make_app: Callable[..., Flask]):
    app = make_app(PUBLIC_URL="https://uploads.example.com/")
    with factories.live_server(app) as url, requests.Session() as http:
        document = http.get(f"{url}/api/v1/openapi.json", headers=EVIL, timeout=10).json()
        page = http.get(f"{url}/api/v1/docs", headers=EVIL, timeout=30).text
    assert document["servers"] == [
        {"url": "https://uploads.example.com", "description": "This broker"}
    ]
    assert "BROKER=https://uploads.example.com\n" in page and "evil.example" not in page


def test_cache_headers_on_the_document_and_the_page(make_app: Callable[..., Flask]):
    app = make_app()
    with factories.live_server(app) as url, requests.Session() as http:
        document = http.get(f"{url}/api/v1/openapi.json", timeout=10)
        assert document.headers["Cache-Control"] == "public, max-age=300"
        etag = document.headers["ETag"]
        again = http.get(f"{url}/api/v1/openapi.json", headers={"If-None-Match": etag}, timeout=10)
        assert again.status_code == 304 and again.content == b""
        page = http.get(f"{url}/api/v1/docs", timeout=30)
        # The page carries the reader's CSRF token (and name, when logged in): their own cache
        # only, revalidated each time.
        assert page.headers["Cache-Control"] == "private, no-cache"

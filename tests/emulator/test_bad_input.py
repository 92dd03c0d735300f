"""Bad input never yields a 500 or a stack trace: every refusal is Cloudflare-shaped."""

from __future__ import annotations

from typing import Any

import pytest

from broker.emulator.testing import ImagesClient, make_image

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/v1", {"params": {"page": "1e400"}}),
    ("GET", "/v1", {"params": {"per_page": "nan"}}),
    ("GET", "/v2", {"params": {"per_page": "inf"}}),
    ("GET", "/v2", {"params": {"meta.a[gt]": "x"}}),
    ("GET", "/v2", {"params": {"meta.a[eq:boolean]": "yes"}}),
    ("GET", "/v2", {"params": {"meta.a.b.c.d.e.f[eq]": "x"}}),
    ("GET", "/v2", {"params": [(f"meta.k{i}[eq]", "x") for i in range(6)]}),
    ("GET", "/v2", {"params": {"meta.a[in]": "|".join("x" * 11)}}),
    ("POST", "/v2/direct_upload", {"json": {"id": 123}}),
    ("POST", "/v2/direct_upload", {"json": {"creator": 5}}),
    ("POST", "/v2/direct_upload", {"json": {"expiry": 5}}),
    ("POST", "/v2/direct_upload", {"json": {"requireSignedURLs": "perhaps"}}),
    ("POST", "/v2/direct_upload", {"json": {"metadata": "a string"}}),
    ("POST", "/v2/direct_upload", {"json": [1, 2]}),
    ("POST", "/v2/direct_upload", {"data": {"metadata": "{not json"}}),
    (
        "POST",
        "/v2/direct_upload",
        {"files": {"metadata.a": (None, "1"), "metadata.a.b": (None, "2")}},
    ),
    ("POST", "/v2/direct_upload", {"files": {"metadata.": (None, "1")}}),
    ("POST", "/v2/direct_upload", {"files": {"metadata[a]x": (None, "1")}}),
    ("POST", "/v2/direct_upload", {"files": {"creator": (None, "c" * 1025)}}),
    (
        "POST",
        "/v1",
        {
            "data": b"--x\r\nbroken",
            "headers": {"Content-Type": "multipart/form-data; boundary=x"},
        },
    ),
    ("POST", "/v1", {"files": {"file": ("a.png", make_image())}, "data": {"url": "ftp://x/y"}}),
    ("POST", "/v1", {"files": {"_": (None, "")}, "data": {"url": "ftp://x/y"}}),
    ("POST", "/v1/variants", {"json": {"id": "ok", "options": {"fit": "cover", "width": True}}}),
    ("POST", "/v1/variants", {"json": {"id": 5, "options": {}}}),
    ("PATCH", "/v1/variants/public", {"json": {"options": "big"}}),
    (
        "PATCH",
        "/v1/variants/public",
        {"json": {"options": {"fit": "cover", "width": 1.5, "height": 1}}},
    ),
    ("PUT", "/v1/keys/" + "k" * 30, {}),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), CASES)
def test_bad_requests_are_enveloped_4xx(
    api: ImagesClient, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    resp = api.request(method, path, **kwargs)
    assert 400 <= resp.status_code < 500, resp.text
    body = resp.json()
    assert body["success"] is False and body["result"] is None
    assert isinstance(body["errors"][0]["code"], int)

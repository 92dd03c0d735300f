"""REST conformance for signing keys, variants and stats."""

from __future__ import annotations

import requests

from broker.emulator.testing import ImagesClient, make_image


def _code(resp: requests.Response) -> int:
    body = resp.json()
    assert body["success"] is False and body["result"] is None
    return body["errors"][0]["code"]


def test_default_key_exists(api: ImagesClient) -> None:
    keys = api.get("/v1/keys").json()["result"]["keys"]
    assert [k["name"] for k in keys] == ["default"]
    assert len(keys[0]["value"]) >= 32


def test_put_and_delete_keys(api: ImagesClient) -> None:
    after_put = api.request("PUT", "/v1/keys/rotated2").json()["result"]["keys"]
    assert [k["name"] for k in after_put] == ["default", "rotated2"]
    after_delete = api.request("DELETE", "/v1/keys/default").json()["result"]["keys"]
    assert [k["name"] for k in after_delete] == ["rotated2"]
    assert api.request("DELETE", "/v1/keys/missing").status_code == 404
    for bad in ("with-dash", "x" * 21):
        resp = api.request("PUT", f"/v1/keys/{bad}")
        assert resp.status_code == 400 and _code(resp) == 5400


def test_deleting_the_last_key_mints_a_new_default(api: ImagesClient) -> None:
    old = api.get("/v1/keys").json()["result"]["keys"][0]["value"]
    keys = api.request("DELETE", "/v1/keys/default").json()["result"]["keys"]
    assert [k["name"] for k in keys] == ["default"]
    assert keys[0]["value"] != old


def test_stats_count_finished_images(api: ImagesClient) -> None:
    assert api.get("/v1/stats").json()["result"] == {"count": {"allowed": 100000, "current": 0}}
    api.upload(make_image())
    api.direct_upload()
    assert api.get("/v1/stats").json()["result"]["count"]["current"] == 1


def test_public_variant_exists_and_cannot_be_deleted(api: ImagesClient) -> None:
    variants = api.get("/v1/variants").json()["result"]["variants"]
    assert variants["public"] == {
        "id": "public",
        "options": {"fit": "scale-down", "width": 1366, "height": 768, "metadata": "none"},
        "neverRequireSignedURLs": False,
    }
    resp = api.request("DELETE", "/v1/variants/public")
    assert resp.status_code == 400 and _code(resp) == 5400


def test_variant_create_get_edit_delete(api: ImagesClient) -> None:
    body = {
        "id": "thumb",
        "options": {"fit": "cover", "width": 100, "height": 100, "metadata": "none"},
        "neverRequireSignedURLs": True,
    }
    created = api.post("/v1/variants", json=body).json()["result"]["variant"]
    assert created == body
    assert api.get("/v1/variants/thumb").json()["result"]["variant"] == body
    again = api.post("/v1/variants", json=body)
    assert again.status_code == 409 and _code(again) == 5409

    edited = api.request(
        "PATCH",
        "/v1/variants/thumb",
        json={"options": {"fit": "pad", "width": 50, "height": 40, "metadata": "keep"}},
    ).json()["result"]["variant"]
    assert edited["options"]["fit"] == "pad" and edited["neverRequireSignedURLs"] is True

    image = api.upload(make_image())
    assert image["variants"][-1].endswith("/thumb")
    assert api.request("DELETE", "/v1/variants/thumb").json()["result"] == {}
    missing = api.get("/v1/variants/thumb")
    assert missing.status_code == 404 and _code(missing) == 5401
    assert api.request("DELETE", "/v1/variants/thumb").status_code == 404
    assert api.request("PATCH", "/v1/variants/thumb", json=body).status_code == 404


def test_variant_validation(api: ImagesClient) -> None:
    good = {"fit": "contain", "width": 10, "height": 10, "metadata": "none"}
    cases = [
        {"id": "bad-id", "options": good},
        {"id": "x" * 100, "options": good},
        {"id": "ok", "options": {**good, "fit": "stretch"}},
        {"id": "ok", "options": {**good, "metadata": "all"}},
        {"id": "ok", "options": {**good, "width": 0}},
        {"id": "ok", "options": {**good, "height": "tall"}},
        {"id": "ok"},
    ]
    for body in cases:
        resp = api.post("/v1/variants", json=body)
        assert resp.status_code == 400 and _code(resp) == 5400, body
    assert api.post("/v1/variants", data="not json").status_code == 400


def test_at_most_100_variants(api: ImagesClient) -> None:
    options = {"fit": "scale-down", "width": 10, "height": 10, "metadata": "none"}
    for i in range(99):  # `public` is the 100th
        resp = api.post("/v1/variants", json={"id": f"v{i}", "options": options})
        assert resp.status_code == 200
    over = api.post("/v1/variants", json={"id": "onemore", "options": options})
    assert over.status_code == 400 and _code(over) == 5400
    assert len(api.get("/v1/variants").json()["result"]["variants"]) == 100

"""REST conformance for images: v1 upload, details, edit, delete, blob, v1 and v2 listings."""

from __future__ import annotations

import json
import re
import uuid

from broker.emulator.testing import EmulatorServer, ImagesClient, make_image

UPLOADED_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _error_code(resp) -> int:  # type: ignore[no-untyped-def]
    body = resp.json()
    assert body["success"] is False and body["result"] is None
    return body["errors"][0]["code"]


def test_upload_file_returns_the_image_object(api: ImagesClient, emulator: EmulatorServer) -> None:
    image = api.upload(make_image(), "logo.png", creator="user-1", requireSignedURLs="false")
    assert uuid.UUID(image["id"]).version == 4
    assert image["filename"] == "logo.png"
    assert image["creator"] == "user-1"
    assert image["meta"] == {}
    assert image["requireSignedURLs"] is False
    assert UPLOADED_RE.match(image["uploaded"])
    assert image["variants"] == [f"{emulator.url}/{emulator.account_hash}/{image['id']}/public"]
    assert "draft" not in image


def test_envelope_shape(api: ImagesClient) -> None:
    body = api.get("/v1/stats").json()
    assert set(body) >= {"success", "errors", "messages", "result"}
    assert body["success"] is True and body["errors"] == [] and body["messages"] == []


def test_metadata_in_all_three_spellings(api: ImagesClient) -> None:
    as_json = api.upload(make_image(), metadata=json.dumps({"a": "1", "n": {"b": 2}}))
    assert as_json["meta"] == {"a": "1", "n": {"b": 2}}
    dotted = api.upload(make_image(), **{"metadata.a": "1", "metadata.n.b": "2"})
    assert dotted["meta"] == {"a": "1", "n": {"b": "2"}}
    bracket = api.upload(make_image(), **{"metadata[a]": "1", "metadata[n][b]": "2"})
    assert bracket["meta"] == {"a": "1", "n": {"b": "2"}}
    listed = api.post(
        "/v1",
        files={"file": ("x.png", make_image())},
        data=[("metadata.tags[]", "x"), ("metadata.tags[]", "y")],
    ).json()["result"]
    assert listed["meta"] == {"tags": ["x", "y"]}


def test_upload_with_custom_id_and_reuse_conflicts(api: ImagesClient) -> None:
    image = api.upload(make_image(), id="folder/sub/picture")
    assert image["id"] == "folder/sub/picture"
    assert image["variants"][0].endswith("/folder/sub/picture/public")
    again = api.post("/v1", files={"file": ("x.png", make_image())}, data={"id": image["id"]})
    assert again.status_code == 409 and _error_code(again) == 5409
    # Ids with slashes reach every per-image endpoint, encoded or not.
    assert api.get("/v1/folder/sub/picture").json()["result"]["id"] == image["id"]
    assert api.get("/v1/folder%2Fsub%2Fpicture").json()["result"]["id"] == image["id"]
    assert api.get("/v1/folder/sub/picture/blob").status_code == 200


def test_upload_rejects_bad_custom_ids(api: ImagesClient) -> None:
    for bad in (str(uuid.uuid4()), uuid.uuid4().hex, "/lead", "trail/", "a//b", "x" * 1025):
        resp = api.post("/v1", files={"file": ("x.png", make_image())}, data={"id": bad})
        assert resp.status_code == 400 and _error_code(resp) == 5411, bad
    private = api.post(
        "/v1",
        files={"file": ("x.png", make_image())},
        data={"id": "custom", "requireSignedURLs": "true"},
    )
    assert private.status_code == 400 and _error_code(private) == 5411


def test_upload_errors(api: ImagesClient) -> None:
    neither = api.post("/v1", files={"_": (None, "x")})
    assert neither.status_code == 400 and _error_code(neither) == 5400
    both = api.post(
        "/v1", files={"file": ("x.png", make_image())}, data={"url": "http://127.0.0.1:1/x"}
    )
    assert both.status_code == 400 and _error_code(both) == 5400
    not_image = api.post("/v1", files={"file": ("fake.png", b"GIF89a but not really", "image/png")})
    assert not_image.status_code == 415 and _error_code(not_image) == 5455
    not_multipart = api.post("/v1", json={"url": "http://example.invalid/x.png"})
    assert not_multipart.status_code == 415 and _error_code(not_multipart) == 5415
    big = api.post("/v1", files={"file": ("big.png", make_image() + b"\0" * (10 * 1024 * 1024))})
    assert big.status_code == 413 and _error_code(big) == 5413
    too_much_meta = api.post(
        "/v1", files={"file": ("x.png", make_image())}, data={"metadata.k": "v" * 1100}
    )
    assert too_much_meta.status_code == 400 and _error_code(too_much_meta) == 5400
    bad_bool = api.post(
        "/v1", files={"file": ("x.png", make_image())}, data={"requireSignedURLs": "maybe"}
    )
    assert bad_bool.status_code == 400


def test_upload_from_url(api: ImagesClient) -> None:
    source = api.upload(make_image(40, 30))
    resp = api.post("/v1", files={"_": (None, "")}, data={"url": source["variants"][0]})
    assert resp.status_code == 200, resp.text
    image = resp.json()["result"]
    assert image["filename"] == "public"
    blob = api.get(f"/v1/{image['id']}/blob")
    assert blob.headers["Content-Type"] == "image/png"
    unreachable = api.post("/v1", files={"_": (None, "")}, data={"url": "http://127.0.0.1:9/x"})
    assert unreachable.status_code == 400 and _error_code(unreachable) == 5454


def test_details_edit_delete_and_blob(api: ImagesClient) -> None:
    original = make_image(20, 10, "JPEG")
    image = api.upload(original, "p.jpg", metadata=json.dumps({"a": "1", "b": "2"}))
    details = api.get(f"/v1/{image['id']}").json()["result"]
    assert details == image
    blob = api.get(f"/v1/{image['id']}/blob")
    assert blob.content == original and blob.headers["Content-Type"] == "image/jpeg"

    edited = api.request(
        "PATCH",
        f"/v1/{image['id']}",
        json={"metadata": {"c": "3"}, "creator": "someone", "requireSignedURLs": True},
    ).json()["result"]
    assert edited["meta"] == {"c": "3"}  # replaced, not merged
    assert edited["creator"] == "someone" and edited["requireSignedURLs"] is True

    too_big = api.request("PATCH", f"/v1/{image['id']}", json={"metadata": {"k": "v" * 1100}})
    assert too_big.status_code == 400 and _error_code(too_big) == 5400
    not_json = api.request("PATCH", f"/v1/{image['id']}", data="nope")
    assert not_json.status_code == 400

    deleted = api.request("DELETE", f"/v1/{image['id']}")
    assert deleted.status_code == 200 and deleted.json()["result"] == {}
    for method, path in (
        ("GET", f"/v1/{image['id']}"),
        ("GET", f"/v1/{image['id']}/blob"),
        ("DELETE", f"/v1/{image['id']}"),
        ("PATCH", f"/v1/{image['id']}"),
    ):
        gone = api.request(method, path, json={})
        assert gone.status_code == 404 and _error_code(gone) == 5404, (method, path)


def test_private_custom_id_cannot_be_made_private(api: ImagesClient) -> None:
    api.upload(make_image(), id="named")
    resp = api.request("PATCH", "/v1/named", json={"requireSignedURLs": True})
    assert resp.status_code == 400 and _error_code(resp) == 5411


def test_list_v1_pages_and_creator_filter(api: ImagesClient, emulator: EmulatorServer) -> None:
    ids = []
    for i in range(12):
        emulator.advance(1)  # distinct upload times, newest first
        ids.append(api.upload(make_image(), creator="alice" if i % 2 else "bob")["id"])
    api.direct_upload()  # drafts never appear in listings
    first = api.get("/v1", params={"per_page": 10})
    body = first.json()
    assert [i["id"] for i in body["result"]["images"]] == ids[::-1][:10]
    assert body["result_info"] == {"page": 1, "per_page": 10, "count": 10, "total_count": 12}
    second = api.get("/v1", params={"per_page": 10, "page": 2}).json()["result"]["images"]
    assert [i["id"] for i in second] == ids[::-1][10:]
    alice = api.get("/v1", params={"creator": "alice"}).json()["result"]["images"]
    assert {i["id"] for i in alice} == set(ids[1::2])
    assert api.get("/v1", params={"per_page": 5}).status_code == 400
    assert api.get("/v1", params={"page": 0}).status_code == 400


def test_list_v2_continuation_sort_and_filters(api: ImagesClient, emulator: EmulatorServer) -> None:
    ids = []
    for i in range(15):
        emulator.advance(1)
        meta = {"n": str(i), "kind": "even" if i % 2 == 0 else "odd", "deep": {"x": i}}
        ids.append(api.upload(make_image(), metadata=json.dumps(meta), creator=f"c{i % 3}")["id"])
    api.upload(make_image(), metadata=json.dumps({"flag": True}))
    api.direct_upload()

    seen: list[str] = []
    token = None
    while True:
        params = {"per_page": 10, "sort_order": "asc"}
        if token:
            params["continuation_token"] = token
        result = api.get("/v2", params=params).json()["result"]
        seen.extend(i["id"] for i in result["images"])
        token = result["continuation_token"]
        if token is None:
            break
        assert len(token) <= 32
    assert seen[:15] == ids and len(seen) == 16

    desc = api.get("/v2").json()["result"]
    assert desc["images"][1]["id"] == ids[-1] and desc["continuation_token"] is None

    def listed(**params: str) -> list[str]:
        resp = api.get("/v2", params=params)
        assert resp.status_code == 200, resp.text
        return [i["id"] for i in resp.json()["result"]["images"]]

    assert set(listed(creator="c1")) == set(ids[1::3])
    assert set(listed(**{"meta.kind[eq]": "odd"})) == set(ids[1::2])
    assert listed(**{"meta.n[eq]": "3", "meta.kind[eq]": "odd"}) == [ids[3]]
    assert set(listed(**{"meta.n[in]": "1|2"})) == {ids[1], ids[2]}
    assert set(listed(**{"meta.deep.x[gte:number]": "13"})) == {ids[13], ids[14]}
    assert listed(**{"meta.deep.x[eq:number]": "4"}) == [ids[4]]
    assert len(listed(**{"meta.flag[eq:boolean]": "true"})) == 1
    assert listed(**{"meta.n[eq:number]": "3"}) == []  # stored as a string
    assert api.get("/v2", params={"meta.n[like]": "x"}).status_code == 400
    assert api.get("/v2", params={"continuation_token": "garbage!"}).status_code == 400
    assert api.get("/v2", params={"sort_order": "up"}).status_code == 400

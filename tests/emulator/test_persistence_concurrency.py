"""State survives a restart; a threaded server takes many concurrent uploads without loss."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from broker.emulator.testing import EmulatorServer, make_image


def test_restart_keeps_images_drafts_keys_and_variants(tmp_path: Path) -> None:
    options = {"fit": "cover", "width": 20, "height": 20, "metadata": "none"}
    with EmulatorServer(tmp_path) as first, first.client() as api:
        image = api.upload(make_image(), metadata='{"k": "v"}', creator="c")
        draft = api.direct_upload()
        pending = api.direct_upload()
        api.request("PUT", "/v1/keys/second")
        api.post("/v1/variants", json={"id": "thumb", "options": options})
        keys = api.get("/v1/keys").json()["result"]["keys"]
        with requests.post(
            draft["uploadURL"], files={"file": ("d.png", make_image())}, timeout=10
        ) as resp:
            assert resp.status_code == 200

    with EmulatorServer(tmp_path) as second, second.client() as api:
        again = api.get(f"/v1/{image['id']}").json()["result"]
        assert again["meta"] == {"k": "v"} and again["uploaded"] == image["uploaded"]
        assert "draft" not in api.get(f"/v1/{draft['id']}").json()["result"]
        assert api.get(f"/v1/{pending['id']}").json()["result"]["draft"] is True
        assert api.get("/v1/keys").json()["result"]["keys"] == keys
        assert "thumb" in api.get("/v1/variants").json()["result"]["variants"]
        assert api.get(f"/v1/{image['id']}/blob").status_code == 200
        # Links minted before the restart point at the old port; the path still works here.
        new_url = pending["uploadURL"].replace(
            pending["uploadURL"].split("/upload/")[0], second.url
        )
        with requests.post(new_url, files={"file": ("p.png", make_image())}, timeout=10) as resp:
            assert resp.status_code == 200
        assert len(api.get("/v2").json()["result"]["images"]) == 3


def test_fifty_concurrent_direct_uploads(emulator: EmulatorServer) -> None:
    def one(i: int) -> str:
        with emulator.client() as api:
            draft = api.direct_upload(creator=f"u{i % 5}")
            with requests.post(
                draft["uploadURL"],
                files={"file": (f"{i}.png", make_image(16 + i, 16))},
                timeout=30,
            ) as resp:
                assert resp.status_code == 200, resp.text
            return draft["id"]

    with ThreadPoolExecutor(max_workers=50) as pool:
        ids = list(pool.map(one, range(50)))

    assert len(set(ids)) == 50
    with emulator.client() as api:
        listed = api.get("/v2", params={"per_page": 100}).json()["result"]["images"]
        assert {i["id"] for i in listed} == set(ids)
        assert api.get("/v1/stats").json()["result"]["count"]["current"] == 50
    assert emulator.counters()["upload_url"] == 50
    assert emulator.counters()["direct_upload"] == 50


def test_fifty_concurrent_v1_uploads_and_reads(emulator: EmulatorServer) -> None:
    def one(i: int) -> int:
        with emulator.client() as api:
            image = api.upload(make_image(10, 10 + i))
            details = api.get(f"/v1/{image['id']}")
            with requests.get(image["variants"][0], timeout=30) as resp:
                assert resp.status_code == 200
            return details.status_code

    with ThreadPoolExecutor(max_workers=50) as pool:
        assert set(pool.map(one, range(50))) == {200}
    with emulator.client() as api:
        assert api.get("/v1/stats").json()["result"]["count"]["current"] == 50

"""Links point at the host the emulator was reached on unless PUBLIC_URL says otherwise."""

from __future__ import annotations

from broker.emulator import create_app

API = "/client/v4/accounts/emulator-account/images/v2/direct_upload"
AUTH = {"Authorization": "Bearer emulator-token"}


def test_upload_url_follows_the_request_host_by_default(tmp_path):
    client = create_app({"DATA_DIR": str(tmp_path)}).test_client()
    response = client.post(API, headers=AUTH, base_url="http://127.0.0.1:8779")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["result"]["uploadURL"].startswith(
        "http://127.0.0.1:8779/upload/emuhash000000000000000/"
    )


def test_configured_public_url_wins(tmp_path):
    app = create_app({"DATA_DIR": str(tmp_path), "PUBLIC_URL": "https://images.example.test/"})
    response = app.test_client().post(API, headers=AUTH, base_url="http://127.0.0.1:8779")
    assert response.get_json()["result"]["uploadURL"].startswith(
        "https://images.example.test/upload/"
    )

"""The upload page for one upload profile (`/upload?profile=…`): its rules in words, a picker
limited by them (one file in replace mode, `accept` by formats), the rules as data for the
page's checks, and the uploads it creates made in that profile."""

from __future__ import annotations

import html
import json
import re

import pytest

from tests.factories import AVATAR_PROFILE

PROFILES = (
    AVATAR_PROFILE
    + """max_bytes = 5_000_000

[profiles.gallery]
min_width = 100
max_files = 20

[profiles.staff]
allow = { roles = ["admin"] }
"""
)


@pytest.fixture
def page(make_app, make_user, login, tmp_path):
    path = tmp_path / "profiles.toml"
    path.write_text(PROFILES, encoding="utf-8")
    app = make_app(UPLOAD_PROFILES=str(path))
    make_user("alice")
    client = app.test_client()
    login(client, "alice")

    def get(query: str = "") -> tuple[int, str]:
        response = client.get(f"/upload{query}")
        return response.status_code, response.get_data(as_text=True)

    return get


def _picker(text: str) -> str:
    return re.search(r'<input id="file-input"[^>]*>', text, re.S)[0]


def _rules(text: str) -> dict:
    raw = re.search(r"data-rules='([^']*)'", text)[1]
    return json.loads(html.unescape(raw))


def test_the_avatar_page_takes_one_file_of_its_formats_and_says_the_rules(page):
    status, text = page("?profile=avatar")
    assert status == 200
    assert "Upload an image: Your profile picture" in text
    rules = re.search(r'<ul id="profile-rules"[^>]*>(.*?)</ul>', text, re.S)[1]
    for words in (
        "Formats: JPEG, PNG.",
        "Up to 5 MB per file.",
        "Width at most 512 px.",
        "Aspect ratio 1:1",
        "a new upload replaces your current one",
    ):
        assert words in html.unescape(rules), words
    picker = _picker(text)
    assert " multiple" not in picker
    assert 'accept="image/jpeg,image/png"' in picker
    assert 'data-profile="avatar"' in text
    assert _rules(text)["files_per_pick"] == 1 and _rules(text)["max_width"] == 512


def test_a_many_file_profile_keeps_the_multiple_picker(page):
    status, text = page("?profile=gallery")
    assert status == 200 and " multiple" in _picker(text)
    assert "Up to 20 files at once." in text and "Width at least 100 px." in text
    assert _rules(text)["min_width"] == 100


def test_the_default_page_is_unchanged(page):
    status, text = page()
    assert status == 200 and "<h1>Upload images</h1>" in text
    assert 'id="profile-rules"' not in text and " multiple" in _picker(text)
    assert 'data-profile="default"' in text


def test_unknown_and_forbidden_profiles(page):
    assert page("?profile=banner")[0] == 404
    status, text = page("?profile=staff")
    assert status == 403 and "for admins" in text


def test_the_gallery_filters_by_profile(make_app, make_user, login, bearer, tmp_path):
    from tests.factories import create_upload

    path = tmp_path / "profiles.toml"
    path.write_text(PROFILES, encoding="utf-8")
    app = make_app(UPLOAD_PROFILES=str(path))
    auth = bearer(app, make_user("alice"))
    client = app.test_client()
    login(client, "alice")
    avatar = create_upload(client, auth, profile="avatar")
    plain = create_upload(client, auth)
    text = client.get("/gallery?show=drafts&profile=avatar").get_data(as_text=True)
    assert avatar["id"] in text and plain["id"] not in text
    assert 'aria-label="Profile"' in text and ">gallery</a>" in text
    text = client.get("/gallery?show=drafts").get_data(as_text=True)
    assert avatar["id"] in text and plain["id"] in text
    assert client.get("/gallery?profile=banner").status_code == 404


def test_the_admin_page_shows_each_profiles_usage(make_app, make_user, login, bearer, tmp_path):
    from tests.factories import create_upload

    path = tmp_path / "profiles.toml"
    path.write_text(PROFILES, encoding="utf-8")
    app = make_app(UPLOAD_PROFILES=str(path))
    alice, bob = bearer(app, make_user("alice")), bearer(app, make_user("bob"))
    make_user("root", is_admin=True)
    client = app.test_client()
    for auth in (alice, bob):
        create_upload(client, auth, profile="avatar")
    create_upload(client, alice)
    login(client, "root")
    text = client.get("/admin").get_data(as_text=True)
    rows = dict(re.findall(r'<tr data-profile="([^"]+)">(.*?)</tr>', text, re.S))
    assert list(rows) == ["default", "avatar", "gallery", "staff"]
    cells = lambda name: re.findall(r"<td>(\d+)</td>", rows[name])  # noqa: E731
    assert cells("avatar") == ["2", "2", "0", "0", "0", "0"]  # users, then pending first
    assert cells("default") == ["1", "1", "0", "0", "0", "0"]
    assert cells("gallery") == ["0"] * 6

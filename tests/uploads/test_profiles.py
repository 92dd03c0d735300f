"""Upload profiles end to end: the TOML file checked at start, `GET /api/v1/profiles`, every
rule before the upload (create) and after it (the original checked by the worker against the
emulator's real bytes), replace mode with injected time, and quotas per profile."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from broker import create_app, worker
from broker.platform.config import settings_of
from broker.platform.db import utcnow
from broker.uploads import profiles
from broker.uploads.profiles import Profile, ProfileConfigError
from tests.conftest import base_config
from tests.factories import (
    AVATAR_PROFILE,
    add_webhook_endpoint,
    create_upload,
    load_upload,
    post_upload,
    send_file,
    webhook_events,
)

URL = "/api/v1/uploads"

PROFILES = (
    AVATAR_PROFILE
    + """replace_grace = 60
max_pending = 2
require_signed_urls = false

[profiles.gallery]
formats = ["JPEG", "PNG", "WEBP"]
max_bytes = 20_000_000
min_width = 100
min_height = 100
max_pixels = 40_000_000
max_files = 20
max_stored = 3
[profiles.gallery.metadata_schema]
type = "object"
required = ["album"]
properties = { album = { type = "string", maxLength = 40 } }

[profiles.staff]
allow = { roles = ["admin"] }
"""
)


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "profiles.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def app(make_app, tmp_path):
    """An app with the avatar, gallery and staff profiles."""
    return make_app(UPLOAD_PROFILES=_write(tmp_path, PROFILES), WEBHOOK_ALLOW_PRIVATE=True)


@pytest.fixture
def auth(app, make_user, bearer):
    return bearer(app, make_user("alice"))


def _run(app, seconds: float):
    """One worker pass at now + `seconds` (time injected, never slept on)."""
    return worker.run_once(app, now=utcnow() + timedelta(seconds=seconds))


# -- the file ----------------------------------------------------------------------------------


def test_every_problem_in_the_file_is_reported_at_start(tmp_path, migrated):
    bad = """
    colour = "red"
    [profiles.avatar]
    formats = ["png", "bmp"]
    min_width = 600
    max_width = 512
    replace = true
    max_files = 3
    bogus = 1
    [profiles.gallery]
    metadata_schema = { type = "objekt" }
    allow = { roles = ["owner"] }
    [profiles.Bad]
    aspect_ratio = "wide"
    [profiles.bulk]
    max_per_day = 3_000_000_000
    """
    config = base_config(migrated, str(tmp_path), UPLOAD_PROFILES=_write(tmp_path, bad))
    with pytest.raises(ProfileConfigError) as refused:
        create_app(config)
    message = refused.value.message
    for problem in (
        "unknown top-level key 'colour'",
        "profiles.avatar: unknown key 'bogus'",
        "profiles.avatar.formats",
        "min_width (600) is above max_width (512)",
        "a replace profile takes one file per pick",
        "profiles.gallery.metadata_schema is not a valid JSON Schema",
        "profiles.gallery.allow.roles",
        "profiles.Bad: a name is",
        "profiles.Bad.aspect_ratio",
        # Not a 500 at every create once the count's integer overflows.
        "profiles.bulk.max_per_day must be at most 2,147,483,647, not 3,000,000,000",
    ):
        assert problem in message, problem
    assert "10 problem(s)" in message


def test_a_missing_file_or_broken_toml_is_refused_with_its_name(tmp_path, migrated):
    missing = base_config(migrated, str(tmp_path), UPLOAD_PROFILES=str(tmp_path / "nope.toml"))
    with pytest.raises(ProfileConfigError, match="cannot read"):
        create_app(missing)
    broken = base_config(migrated, str(tmp_path), UPLOAD_PROFILES=_write(tmp_path, "[x"))
    with pytest.raises(ProfileConfigError, match="not valid TOML"):
        create_app(broken)


def test_the_default_profile_is_the_global_settings(make_app):
    app = make_app(
        UPLOAD_ALLOWED_FORMATS="jpg heic",
        UPLOAD_MAX_BYTES=1000,
        UPLOAD_MAX_DIMENSION=300,
        MAX_PENDING_UPLOADS=4,
        MAX_UPLOADS_PER_DAY=9,
        UPLOAD_DEFAULT_EXPIRY=900,
    )
    [default] = profiles.profiles_of(settings_of(app))
    assert default == Profile(
        name="default",
        formats=("JPEG", "HEIF"),
        max_bytes=1000,
        max_width=300,
        max_height=300,
        max_pending=4,
        max_per_day=9,
        expires_in=900,
    )


def test_a_default_table_changes_only_the_keys_it_sets(make_app, tmp_path):
    text = "[profiles.default]\nmax_bytes = 5000\n[profiles.scan]\nformats = ['png']\n"
    app = make_app(UPLOAD_PROFILES=_write(tmp_path, text), MAX_PENDING_UPLOADS=7)
    known = profiles.profiles_of(settings_of(app))
    assert known.get("default").max_bytes == 5000
    assert known.get("default").max_pending == 7
    assert known.get("scan").max_pending == 7  # quotas start from the default profile's


# -- the API ------------------------------------------------------------------------------------


def test_profiles_are_listed_with_their_public_rules(app, client, auth):
    response = client.get("/api/v1/profiles", headers=auth)
    assert response.status_code == 200
    items = {p["name"]: p for p in response.get_json()["items"]}
    assert list(items) == ["default", "avatar", "gallery", "staff"]
    avatar = items["avatar"]
    assert avatar["formats"] == ["JPEG", "PNG"] and avatar["max_width"] == 512
    assert avatar["aspect_ratio"] == 1.0 and avatar["files_per_pick"] == 1
    assert avatar["replace"] is True and avatar["replace_grace"] == 60
    assert items["gallery"]["metadata_schema"]["required"] == ["album"]
    assert items["gallery"]["files_per_pick"] == 20


def test_the_openapi_document_lists_the_profiles(app, client):
    document = client.get("/api/v1/openapi.json").get_json()
    schema = document["components"]["schemas"]["CreateUpload"]["properties"]["profile"]
    enums = [o.get("enum") for o in schema.get("anyOf", [schema]) if "enum" in o]
    assert enums == [["default", "avatar", "gallery", "staff"]]
    assert "/api/v1/profiles" in document["paths"]


def test_the_profile_is_in_the_answer_the_cloudflare_metadata_and_the_events(
    app, client, auth, emulator, receiver
):
    _, receiver.secret = add_webhook_endpoint(app, receiver.url)
    up = create_upload(client, auth, profile="gallery", metadata={"album": "summer"})
    assert up["profile"] == "gallery" and up["metadata"] == {"album": "summer"}
    stored = emulator.emulator.store.get_image(up["image_id"])
    assert stored.meta["broker_profile"] == "gallery"
    assert stored.meta["broker_upload_id"] == up["id"]
    plain = create_upload(client, auth)
    assert plain["profile"] == "default"
    assert "broker_profile" not in emulator.emulator.store.get_image(plain["image_id"]).meta
    send_file(up, size=(300, 200))
    client.post(f"{URL}/{up['id']}/complete", headers=auth)
    _run(app, 3)
    assert client.get(f"{URL}/{up['id']}", headers=auth).get_json()["status"] == "ready"
    [event] = [r.json for r in receiver.requests]
    assert event["type"] == "upload.completed"
    assert event["data"]["upload"]["profile"] == "gallery"


def _error(response):
    body = response.get_json()["error"]
    return response.status_code, body["code"], body["message"], body["details"]


def test_refusals_before_the_upload(app, client, auth, make_user, bearer):
    status, code, message, details = _error(post_upload(client, auth, profile="banner"))
    assert (status, code, details[0]["field"]) == (422, "validation_error", "profile")
    assert "'banner' does not exist" in message
    # The metadata schema: a 422 naming the field at fault.
    status, _, message, details = _error(post_upload(client, auth, profile="gallery"))
    assert status == 422 and details[0]["field"] == "metadata"
    assert message.startswith("metadata.album breaks profile 'gallery'")
    too_long = {"album": "x" * 41}
    status, _, message, _ = _error(post_upload(client, auth, profile="gallery", metadata=too_long))
    assert status == 422 and message.startswith("metadata.album breaks")
    # A profile that fixes require_signed_urls refuses the other choice.
    status, _, message, details = _error(
        post_upload(client, auth, profile="avatar", require_signed_urls=True)
    )
    assert status == 422 and details[0]["field"] == "require_signed_urls"
    assert create_upload(client, auth, profile="avatar")["require_signed_urls"] is False
    # Who may use it.
    status, code, message, _ = _error(post_upload(client, auth, profile="staff"))
    assert (status, code) == (403, "profile_not_allowed") and "admins" in message
    admin = bearer(app, make_user("root", is_admin=True))
    assert create_upload(client, admin, profile="staff")["profile"] == "staff"


def test_quotas_are_per_profile_and_name_the_profile_and_the_limit(app, client, auth):
    for _ in range(2):
        create_upload(client, auth, profile="avatar")
    status, code, message, _ = _error(post_upload(client, auth, profile="avatar"))
    assert (status, code) == (429, "too_many_pending_uploads")
    assert "2 uploads" in message and "profile 'avatar'" in message
    create_upload(client, auth)  # the default profile's quota is its own
    for _ in range(3):
        create_upload(client, auth, profile="gallery", metadata={"album": "a"})
    status, code, message, _ = _error(
        post_upload(client, auth, profile="gallery", metadata={"album": "a"})
    )
    assert (status, code) == (403, "stored_image_limit")
    assert "3 images of profile 'gallery'" in message


# -- after the upload ---------------------------------------------------------------------------


def test_a_forged_client_sending_a_huge_png_to_the_avatar_profile_is_rejected(
    app, client, auth, emulator, receiver
):
    """The client skips every check and sends a 4000x3000 PNG: the broker measures the
    original, rejects it naming the rule, deletes it upstream and says so once."""
    _, receiver.secret = add_webhook_endpoint(app, receiver.url)
    up = create_upload(client, auth, profile="avatar")
    send_file(up, fmt="PNG", size=(4000, 3000))
    assert client.post(f"{URL}/{up['id']}/complete", headers=auth).status_code == 202
    _run(app, 3)
    answer = client.post(f"{URL}/{up['id']}/complete", headers=auth)
    assert answer.status_code == 200
    body = answer.get_json()
    assert body["status"] == "rejected"
    assert body["reject_reason"] == "max_width: image is 4000 px wide; at most 512"
    assert emulator.emulator.store.get_image(up["image_id"]) is None
    [event] = webhook_events(app, "upload.rejected")
    data = json.loads(event.payload)["data"]
    assert data["rule"] == {"rule": "max_width", "measured": 4000, "limit": 512}
    assert data["upload"]["profile"] == "avatar"
    _run(app, 6)
    assert [r.json["type"] for r in receiver.requests] == ["upload.rejected"]


@pytest.mark.parametrize(
    ("profile", "fmt", "size", "rule", "measured"),
    [
        ("avatar", "PNG", (512, 300), "aspect_ratio", "512:300"),
        ("avatar", "WEBP", (256, 256), "formats", "WEBP"),
        ("avatar", "PNG", (256, 600), "max_height", 600),
        ("gallery", "PNG", (90, 300), "min_width", 90),
        ("gallery", "PNG", (300, 50), "min_height", 50),
        ("avatar", "JPEG", (500, 505), None, None),  # within the 1 % tolerance
        ("gallery", "JPEG", (640, 480), None, None),
    ],
)
def test_each_rule_on_the_original(app, client, auth, emulator, profile, fmt, size, rule, measured):
    up = create_upload(client, auth, profile=profile, metadata={"album": "a"})
    send_file(up, fmt=fmt, size=size)
    client.post(f"{URL}/{up['id']}/complete", headers=auth)
    _run(app, 3)
    row = load_upload(app, up["id"])
    if rule is None:
        assert row.status == "ready"
        assert emulator.emulator.store.get_image(up["image_id"]) is not None
        return
    assert row.status == "rejected" and row.reject_reason.startswith(f"{rule}: ")
    data = json.loads(webhook_events(app, "upload.rejected")[0].payload)["data"]
    assert data["rule"]["rule"] == rule and data["rule"]["measured"] == measured
    assert emulator.emulator.store.get_image(up["image_id"]) is None


def test_size_and_pixel_rules_measure_the_original():
    gallery = Profile(name="g", max_bytes=1000, max_pixels=10_000, min_pixels=100)
    assert profiles.violation(gallery, 1001, "PNG", (10, 10)).rule == "max_bytes"
    assert profiles.violation(gallery, 10, "PNG", (101, 100)).measured == 10_100
    assert profiles.violation(gallery, 10, "PNG", (9, 10)).rule == "min_pixels"
    assert profiles.violation(gallery, 10, "SVG", None) is None  # no pixels to count


# -- replace mode --------------------------------------------------------------------------------


def _ready_avatar(app, client, auth, seconds: float) -> dict:
    up = create_upload(client, auth, profile="avatar")
    send_file(up, fmt="PNG", size=(256, 256))
    client.post(f"{URL}/{up['id']}/complete", headers=auth)
    _run(app, seconds)
    assert load_upload(app, up["id"]).status == "ready"
    return up


def test_a_second_avatar_replaces_the_first_after_the_grace(app, client, auth, emulator, receiver):
    _, receiver.secret = add_webhook_endpoint(app, receiver.url)
    first = _ready_avatar(app, client, auth, 3)
    second = _ready_avatar(app, client, auth, 6)
    old = load_upload(app, first["id"])
    assert old.status == "ready" and old.replaced_by == second["id"]
    _run(app, 6 + 30)  # inside the 60-second grace: the first image is still served
    assert emulator.emulator.store.get_image(first["image_id"]) is not None
    _run(app, 6 + 61)
    _run(app, 6 + 90)
    assert load_upload(app, first["id"]).status == "deleted"
    assert emulator.emulator.store.get_image(first["image_id"]) is None
    assert emulator.emulator.store.get_image(second["image_id"]) is not None
    replaced = [r.json for r in receiver.requests if r.json["type"] == "upload.replaced"]
    assert len(replaced) == 1
    assert replaced[0]["data"]["upload"]["id"] == first["id"]
    assert replaced[0]["data"]["replaced_by"] == second["id"]
    assert load_upload(app, second["id"]).replaced_by is None


def test_replace_mode_is_per_user(app, client, auth, make_user, bearer, emulator):
    bob = bearer(app, make_user("bob"))
    mine = _ready_avatar(app, client, auth, 3)
    _ready_avatar(app, client, bob, 6)
    _run(app, 200)
    assert load_upload(app, mine["id"]).status == "ready"


# -- who may use a profile: service-key scopes and OpenID Connect claims -------------------------

WHO = """
[profiles.backend]
allow = { scopes = ["uploads:write", "images:urls"] }
[profiles.pro]
allow = { claims = { plan = ["pro", "team"] } }
"""


def test_a_profile_limited_to_scopes_or_claims(make_app, tmp_path, emulator):
    from broker.auth import service_keys
    from broker.platform.db import db
    from tests.support.oidc_issuer import AUDIENCE, serve_issuer

    with serve_issuer() as idp:
        idp.new_key("k1")
        app = make_app(
            UPLOAD_PROFILES=_write(tmp_path, WHO),
            OIDC_ISSUER=idp.url,
            OIDC_AUDIENCE=AUDIENCE,
            OIDC_ALGORITHMS="RS256",
        )
        client = app.test_client()
        with app.app_context():
            narrow = service_keys.issue(db.session, "narrow", ["uploads:write"], issuer=None)
            wide = service_keys.issue(
                db.session, "wide", ["uploads:write", "images:urls"], issuer=None
            )
            db.session.commit()
        for_user = {service_keys.ON_BEHALF_OF: "user-7"}

        def as_key(issued):
            return {"Authorization": f"Bearer {issued.secret}", **for_user}

        refused = post_upload(client, as_key(narrow), profile="backend")
        assert refused.status_code == 403
        assert "lacks the scope images:urls" in refused.get_json()["error"]["message"]
        assert post_upload(client, as_key(wide), profile="backend").status_code == 201

        def as_person(**claims):
            return {"Authorization": f"Bearer {idp.token(**claims)}"}

        assert post_upload(client, as_person(), profile="pro").status_code == 403
        assert post_upload(client, as_person(plan="free"), profile="pro").status_code == 403
        assert post_upload(client, as_person(plan="team"), profile="pro").status_code == 201
        # A person's own token is not a service key: the scopes rule does not apply to it.
        assert post_upload(client, as_person(), profile="backend").status_code == 201


def test_the_readme_profiles_are_valid_and_mean_what_it_says(app):
    """The README's example file parses, and its avatar refuses the forged 4000x3000 PNG."""
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Upload profiles", 1)[1].split("\n## ", 1)[0]
    text = section.split("```toml\n", 1)[1].split("```", 1)[0]
    known = profiles.parse(text, settings_of(app), source="README.md")
    assert known.names == ("default", "avatar", "gallery")
    avatar, gallery = known.get("avatar"), known.get("gallery")
    assert avatar.replace and avatar.files_per_pick == 1
    assert profiles.violation(avatar, 90_000, "PNG", (4000, 3000)).rule == "max_width"
    assert profiles.violation(avatar, 90_000, "PNG", (512, 512)) is None
    assert gallery.formats == ("JPEG", "PNG", "WEBP", "HEIF")
    with pytest.raises(profiles.UploadError):
        profiles.check_metadata(gallery, {"album": 7})


def test_the_list_filters_by_profile(app, client, auth):
    avatar = create_upload(client, auth, profile="avatar")
    plain = create_upload(client, auth)
    listed = client.get(f"{URL}?profile=avatar", headers=auth).get_json()["items"]
    assert [u["id"] for u in listed] == [avatar["id"]]
    listed = client.get(f"{URL}?profile=default", headers=auth).get_json()["items"]
    assert [u["id"] for u in listed] == [plain["id"]]
    assert len(client.get(URL, headers=auth).get_json()["items"]) == 2

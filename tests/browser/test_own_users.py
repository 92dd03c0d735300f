"""An app's own page, on another origin, uploads through the broker with the app's OpenID Connect
token: once with Uppy (the README's recipe, Uppy vendored for the test), once with the broker's
own ES module — in real Chromium, against the emulator, with the worker running."""

from __future__ import annotations

import base64
import io
import mimetypes
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from PIL import Image
from playwright.sync_api import expect

from broker.api.models import IdempotencyKey
from broker.auth.models import User
from broker.platform.db import db
from broker.uploads.models import Upload
from tests.browser.conftest import screenshot
from tests.support.oidc_issuer import AUDIENCE, Issuer, serve_issuer

pytestmark = pytest.mark.browser

APP_FILES = Path(__file__).resolve().parent / "app"


def _files() -> list[dict[str, str]]:
    """Three different images, as base64 for the page to turn into File objects."""
    out = []
    for n, (size, fmt, mime) in enumerate(
        [
            ((640, 480), "PNG", "image/png"),
            ((300, 800), "JPEG", "image/jpeg"),
            ((64, 64), "PNG", "image/png"),
        ]
    ):
        data = io.BytesIO()
        Image.new("RGB", size, (40 * n, 120, 200)).save(data, format=fmt)
        name = f"photo-{n}.{fmt.lower()}"
        out.append({"name": name, "type": mime, "b64": base64.b64encode(data.getvalue()).decode()})
    return out


@pytest.fixture
def app_site() -> Iterator[Issuer]:
    """The app: its identity provider and its pages, on one loopback origin of its own."""
    with serve_issuer() as site:
        site.new_key("k1")
        for path in APP_FILES.rglob("*"):
            if path.is_file():
                mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                if path.suffix in (".js", ".mjs"):
                    mime = "text/javascript"
                site.files["/" + path.relative_to(APP_FILES).as_posix()] = (mime, path.read_bytes())
        yield site


@pytest.fixture
def live_broker_settings(app_site: Issuer) -> dict[str, Any]:
    """The broker trusts the app's issuer and lets the app's origin call its API."""
    return {"OIDC_ISSUER": app_site.url, "OIDC_AUDIENCE": AUDIENCE, "CORS_ORIGINS": app_site.url}


_MAKE_FILES = """
    const toFile = (f) => {
        const text = atob(f.b64);
        const bytes = new Uint8Array(text.length);
        for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
        return new File([bytes], f.name, { type: f.type });
    };
"""

UPPY = (
    """async ({ broker, token, files }) => {"""
    + _MAKE_FILES
    + """
    const { brokerUppy } = await import("/uppy-recipe.js");
    const uppy = brokerUppy({ broker, token });
    for (const f of files) uppy.addFile({ name: f.name, type: f.type, data: toFile(f) });
    const result = await uppy.upload();
    return {
        failed: result.failed.map((f) => String(f.error)),
        uploads: result.successful.map((f) => {
            const { meta, progress } = uppy.getFile(f.id);
            return { id: meta.brokerId, status: meta.brokerStatus, progress: progress.percentage };
        }),
    };
}"""
)


MODULE = (
    """async ({ broker, token, files }) => {"""
    + _MAKE_FILES
    + """
    // The module the broker's own upload page uses, imported across origins from the broker.
    const { connect } = await import(`${broker}/static/js/client.js`);
    const client = connect({ baseUrl: broker, token });
    return Promise.all(files.map(async (f) => {
        const upload = await client.createUpload();
        let sent = 0;
        await client.sendFile(upload.upload_url, toFile(f), {
            onProgress: (loaded, total) => { sent = Math.round((100 * loaded) / total); },
        });
        const settled = await client.waitUntilSettled(upload.id);
        return { id: upload.id, status: settled.status, progress: sent };
    }));
}"""
)


def _account(live_broker: Any, subject: str) -> User:
    with live_broker.app.app_context():
        user = db.session.scalar(sa.select(User).where(User.external_subject == subject))
        assert user is not None
        db.session.expunge(user)
        return user


def _uploads_of(live_broker: Any, user: User) -> dict[str, str]:
    with live_broker.app.app_context():
        rows = db.session.scalars(sa.select(Upload).where(Upload.user_id == user.id))
        return {row.id: row.status for row in rows}


def test_uppy_on_the_apps_page_uploads_three_files_with_an_oidc_token(
    live_broker, app_site, emulator, page
) -> None:
    page.goto(f"{app_site.url}/index.html")
    token = app_site.token(sub="shopper-1")
    emulator.reset_counters()
    result = page.evaluate(UPPY, {"broker": live_broker.url, "token": token, "files": _files()})

    assert result["failed"] == []
    assert len(result["uploads"]) == 3
    assert {u["status"] for u in result["uploads"]} == {"ready"}
    assert {u["progress"] for u in result["uploads"]} == {100}
    counters = emulator.counters()
    assert counters.get("direct_upload") == 3  # exactly one upload URL per file
    assert counters.get("upload_url") == 3  # and one transfer each, straight to the image service
    shopper = _account(live_broker, "shopper-1")
    assert _uploads_of(live_broker, shopper) == {u["id"]: "ready" for u in result["uploads"]}
    errors = [text for kind, text in page.console_messages_seen if kind == "error"]
    assert errors == []


def test_the_brokers_own_module_on_the_apps_page_uploads_three_files(
    live_broker, app_site, emulator, page
) -> None:
    page.goto(f"{app_site.url}/index.html")
    token = app_site.token(sub="shopper-2")
    emulator.reset_counters()
    uploads = page.evaluate(MODULE, {"broker": live_broker.url, "token": token, "files": _files()})

    assert len(uploads) == 3
    assert {u["status"] for u in uploads} == {"ready"}
    assert {u["progress"] for u in uploads} == {100}
    counters = emulator.counters()
    assert counters.get("direct_upload") == 3
    assert counters.get("upload_url") == 3
    shopper = _account(live_broker, "shopper-2")
    assert _uploads_of(live_broker, shopper) == {u["id"]: "ready" for u in uploads}
    # Each create carried its own Idempotency-Key across origins, unasked.
    with live_broker.app.app_context():
        keys = db.session.scalars(
            sa.select(IdempotencyKey.key).where(IdempotencyKey.user_id == shopper.id)
        ).all()
    assert len(set(keys)) == 3
    errors = [text for kind, text in page.console_messages_seen if kind == "error"]
    assert errors == []


def test_the_readme_recipe_is_the_one_tested() -> None:
    """README's Uppy recipe and the file the browser test runs differ only in imports and a
    comment."""
    readme = (APP_FILES.parents[2] / "README.md").read_text()
    documented = readme.split('import XHRUpload from "@uppy/xhr-upload";\n\n', 1)[1]
    documented = documented.split("```", 1)[0]
    first, rest = documented.split("\n", 1)
    documented = first.split("  //", 1)[0] + "\n" + rest
    tested = (APP_FILES / "uppy-recipe.js").read_text()
    assert documented == tested[tested.index("export function") :]


COMPONENT = (
    """async ({ broker, token, files }) => {"""
    + _MAKE_FILES
    + """
    // The app's page embeds the broker's component, hands it the user's token and listens.
    await import(`${broker}/static/js/upload-broker.js`);
    const element = document.createElement("upload-broker");
    element.style.setProperty("--upload-broker-accent", "#6b21a8");
    element.token = token;
    window.results = [];
    window.progress = 0;
    element.addEventListener("upload-result", (e) => window.results.push(e.detail));
    element.addEventListener("upload-progress", () => { window.progress += 1; });
    const main = document.createElement("main");
    main.append(element);
    document.body.append(main);
}"""
)


def test_the_component_on_the_apps_page_uploads_three_files_with_an_oidc_token(
    live_broker, app_site, emulator, page
) -> None:
    from axe_playwright_python.sync_playwright import Axe

    page.goto(f"{app_site.url}/index.html")
    token = app_site.token(sub="shopper-3")
    emulator.reset_counters()
    page.evaluate(COMPONENT, {"broker": live_broker.url, "token": token, "files": []})
    # Picked as a user does, through the component's own file input (inside its shadow root).
    page.locator("upload-broker input[type=file]").set_input_files(
        files=[
            {"name": f["name"], "mimeType": f["type"], "buffer": base64.b64decode(f["b64"])}
            for f in _files()
        ]
    )
    items = page.locator("upload-broker li")
    expect(items).to_have_count(3)
    for i in range(3):
        expect(items.nth(i)).to_have_attribute("data-state", "ready", timeout=30_000)
    results = page.evaluate("window.results")
    assert sorted(r["name"] for r in results) == ["photo-0.png", "photo-1.jpeg", "photo-2.png"]
    assert {r["state"] for r in results} == {"ready"}
    assert {r["upload"]["status"] for r in results} == {"ready"}
    assert page.evaluate("window.progress") >= 3
    counters = emulator.counters()
    assert counters.get("direct_upload") == 3 and counters.get("upload_url") == 3
    shopper = _account(live_broker, "shopper-3")
    assert _uploads_of(live_broker, shopper) == {r["upload"]["id"]: "ready" for r in results}
    # Styled by the host through a custom property; reachable by keyboard; axe finds nothing
    # serious on it.
    button = page.locator("upload-broker [part~=button]")
    assert button.evaluate("(el) => getComputedStyle(el).backgroundColor") == "rgb(107, 33, 168)"
    page.keyboard.press("Tab")
    assert page.evaluate(
        "document.activeElement.shadowRoot.activeElement.getAttribute('part')"
    ) == ("dropzone")
    serious = [
        v["id"]
        for v in Axe().run(page).response["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert serious == []
    errors = [text for kind, text in page.console_messages_seen if kind == "error"]
    assert errors == []


def test_an_avatar_is_cropped_and_turned_by_keyboard_alone(
    live_broker, app_site, emulator, page
) -> None:
    from axe_playwright_python.sync_playwright import Axe

    from tests.browser.test_prepare import _stored

    page.goto(f"{app_site.url}/index.html")
    page.evaluate(
        COMPONENT,
        {"broker": live_broker.url, "token": app_site.token(sub="shopper-4"), "files": []},
    )
    page.evaluate("document.querySelector('upload-broker').rules = { aspect_ratio: 1 }")
    # 800x400: red on the left half, blue on the right.
    picture = Image.new("RGB", (800, 400), (20, 40, 220))
    picture.paste((220, 20, 20), (0, 0, 400, 400))
    data = io.BytesIO()
    picture.save(data, "PNG")
    page.locator("upload-broker input[type=file]").set_input_files(
        files=[{"name": "me.png", "mimeType": "image/png", "buffer": data.getvalue()}]
    )
    dialog = page.locator("upload-broker dialog")
    expect(dialog).to_be_visible()
    screenshot(page, "component-crop-dialog")
    serious = [
        v["id"]
        for v in Axe().run(page).response["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert serious == []
    # The frame has the focus: Tab, Tab to "Turn right" (the red half comes to the top), back to
    # the frame, move it to the top, then on to "Use this crop".
    keys = page.keyboard
    for key in ("Tab", "Tab", "Enter", "Shift+Tab", "Shift+Tab"):
        keys.press(key)
    for _ in range(3):
        keys.press("Shift+ArrowUp")
    for key in ("Tab", "Tab", "Tab", "Enter"):
        keys.press(key)
    item = page.locator("upload-broker li")
    expect(item).to_have_attribute("data-state", "ready", timeout=30_000)
    result = page.evaluate("window.results[0]")
    stored = Image.open(io.BytesIO(_stored(live_broker, emulator, result["upload"]["id"])))
    assert stored.size == (400, 400)
    rgb = stored.convert("RGB")
    for point in ((10, 10), (200, 200), (390, 390)):
        r, g, b = rgb.getpixel(point)
        assert r > 180 and b < 80, (point, (r, g, b))


def test_the_component_offers_the_crop_dialog_only_to_pictures_of_another_shape(
    live_broker, app_site, emulator, page
) -> None:
    from tests.browser.test_prepare import _stored
    from tests.browser.test_upload_page import _png

    page.goto(f"{app_site.url}/index.html")
    page.evaluate(
        COMPONENT,
        {"broker": live_broker.url, "token": app_site.token(sub="shopper-5"), "files": []},
    )
    # Every crop dialog the component opens, by its title, however briefly it is open.
    page.evaluate(
        """() => {
            window.dialogs = [];
            const root = document.querySelector("upload-broker").shadowRoot;
            new MutationObserver((changes) => {
                for (const change of changes) {
                    for (const node of change.addedNodes) {
                        if (node.localName === "dialog") {
                            window.dialogs.push(node.querySelector("h2").textContent);
                        }
                    }
                }
            }).observe(root, { childList: true, subtree: true });
            document.querySelector("upload-broker").rules = { aspect_ratio: 1 };
        }"""
    )
    square, nearly, wide = _png(300, 300), _png(301, 300), _png(800, 400)
    page.locator("upload-broker input[type=file]").set_input_files(
        files=[
            {"name": "square.png", "mimeType": "image/png", "buffer": square},
            # Within the 1 % tolerance of 1:1: already the right shape.
            {"name": "nearly.png", "mimeType": "image/png", "buffer": nearly},
            {"name": "wide.png", "mimeType": "image/png", "buffer": wide},
        ]
    )
    items = page.locator("upload-broker li")
    for name in ("square.png", "nearly.png"):
        expect(items.filter(has_text=name)).to_have_attribute("data-state", "ready")
    dialog = page.locator("upload-broker dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("h2")).to_have_text("Crop wide.png")
    dialog.get_by_role("button", name="Cancel").click()
    expect(items.filter(has_text="wide.png")).to_have_attribute("data-state", "cancelled")
    assert page.evaluate("window.dialogs") == ["Crop wide.png"]
    results = {r["name"]: r for r in page.evaluate("window.results")}
    assert {name: r["state"] for name, r in results.items()} == {
        "square.png": "ready",
        "nearly.png": "ready",
        "wide.png": "cancelled",
    }
    for name, data in (("square.png", square), ("nearly.png", nearly)):
        assert _stored(live_broker, emulator, results[name]["upload"]["id"]) == data
    counters = emulator.counters()
    assert counters.get("direct_upload") == 2, counters


def _ifd(entries: list[tuple[int, int, int, bytes]], next_ifd: int = 0) -> bytes:
    """A big-endian TIFF directory: (tag, type, count, value of 4 bytes or fewer)."""
    out = struct.pack(">H", len(entries))
    for tag, kind, count, value in entries:
        out += struct.pack(">HHI", tag, kind, count) + value.ljust(4, b"\0")
    return out + struct.pack(">I", next_ifd)


def _exif_with_thumbnail(thumbnail: bytes) -> bytes:
    """An EXIF block as a camera writes one: make and model, orientation 6 (stored sideways),
    the pixel size (one LONG, one SHORT), a GPS position and a preview thumbnail (IFD1)."""
    make, model = b"PhoneMaker\0", b"Phone 15 Pro\0"
    ifd0, strings = 8, 8 + 2 + 5 * 12 + 4
    exif_ifd = strings + len(make) + len(model)
    gps_ifd = exif_ifd + 2 + 2 * 12 + 4
    ifd1 = gps_ifd + 2 + 1 * 12 + 4
    thumb_at = ifd1 + 2 + 2 * 12 + 4
    long = lambda n: struct.pack(">I", n)  # noqa: E731
    tiff = b"MM\0*" + long(ifd0)
    tiff += _ifd(
        [
            (0x010F, 2, len(make), long(strings)),
            (0x0110, 2, len(model), long(strings + len(make))),
            (0x0112, 3, 1, struct.pack(">H", 6)),
            (0x8769, 4, 1, long(exif_ifd)),
            (0x8825, 4, 1, long(gps_ifd)),
        ],
        next_ifd=ifd1,
    )
    tiff += make + model
    tiff += _ifd([(0xA002, 4, 1, long(1200)), (0xA003, 3, 1, struct.pack(">H", 900))])
    tiff += _ifd([(0x0001, 2, 2, b"N\0")])
    tiff += _ifd([(0x0201, 4, 1, long(thumb_at)), (0x0202, 4, 1, long(len(thumbnail)))])
    assert len(tiff) == thumb_at
    return b"Exif\0\0" + tiff + thumbnail


def test_the_component_keeps_a_jpegs_metadata_through_a_resize_when_asked(
    live_broker, app_site, emulator, page
) -> None:
    from tests.browser.test_page_checks import VIEWPORTS
    from tests.browser.test_prepare import _exif, _stored

    page.goto(f"{app_site.url}/index.html")
    page.evaluate(
        COMPONENT,
        {"broker": live_broker.url, "token": app_site.token(sub="shopper-6"), "files": []},
    )
    page.evaluate(
        "document.querySelector('upload-broker').rules ="
        " { max_dimension: 600, keep_metadata: true }"
    )
    expect(page.locator("upload-broker #limits")).to_contain_text("photo details are kept")
    thumb = io.BytesIO()
    Image.new("RGB", (16, 12), (250, 250, 0)).save(thumb, "JPEG")
    # 1200x900 as the sensor saw it, red at its top-left; shown turned (orientation 6).
    picture = Image.new("RGB", (1200, 900), (30, 90, 160))
    picture.paste((255, 0, 0), (0, 0, 200, 200))
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF'
        b' xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description'
        b' xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    original = io.BytesIO()
    picture.save(
        original,
        "JPEG",
        quality=90,
        exif=_exif_with_thumbnail(thumb.getvalue()),
        comment=b"Taken on holiday",
        xmp=xmp,
    )
    page.locator("upload-broker input[type=file]").set_input_files(
        files=[{"name": "holiday.jpg", "mimeType": "image/jpeg", "buffer": original.getvalue()}]
    )
    expect(page.locator("upload-broker li")).to_have_attribute("data-state", "ready")
    result = page.evaluate("window.results[0]")
    stored = _stored(live_broker, emulator, result["upload"]["id"])
    with (
        Image.open(io.BytesIO(original.getvalue())) as before,
        Image.open(io.BytesIO(stored)) as image,
    ):
        # Resized and drawn upright: portrait, the sensor's top-left (red) now top-right.
        assert image.size == (450, 600)
        rgb = image.convert("RGB")
        r, g, b = rgb.getpixel((450 - 20, 20))
        assert r > 200 and g < 60 and b < 60, (r, g, b)
        exif, was = image.getexif(), before.getexif()
        # Every detail kept, made true of the new picture: upright, the new pixel size.
        assert (exif[0x010F], exif[0x0110]) == ("PhoneMaker", "Phone 15 Pro")
        assert exif[0x0112] == 1 and was[0x0112] == 6
        assert exif.get_ifd(0x8825) == was.get_ifd(0x8825) == {1: "N"}
        assert exif.get_ifd(0x8769) == {0xA002: 450, 0xA003: 600}
        assert image.info["comment"] == b"Taken on holiday"
        assert b'tiff:Orientation="1"' in image.info["xmp"]
        # The preview thumbnail (the picture as it was, sideways) is gone, bytes and all.
        assert not exif.get_ifd(0x1) and thumb.getvalue() not in stored
        assert thumb.getvalue() in original.getvalue()

    # A PNG that must be re-encoded cannot keep its details (the canvas writes none): the
    # answer says they were removed rather than claim them kept.
    png = io.BytesIO()
    picture.save(png, "PNG", exif=_exif(orientation=1))
    answer = page.evaluate(
        """async ({ broker, b64 }) => {
            const { prepare } = await import(`${broker}/static/js/prepare.js`);
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const file = new File([bytes], "shot.png", { type: "image/png" });
            const out = await prepare(file, { max_dimension: 600, keep_metadata: true });
            return { stripped: out.stripped, resized: out.resized };
        }""",
        {"broker": live_broker.url, "b64": base64.b64encode(png.getvalue()).decode()},
    )
    assert answer == {"stripped": True, "resized": True}
    for device, (width, height) in VIEWPORTS.items():
        page.set_viewport_size({"width": width, "height": height})
        screenshot(page, f"component-keep-metadata-{device}-{width}x{height}")

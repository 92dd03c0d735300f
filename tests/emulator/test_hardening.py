"""The emulator runs on developers' machines: SVG cannot script its origin, a small bomb cannot
eat the memory, and no web page can drive its controls."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import requests
from PIL import Image, ImageOps

from broker.emulator.imaging import render
from broker.emulator.testing import EmulatorServer, ImagesClient

SCRIPTED_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
    b"<script>document.documentElement.setAttribute('data-ran', '1')</script><rect/></svg>"
)


def test_svg_is_delivered_with_a_csp_that_forbids_script(
    api: ImagesClient, http: requests.Session
) -> None:
    """An uploaded SVG is served as uploaded but under `default-src 'none'` and `sandbox`, so
    opening its delivery URL runs nothing on the emulator's origin; rasters are unchanged."""
    svg = api.upload(SCRIPTED_SVG, filename="logo.svg")
    with http.get(svg["variants"][0]) as resp:
        assert resp.status_code == 200 and resp.content == SCRIPTED_SVG
        csp = [d.strip() for d in resp.headers["Content-Security-Policy"].split(";")]
        assert "default-src 'none'" in csp and "sandbox" in csp
        assert not any(d.startswith("script-src") for d in csp)
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    png = api.upload(_png_1bit(4, 4), filename="dot.png")
    with http.get(png["variants"][0]) as resp:
        assert resp.status_code == 200 and "Content-Security-Policy" not in resp.headers


@pytest.mark.parametrize(
    ("path", "kwargs"),
    [
        ("/_emulator/reset", {}),
        ("/_emulator/reset", {"data": "x=1"}),  # a form post
        ("/_emulator/reset", {"data": "{}", "headers": {"Content-Type": "text/plain"}}),
        (
            "/_emulator/counters/reset",
            {"data": b"", "headers": {"Content-Type": "multipart/form-data"}},
        ),
        (
            "/_emulator/clock",
            {"data": '{"advance_seconds": 600}', "headers": {"Content-Type": "text/plain"}},
        ),
    ],
    ids=["empty", "form", "text", "multipart", "clock-as-text"],
)
def test_control_writes_need_a_json_content_type(
    emulator: EmulatorServer, http: requests.Session, path: str, kwargs: dict[str, object]
) -> None:
    """What a page on any site may send without a preflight (no body, a form, text/plain) is
    refused with 415 and changes nothing; the same call as JSON works."""
    emulator.advance(60)
    with http.post(f"{emulator.url}{path}", **kwargs) as resp:  # type: ignore[arg-type]
        assert resp.status_code == 415
        assert resp.json()["errors"][0]["code"] == 5415
    with http.get(f"{emulator.url}/_emulator/clock") as resp:
        assert resp.json()["offset_seconds"] == 60
    with http.post(f"{emulator.url}/_emulator/reset", json={}) as resp:
        assert resp.status_code == 200
    with http.get(f"{emulator.url}/_emulator/clock") as resp:
        assert resp.json()["offset_seconds"] == 0


def _png_1bit(width: int, height: int) -> bytes:
    """A black 1-bit PNG built row by row with zlib (never held decoded in this process)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" * (1 + (width + 7) // 8)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height, 9))
        + chunk(b"IEND", b"")
    )


# The peak is read from VmHWM, this process's own high-water mark: ru_maxrss carries the
# parent's peak over the exec, so a big pytest process would hide what rendering takes.
_MEASURE = """
import re, sys
from broker.emulator.imaging import render
def peak_kb():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1))
data = open(sys.argv[1], "rb").read()
before = peak_kb()
body, kind = render(data, "PNG", "cover", 256, 256, "none")
grown = peak_kb() - before
print(grown // 1024, kind, len(body))
"""


def test_a_12_kb_bilevel_png_of_100_megapixels_renders_in_bounded_memory(tmp_path: Path) -> None:
    """The 12,000 x 8,333 1-bit PNG (12 KB) that grew the emulator by ~590 MB while rendering a
    thumbnail now costs at most 250 MB (the decoded bilevel image itself is 100 MB)."""
    bomb = _png_1bit(12_000, 8_333)
    assert len(bomb) < 16_000
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    grown_mb, kind, size = out.stdout.split()
    print(f"rendering the bomb grew the process by {grown_mb} MB")
    assert kind == "image/png" and int(size) > 0
    assert int(grown_mb) < 250, out.stdout


def _photo(width: int, height: int, orientation: int = 1) -> bytes:
    """A JPEG with smooth gradients and detail (and an EXIF orientation)."""
    img = Image.radial_gradient("L").resize((width, height)).convert("RGB")
    stripes = Image.linear_gradient("L").resize((width, height)).rotate(30)
    img = Image.merge("RGB", (img.getchannel(0), stripes, img.getchannel(0).transpose(0)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [1, 6, 3])
@pytest.mark.parametrize("fit", ["scale-down", "cover", "pad"])
def test_bounded_decoding_gives_the_same_picture(orientation: int, fit: str) -> None:
    """Draft decoding and reduction before the LANCZOS resize give the picture a full decode
    gave: same size, mode and orientation, pixels within a couple of levels on average."""
    data = _photo(3000, 2000, orientation)
    body, _ = render(data, "JPEG", fit, 256, 256, "none")
    got = Image.open(io.BytesIO(body))
    full = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    reference = Image.open(io.BytesIO(render_reference(full, fit)))
    assert (got.size, got.mode) == (reference.size, reference.mode)
    diff = [abs(a - b) for a, b in zip(got.tobytes(), reference.tobytes(), strict=True)]
    assert sum(diff) / len(diff) < 3.0


def render_reference(full: Image.Image, fit: str) -> bytes:
    """The old pipeline: the whole image decoded, turned, resized with LANCZOS at once."""
    from broker.emulator.imaging import _geometry

    rw, rh, ow, oh = _geometry(full.width, full.height, fit, 256, 256)
    img = full.resize((rw, rh), Image.Resampling.LANCZOS)
    if fit == "pad":
        canvas = Image.new(img.mode, (ow, oh), "white")
        canvas.paste(img, ((ow - rw) // 2, (oh - rh) // 2))
        img = canvas
    elif (ow, oh) != (rw, rh):
        left, top = (rw - ow) // 2, (rh - oh) // 2
        img = img.crop((left, top, left + ow, top + oh))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _png_palette(width: int, height: int) -> bytes:
    """An 8-bit palette PNG with a transparent entry, compressed row by row (never held
    decoded in this process)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    squeeze = zlib.compressobj(9)
    rows = [squeeze.compress(b"\x00" + bytes([y % 2]) * width) for y in range(height)]
    pixels = b"".join(rows) + squeeze.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"PLTE", b"\x00\x00\x00\xff\x80\x00")
        + chunk(b"tRNS", b"\x00")  # entry 0 transparent: the image converts to RGBA
        + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )


def test_a_transparent_palette_png_of_100_megapixels_renders_in_bounded_memory(
    tmp_path: Path,
) -> None:
    """A 12,000 x 8,333 palette PNG with transparency (decoded: 100 MB, one byte a pixel) was
    converted to RGBA at full size (400 MB more) before shrinking; now a band at a time."""
    path = tmp_path / "palette.png"
    path.write_bytes(_png_palette(12_000, 8_333))
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    grown_mb, kind, size = out.stdout.split()
    print(f"rendering the palette image grew the process by {grown_mb} MB")
    assert kind == "image/png" and int(size) > 0
    assert int(grown_mb) < 250, out.stdout


@pytest.mark.parametrize("mode", ["P", "1", "CMYK"])
def test_shrinking_a_band_at_a_time_gives_exactly_the_whole_conversion(mode: str) -> None:
    """Converting and reducing in bands (sizes not multiples of the factor, many bands) gives
    the same pixels as converting the whole image first, then reducing it."""
    from broker.emulator.imaging import _shrink, _working_mode

    noise = Image.effect_noise((701, 457), 80).convert("RGB")
    if mode == "P":
        img = noise.quantize(64)
        img.info["transparency"] = 5
    else:
        img = noise.convert(mode)
    need = (50, 40)  # factor min(701 // 150, 457 // 120) = 3
    banded = _shrink(img, need, band_pixels=701 * 3 * 7)  # 21 rows a band: 22 bands
    whole = img.convert(_working_mode(img)).reduce(3)
    assert banded.mode == whole.mode and banded.size == whole.size == (234, 153)
    assert banded.tobytes() == whole.tobytes()

"""Decoding uploads and rendering variants with Pillow (no Flask here).

Uploads are sniffed by decoding, never by file name or content type. Pillow's own
decompression-bomb check is bypassed on purpose: its threshold (~89 MP) is below Cloudflare's
100 MP limit, and the explicit side/pixel limits below are checked before any pixel is decoded.
HEIC/HEIF (what iPhones take; Cloudflare accepts it as input) is decoded by pillow-heif; its
variants are delivered as JPEG, since browsers other than Safari cannot show HEIC.

Decoding is also bounded by memory before any pixel is allocated: an image whose pixels would
take more than MAX_DECODE_BYTES once decoded (Pillow keeps RGB and RGBA at 4 bytes a pixel,
palette and grey at 1) is refused with 5400 on upload and never rendered. JPEG is first decoded
at a reduced DCT scale (draft mode) instead, which still reads every byte of it. A 379 KB PNG
can declare 10,000 x 10,000 RGBA pixels (400 MB): Cloudflare accepts it, the emulator refuses
it rather than take that memory.

Rendering keeps memory bounded by the output, not the input: a JPEG is decoded at the smallest
DCT scale that still covers the variant (draft mode), any image is first cut down by an integer
factor (`reduce`, keeping at least REDUCING_GAP times the output size so the final LANCZOS
resize gives the same picture), palette, bilevel and CMYK images are converted for that a band
of rows at a time (never a full-size RGBA copy), bilevel images are widened to 8-bit grey rather
than RGB, and the EXIF orientation is applied to the small result, not to a copy of the original.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import pillow_heif
from PIL import Image

from broker.emulator.errors import CfError

MAX_BYTES = 10 * 1024 * 1024
MAX_SIDE = 12_000
MAX_PIXELS = 100_000_000
MAX_DECODE_BYTES = 128 * 1024 * 1024

RASTER_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "HEIF")
CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "SVG": "image/svg+xml",
    "HEIF": "image/heic",
}
# The format variants of an original are rendered in: the original's, except HEIC.
OUTPUT_FORMATS = {"HEIF": "JPEG"}
EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "SVG": "svg",
    "HEIF": "jpg",
}
# ISO-BMFF `ftyp` brands of HEIC/HEIF; AVIF shares the container and generic brands but is not
# accepted (Cloudflare takes AVIF input on Enterprise plans only).
HEIC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"})
HEIF_GENERIC_BRANDS = frozenset({b"mif1", b"msf1"})
AVIF_BRANDS = frozenset({b"avif", b"avis"})
FORMAT_FOR_CONTENT_TYPE = {v: k for k, v in CONTENT_TYPES.items()}
COPYRIGHT_TAG = 0x8298
ORIENTATION_TAG = 0x0112
# What the EXIF orientation asks for (ImageOps.exif_transpose's table).
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Cheap integer reduction stops at this multiple of the output size; LANCZOS does the rest.
REDUCING_GAP = 3
# Pixels of the source converted at once while shrinking (see _shrink): 4 MP, 16 MB in RGBA.
BAND_PIXELS = 4_000_000
FITS = ("scale-down", "contain", "cover", "crop", "pad")
METADATA_MODES = ("keep", "copyright", "none")


@dataclass(frozen=True)
class ImageInfo:
    """What decoding an upload found."""

    format: str
    width: int | None
    height: int | None

    @property
    def content_type(self) -> str:
        """Return the MIME type of the format."""
        return CONTENT_TYPES[self.format]


def output_content_type(fmt: str) -> str:
    """Return the content type variants of a `fmt` original are delivered in."""
    return CONTENT_TYPES[OUTPUT_FORMATS.get(fmt, fmt)]


def ftyp_brands(data: bytes) -> list[bytes]:
    """Return the `ftyp` brands (major first) of an ISO-BMFF file, or [] if it is not one."""
    if len(data) < 16 or data[4:8] != b"ftyp":
        return []
    size = int.from_bytes(data[:4], "big")
    end = min(len(data), size if size >= 16 else 16)
    return [data[8:12]] + [data[i : i + 4] for i in range(16, end - 3, 4)]


def is_heic(data: bytes) -> bool:
    """Tell whether the bytes carry HEIC/HEIF brands (and are not AVIF)."""
    brands = set(ftyp_brands(data))
    return bool(brands & HEIC_BRANDS) or bool(
        brands & HEIF_GENERIC_BRANDS and not brands & AVIF_BRANDS
    )


def register_heif() -> None:
    """Teach Pillow to open HEIC/HEIF (idempotent; done on first use, not at import)."""
    if "HEIF" not in Image.OPEN:
        pillow_heif.register_heif_opener()


def _open_raster(data: bytes) -> Image.Image:
    """Open JPEG/PNG/GIF/WebP/HEIC bytes lazily, without Pillow's global bomb check."""
    Image.init()
    register_heif()
    prefix = data[:16]
    for fmt in RASTER_FORMATS:
        if fmt == "HEIF" and not is_heic(data):
            continue
        factory, accept = Image.OPEN[fmt]
        result = accept(prefix) if accept else True
        if not result or isinstance(result, str):
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, OSError, ValueError, IndexError, TypeError, EOFError):
            continue
    raise CfError(5455, "Bad request: unsupported image format")


def _decoded_bytes(img: Image.Image) -> int:
    """Return what decoding `img` at its current size allocates for its pixels."""
    bands = 1 if img.mode in ("1", "L", "P") else 2 if img.mode.startswith("I;16") else 4
    if img.format == "HEIF":
        bands *= 2  # pillow-heif's own decoded buffer, copied into Pillow's
    return img.width * img.height * bands


def _bound_decoding(img: Image.Image, budget: int) -> None:
    """Make `img` decode within `budget` bytes (JPEG at a smaller DCT scale); else raise 5400."""
    width, height = img.size
    if _decoded_bytes(img) > budget and img.format == "JPEG":
        img.draft(img.mode, (-(-width // 8), -(-height // 8)))
    if _decoded_bytes(img) > budget:
        raise CfError(
            5400,
            f"Image of {width}x{height} {img.mode} pixels exceeds the emulator's decoding "
            f"budget of {budget // (1024 * 1024)} MiB",
        )


def _svg_info(data: bytes) -> ImageInfo | None:
    head = data[:1024].lstrip()
    if not (head.startswith(b"<") and b"<svg" in data[:4096]):
        return None
    try:
        # Uploaded SVG is untrusted, but ElementTree never fetches external entities and the
        # bundled expat refuses entity-expansion bombs; the tree is only inspected, not served.
        root = ET.fromstring(data)  # noqa: S314
    except ET.ParseError:
        return None
    if root.tag not in ("svg", "{http://www.w3.org/2000/svg}svg"):
        return None
    return ImageInfo("SVG", None, None)


def inspect_image(data: bytes, budget: int = MAX_DECODE_BYTES) -> ImageInfo:
    """Decode an upload fully and check Cloudflare's limits; raise CfError when it is refused."""
    if len(data) > MAX_BYTES:
        raise CfError(5413, "Image exceeds the 10 MB size limit")
    svg = _svg_info(data)
    if svg is not None:
        return svg
    img = _open_raster(data)
    try:
        width, height = img.size
        if width > MAX_SIDE or height > MAX_SIDE:
            raise CfError(5400, f"Image dimensions exceed {MAX_SIDE} px per side")
        if width * height > MAX_PIXELS:
            raise CfError(5400, "Image exceeds the 100 megapixel limit")
        _bound_decoding(img, budget)
        try:
            img.load()
        except Exception as exc:  # any decoder failure means "not a usable image"
            raise CfError(5455, "Bad request: image could not be decoded") from exc
        return ImageInfo(str(img.format), width, height)
    finally:
        img.close()


def _geometry(w: int, h: int, fit: str, bw: int, bh: int) -> tuple[int, int, int, int]:
    """Return (resized w, resized h, output w, output h) for a fit mode."""
    fx, fy = bw / w, bh / h
    if fit == "scale-down":
        s = min(1.0, fx, fy)
    elif fit in ("contain", "pad"):
        s = min(fx, fy)
    elif fit == "cover":
        s = max(fx, fy)
    else:  # crop: cover that never enlarges
        s = min(1.0, max(fx, fy))
    rw, rh = max(1, round(w * s)), max(1, round(h * s))
    if fit == "pad":
        return rw, rh, bw, bh
    if fit in ("cover", "crop"):
        return rw, rh, min(bw, rw), min(bh, rh)
    return rw, rh, rw, rh


def _working_mode(img: Image.Image) -> str:
    """Return the mode `img` is resized in: RGB, RGBA or L (grey, for bilevel images)."""
    if img.mode in ("RGB", "RGBA", "L"):
        return img.mode
    if img.mode == "1":
        return "L"  # a third of RGB's memory; made RGB once small (_finish_mode)
    has_alpha = img.mode in ("LA", "PA", "RGBa", "La") or "transparency" in img.info
    return "RGBA" if has_alpha else "RGB"


def _finish_mode(img: Image.Image, source_mode: str) -> Image.Image:
    """Give a bilevel source's output the RGB mode it always had."""
    return img.convert("RGB") if source_mode == "1" and img.mode == "L" else img


def _shrink(img: Image.Image, need: tuple[int, int], band_pixels: int = BAND_PIXELS) -> Image.Image:
    """Bring `img` to its working mode, cut down by an integer factor while it stays
    REDUCING_GAP times `need`.

    A palette, bilevel or CMYK image is converted a band of rows at a time, each band reduced
    at once, so the full-size converted copy (four bytes a pixel for a palette image with
    transparency) never exists. Bands are whole multiples of the factor tall, so every block
    `reduce` averages lies in one band: the picture is the same as converting it all first.
    """
    mode = _working_mode(img)
    factor = min(img.width // (need[0] * REDUCING_GAP), img.height // (need[1] * REDUCING_GAP))
    if factor < 2:
        return img if img.mode == mode else img.convert(mode)
    if img.mode == mode:
        return img.reduce(factor)
    rows = max(1, band_pixels // (img.width * factor)) * factor
    out = Image.new(mode, (-(-img.width // factor), -(-img.height // factor)))
    for top in range(0, img.height, rows):
        band = img.crop((0, top, img.width, min(img.height, top + rows)))
        out.paste(band.convert(mode).reduce(factor), (0, top // factor))
    return out


def _exif_for(exif: Image.Exif, mode: str, oriented: bool) -> bytes | None:
    if mode == "none":
        return None
    if mode == "copyright":
        kept = Image.Exif()
        if COPYRIGHT_TAG in exif:
            kept[COPYRIGHT_TAG] = exif[COPYRIGHT_TAG]
        exif = kept
    elif oriented and ORIENTATION_TAG in exif:
        del exif[ORIENTATION_TAG]  # applied to the pixels: a viewer must not turn it again
    return exif.tobytes() if len(exif) else None


def render(
    data: bytes,
    fmt: str,
    fit: str,
    width: int,
    height: int,
    metadata: str,
    budget: int = MAX_DECODE_BYTES,
) -> tuple[bytes, str]:
    """Transform original bytes for a variant; return (bytes, content type).

    The output keeps the original format (Cloudflare would negotiate AVIF/WebP; the emulator
    stays predictable), except HEIC, rendered as JPEG. SVG is served as uploaded, as Cloudflare
    does not resize it.
    """
    fmt = OUTPUT_FORMATS.get(fmt, fmt)
    if fmt == "SVG":
        return data, CONTENT_TYPES["SVG"]
    src = _open_raster(data)
    try:
        src.seek(0)  # animated GIF/WebP: the first frame only
        exif = src.getexif()
        turn = ORIENTATIONS.get(exif.get(ORIENTATION_TAG, 1))
        sideways = turn in (
            Image.Transpose.TRANSPOSE,
            Image.Transpose.ROTATE_270,
            Image.Transpose.TRANSVERSE,
            Image.Transpose.ROTATE_90,
        )
        w, h = (src.height, src.width) if sideways else src.size  # as the viewer sees it
        rw, rh, ow, oh = _geometry(w, h, fit, width, height)
        need = (rh, rw) if sideways else (rw, rh)  # in the source's own orientation
        source_mode = src.mode
        src.draft(src.mode, need)  # JPEG: decode at the smallest DCT scale covering `need`
        _bound_decoding(src, budget)  # an original stored before the bound: never decoded
        img = _shrink(src, need)
        if turn is not None:
            img = img.transpose(turn)
        if (rw, rh) != img.size:
            img = img.resize((rw, rh), Image.Resampling.LANCZOS)
        img = _finish_mode(img, source_mode)
        if fit == "pad":
            canvas = Image.new(img.mode, (ow, oh), "white")
            canvas.paste(img, ((ow - rw) // 2, (oh - rh) // 2))
            img = canvas
        elif (ow, oh) != (rw, rh):
            left, top = (rw - ow) // 2, (rh - oh) // 2
            img = img.crop((left, top, left + ow, top + oh))
        exif_bytes = _exif_for(exif, metadata, oriented=turn is not None)
        out = io.BytesIO()
        params: dict[str, object] = {}
        if exif_bytes and fmt in ("JPEG", "PNG", "WEBP"):
            params["exif"] = exif_bytes
        if fmt == "JPEG":
            if img.mode not in ("RGB", "L"):
                img = img.convert("RGB")
            img.save(out, "JPEG", quality=85, **params)
        elif fmt == "WEBP":
            img.save(out, "WEBP", quality=85, **params)
        else:
            img.save(out, fmt, **params)
        return out.getvalue(), CONTENT_TYPES[fmt]
    finally:
        src.close()

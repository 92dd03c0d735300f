"""Image delivery at `/<account_hash>/<image_id>/<variant>`, like imagedelivery.net.

Outputs are rendered once per (image, variant options) and cached on disk; an edited variant
gets a new cache key, a deleted image or an access change drops the image's cache folder.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from flask import Blueprint, Response, request
from flask.sansio.blueprints import BlueprintSetupState
from werkzeug.routing import BaseConverter
from werkzeug.wrappers import Response as BaseResponse

from broker.emulator.core import DELIVERY_BLUEPRINT, current_emulator
from broker.emulator.imaging import EXTENSIONS, FORMAT_FOR_CONTENT_TYPE, output_content_type, render
from broker.emulator.signing import verify
from broker.emulator.store import ImageRecord, VariantRecord, atomic_write

bp = Blueprint(DELIVERY_BLUEPRINT, __name__)


class AccountHashConverter(BaseConverter):
    """One path segment that is not a prefix of the emulator's other routes."""

    # Without this, `/client/v4/…/unknown` would be read as a delivery URL.
    regex = r"(?!(?:client|upload|_emulator|batch)/)[^/]+"


@bp.record_once
def _register_converter(state: BlueprintSetupState) -> None:
    state.app.url_map.converters["account_hash"] = AccountHashConverter


PUBLIC_MAX_AGE = 172_800  # Cloudflare's default browser TTL for Images: two days.

# An SVG is a document that can carry script. Served as uploaded, it is locked down: no script,
# no fetches, a sandboxed origin, and never sniffed as anything else.
SVG_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; sandbox",
    "X-Content-Type-Options": "nosniff",
}


class DeliveryError(Exception):
    """A delivery refusal, answered as text with `Cf-Resized: err=<code>`."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> Response:
        """Render the refusal."""
        return Response(
            f"ERROR {self.code}: {self.message}\n",
            status=self.status,
            mimetype="text/plain",
            headers={"Cf-Resized": f"err={self.code}", "Cache-Control": "no-store"},
        )


@bp.errorhandler(DeliveryError)
def _refused(err: DeliveryError) -> Response:
    return err.response()


@bp.after_request
def _cors(resp: Response) -> Response:
    resp.headers["Access-Control-Allow-Origin"] = "*"
    return resp


def _not_found(what: str) -> DeliveryError:
    return DeliveryError(404, 9431, f"{what} not found")


def _request_paths() -> list[str]:
    """Return the request path as decoded and as sent: the signer may have used either."""
    paths = [request.path]
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    if raw:
        paths.append(raw.split("?", 1)[0])
    return paths


def _signed_ok(image: ImageRecord, variant: VariantRecord) -> bool:
    emu = current_emulator()
    if not image.require_signed or variant.never_require_signed:
        return True
    keys = [value for _, value in emu.store.list_keys()]
    query = request.query_string.decode("latin-1")
    return verify(_request_paths(), query, keys, int(emu.now().timestamp()))


def _output(image: ImageRecord, variant: VariantRecord) -> tuple[bytes, str, bool]:
    """Return (bytes, content type, cache hit) for an image variant."""
    store = current_emulator().store
    fmt = FORMAT_FOR_CONTENT_TYPE.get(image.content_type or "", "PNG")
    path = store.image_cache_dir(image.id) / f"{variant.id}-{variant.digest()}.{EXTENSIONS[fmt]}"
    try:
        return path.read_bytes(), output_content_type(fmt), True
    except FileNotFoundError:
        pass
    body, content_type = render(
        store.read_blob(image.id),
        fmt,
        variant.fit,
        variant.width,
        variant.height,
        variant.metadata,
    )
    atomic_write(path, body)
    return body, content_type, False


@bp.get("/<account_hash:account_hash>/<path:image_id>/<variant>")
def delivery(account_hash: str, image_id: str, variant: str) -> BaseResponse:
    """Serve an image transformed per a named variant; private images need a signed URL."""
    emu = current_emulator()
    if account_hash != emu.account_hash:
        raise _not_found("Account")
    image = emu.store.get_image(image_id)
    if image is None or image.draft:
        raise _not_found("Image")
    named = emu.store.get_variant(variant)
    if named is None:
        raise _not_found("Variant")
    if not _signed_ok(image, named):
        raise DeliveryError(403, 9425, "Access denied: a valid signed URL is required")
    body, content_type, hit = _output(image, named)
    resp: BaseResponse = Response(body, content_type=content_type)
    if content_type == "image/svg+xml":
        resp.headers.update(SVG_HEADERS)
    if image.require_signed and not named.never_require_signed:
        exp = int(dict(parse_qsl(request.query_string.decode("latin-1")))["exp"])
        max_age = max(0, min(PUBLIC_MAX_AGE, exp - int(emu.now().timestamp())))
        resp.headers["Cache-Control"] = f"private, max-age={max_age}"
    else:
        resp.headers["Cache-Control"] = f"public, max-age={PUBLIC_MAX_AGE}"
    resp.headers["X-Emulator-Cache"] = "hit" if hit else "miss"
    resp.set_etag(f"{image.uploaded_ms:x}-{named.id}-{named.digest()}")
    resp = resp.make_conditional(request)
    # The server adds its own Date; werkzeug's conditional handling would make it a duplicate.
    del resp.headers["Date"]
    return resp

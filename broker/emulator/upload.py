"""The one-time upload URLs that browsers and apps POST a file to, without credentials."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from broker.emulator.core import UPLOAD_BLUEPRINT, Emulator, current_emulator, rfc3339_ms
from broker.emulator.errors import CfError, envelope
from broker.emulator.imaging import MAX_BYTES, inspect_image
from broker.emulator.store import ImageRecord
from broker.emulator.validation import MAX_FILENAME

bp = Blueprint(UPLOAD_BLUEPRINT, __name__)

PREFLIGHT_MAX_AGE = 86400


@bp.after_request
def _cors(resp: Response) -> Response:
    # The upload page lives on another origin (the broker); no credentials are ever sent.
    resp.headers["Access-Control-Allow-Origin"] = "*"
    resp.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
    resp.headers["Access-Control-Allow-Headers"] = request.headers.get(
        "Access-Control-Request-Headers", "Content-Type"
    )
    resp.headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE)
    resp.vary.add("Origin")
    return resp


@bp.route(
    "/upload/<account_hash>/<path:image_id>", methods=["OPTIONS"], provide_automatic_options=False
)
def upload_preflight(account_hash: str, image_id: str) -> Response:
    """Answer the browser's CORS preflight for an upload URL."""
    return Response(status=204)


def _notify(emu: Emulator, image: ImageRecord, success: bool, errors: list[dict[str, Any]]) -> None:
    emu.notifier.send(
        {
            "event": "upload.success" if success else "upload.failure",
            "accountId": emu.account_id,
            "imageId": image.id,
            "success": success,
            "image": emu.image_json(image),
            "errors": errors,
            "ts": rfc3339_ms(emu.now_ms()),
        }
    )


def _read_file() -> tuple[bytes, str | None]:
    if request.mimetype != "multipart/form-data":
        raise CfError(5415, "Bad request: upload must be multipart/form-data")
    file = request.files.get("file")
    if file is None:
        raise CfError(5400, "Bad request: missing the `file` field")
    data = file.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise CfError(5413, "Image exceeds the 10 MB size limit")
    if not data:
        raise CfError(5400, "Bad request: the `file` field is empty")
    # Cut like a v1 upload's: the Image object's filename is at most 255 characters.
    filename = (file.filename or "").rsplit("/", 1)[-1][:MAX_FILENAME] or None
    return data, filename


@bp.route(
    "/upload/<account_hash>/<path:image_id>", methods=["POST"], provide_automatic_options=False
)
def upload_url(account_hash: str, image_id: str) -> Response:
    """Receive the file of a direct creator upload (single use, until the draft expires)."""
    emu = current_emulator()
    # Parse the whole body before answering: a client still sending would otherwise see the
    # connection reset instead of the error.
    request.files  # noqa: B018
    image = emu.store.get_image(image_id) if account_hash == emu.account_hash else None
    if image is None:
        raise CfError(5404, "Upload URL not found")
    if not image.draft:
        raise CfError(5409, "Upload URL already used")
    if image.expires_ms is not None and image.expires_ms <= emu.now_ms():
        err = CfError(5410, "Upload URL expired")
        _notify(emu, image, False, [{"code": err.code, "message": err.message}])
        raise err
    try:
        data, filename = _read_file()
        info = inspect_image(data)
    except CfError as err:
        # The link stays usable until it expires, so the client may retry with a good file.
        _notify(emu, image, False, [{"code": err.code, "message": err.message}])
        raise
    outcome, done = emu.store.complete_draft(
        image_id,
        emu.now_ms(),
        data,
        filename=filename,
        content_type=info.content_type,
        width=info.width,
        height=info.height,
    )
    if done is None:
        # Lost a race with another upload to the same link, or it expired meanwhile.
        raise {
            "used": CfError(5409, "Upload URL already used"),
            "expired": CfError(5410, "Upload URL expired"),
        }.get(outcome, CfError(5404, "Upload URL not found"))
    _notify(emu, done, True, [])
    return envelope(emu.image_json(done))

"""The REST API under `/client/v4/accounts/<account_id>/images`, answered in the v4 envelope."""

from __future__ import annotations

import math
import re
import uuid
from typing import Any
from urllib.parse import unquote, urlsplit

import requests
from flask import Blueprint, Response, g, request

from broker.emulator.core import API_BLUEPRINT, current_emulator
from broker.emulator.errors import CfError, envelope
from broker.emulator.filters import matches, parse_meta_filters
from broker.emulator.imaging import MAX_BYTES, inspect_image
from broker.emulator.store import AlreadyExists, ImageRecord, NewImage, TooMany, VariantRecord
from broker.emulator.validation import (
    MAX_FILENAME,
    check_creator,
    check_custom_id,
    check_key_name,
    check_metadata,
    check_variant_id,
    check_variant_options,
    is_uuid,
    metadata_from_form,
    parse_bool,
    parse_expiry,
)

bp = Blueprint(API_BLUEPRINT, __name__, url_prefix="/client/v4/accounts/<account_id>/images")

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
URL_FETCH_TIMEOUT = 10.0
MIN_PER_PAGE, MAX_PER_PAGE, DEFAULT_PER_PAGE = 10, 10_000, 1000
_TOKEN_RE = re.compile(r"^([0-9a-f]{1,14})-([0-9a-f]{1,14})$")


@bp.url_value_preprocessor
def _pop_account(endpoint: str | None, values: dict[str, Any] | None) -> None:
    # Auth (in the shared before_request hook) checks it; views need not repeat it.
    g.account_id = (values or {}).pop("account_id", None)


# Images.


def _form_metadata() -> dict[str, Any] | None:
    meta = metadata_from_form(request.form.items(multi=True))
    return None if meta is None else check_metadata(meta)


def _fetch_url(url: str) -> tuple[bytes, str]:
    """Download an image for `url` uploads; any failure is 5454."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CfError(5454, "url must be an http(s) URL")
    try:
        with requests.get(url, timeout=URL_FETCH_TIMEOUT, stream=True) as resp:
            if resp.status_code >= 400:
                raise CfError(5454, f"Fetching the url answered {resp.status_code}")
            chunks: list[bytes] = []
            size = 0
            for chunk in resp.iter_content(64 * 1024):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_BYTES:
                    raise CfError(5413, "Image exceeds the 10 MB size limit")
    except requests.RequestException as exc:
        raise CfError(5454, f"Fetching the url failed: {exc.__class__.__name__}") from exc
    name = unquote(parts.path.rsplit("/", 1)[-1]) or "image"
    return b"".join(chunks), name


@bp.post("/v1")
def upload_v1() -> Response:
    """Upload an image from a `file` part or a `url` (multipart)."""
    if request.mimetype not in FORM_TYPES:
        raise CfError(5415, "Bad request: request must be multipart/form-data")
    form = request.form
    file = request.files.get("file")
    url = form.get("url")
    if file is not None and url:
        raise CfError(5400, "Send either file or url, not both")
    if file is None and not url:
        raise CfError(5400, "Missing file or url")
    require_signed = parse_bool(form.get("requireSignedURLs", "false"), "requireSignedURLs")
    custom_id = form.get("id")
    image_id = check_custom_id(custom_id, require_signed) if custom_id else str(uuid.uuid4())
    creator = check_creator(form.get("creator"))
    meta = _form_metadata() or {}
    if file is not None:
        data = file.read(MAX_BYTES + 1)
        filename = (file.filename or "image").rsplit("/", 1)[-1]
    else:
        assert url is not None
        data, filename = _fetch_url(url)
    info = inspect_image(data)
    emu = current_emulator()
    try:
        image = emu.store.insert_image(
            NewImage(
                id=image_id,
                uploaded_ms=emu.now_ms(),
                creator=creator,
                meta=meta,
                require_signed=require_signed,
                filename=filename[:MAX_FILENAME],
                content_type=info.content_type,
                width=info.width,
                height=info.height,
            ),
            blob=data,
        )
    except AlreadyExists as exc:
        raise CfError(5409, "Resource already exists: an image with this ID exists") from exc
    return envelope(emu.image_json(image))


def _whole_number(name: str, default: int) -> int:
    """Read a whole-number query parameter; the SDK may send `10.0` for 10."""
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise CfError(5400, f"{name} must be a number") from exc
    if not math.isfinite(value) or value != int(value):
        raise CfError(5400, f"{name} must be a whole number")
    return int(value)


def _per_page() -> int:
    value = _whole_number("per_page", DEFAULT_PER_PAGE)
    if not MIN_PER_PAGE <= value <= MAX_PER_PAGE:
        raise CfError(5400, f"per_page must be between {MIN_PER_PAGE} and {MAX_PER_PAGE}")
    return value


@bp.get("/v1")
def list_v1() -> Response:
    """List images page by page (deprecated by Cloudflare, still served)."""
    page = _whole_number("page", 1)
    if page < 1:
        raise CfError(5400, "page must be >= 1")
    per_page = _per_page()
    emu = current_emulator()
    images = list(emu.store.list_images(creator=request.args.get("creator"), descending=True))
    chunk = images[(page - 1) * per_page : page * per_page]
    names = emu.variant_ids()
    return envelope(
        {"images": [emu.image_json(i, names) for i in chunk]},
        result_info={
            "page": page,
            "per_page": per_page,
            "count": len(chunk),
            "total_count": len(images),
        },
    )


@bp.get("/v2")
def list_v2() -> Response:
    """List images with a continuation token, by upload time, filtered by creator and metadata."""
    per_page = _per_page()
    sort_order = request.args.get("sort_order", "desc")
    if sort_order not in ("asc", "desc"):
        raise CfError(5400, "sort_order must be asc or desc")
    after = None
    token = request.args.get("continuation_token")
    if token:
        match = _TOKEN_RE.match(token)
        if not match:
            raise CfError(5400, "Invalid continuation_token")
        after = (int(match.group(1), 16), int(match.group(2), 16))
    filters = parse_meta_filters(request.args.items(multi=True))
    emu = current_emulator()
    page: list[ImageRecord] = []
    more = False
    for image in emu.store.list_images(
        creator=request.args.get("creator"), descending=sort_order == "desc", after=after
    ):
        if filters and not matches(image.meta, filters):
            continue
        if len(page) == per_page:
            more = True
            break
        page.append(image)
    next_token = f"{page[-1].uploaded_ms:x}-{page[-1].seq:x}" if more and page else None
    names = emu.variant_ids()
    images = [emu.image_json(i, names) for i in page]
    return envelope({"images": images, "continuation_token": next_token})


def _image_or_404(image_id: str) -> Any:
    image = current_emulator().store.get_image(image_id)
    if image is None:
        raise CfError(5404, "Image not found")
    return image


@bp.get("/v1/<path:image_id>")
def image_details(image_id: str) -> Response:
    """Return one image; `draft: true` while its direct upload is pending."""
    return envelope(current_emulator().image_json(_image_or_404(image_id)))


@bp.patch("/v1/<path:image_id>")
def image_edit(image_id: str) -> Response:
    """Change metadata (replacing it), creator or requireSignedURLs."""
    image = _image_or_404(image_id)
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise CfError(5400, "Body must be a JSON object")
    fields: dict[str, Any] = {}
    if "metadata" in data:
        fields["meta"] = check_metadata(data["metadata"])
    if "creator" in data:
        fields["creator"] = check_creator(data["creator"])
    if "requireSignedURLs" in data:
        fields["require_signed"] = parse_bool(data["requireSignedURLs"], "requireSignedURLs")
        if fields["require_signed"] and not is_uuid(image.id):
            raise CfError(5411, "Custom IDs cannot be used with requireSignedURLs")
    emu = current_emulator()
    updated = emu.store.update_image(image_id, **fields)
    if updated is None:
        raise CfError(5404, "Image not found")
    return envelope(emu.image_json(updated))


@bp.delete("/v1/<path:image_id>")
def image_delete(image_id: str) -> Response:
    """Delete an image (or a pending draft) with its cached variants."""
    if not current_emulator().store.delete_image(image_id):
        raise CfError(5404, "Image not found")
    return envelope({})


@bp.get("/v1/<path:image_id>/blob")
def image_blob(image_id: str) -> Response:
    """Return the original bytes of an image."""
    image = _image_or_404(image_id)
    if image.draft:
        raise CfError(5404, "Image not found: the upload is still pending")
    data = current_emulator().store.read_blob(image_id)
    return Response(data, content_type=image.content_type or "application/octet-stream")


# Direct creator upload.


def _direct_upload_fields() -> tuple[dict[str, Any], dict[str, Any] | None]:
    if request.is_json:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise CfError(5400, "Body must be a JSON object")
        meta = data.get("metadata")
        return data, None if meta is None else check_metadata(meta)
    if request.mimetype in FORM_TYPES or not request.get_data(cache=True):
        form = request.form
        keys = ("id", "creator", "expiry", "requireSignedURLs")
        return {k: form[k] for k in keys if k in form}, _form_metadata()
    raise CfError(5415, "Bad request: body must be multipart/form-data or JSON")


@bp.post("/v2/direct_upload")
def direct_upload() -> Response:
    """Create a draft image and its one-time upload URL."""
    fields, meta = _direct_upload_fields()
    emu = current_emulator()
    now = emu.now()
    require_signed = parse_bool(fields.get("requireSignedURLs", False), "requireSignedURLs")
    custom_id = fields.get("id")
    image_id = (
        check_custom_id(custom_id, require_signed)
        if custom_id not in (None, "")
        else str(uuid.uuid4())
    )
    creator = check_creator(fields.get("creator"))
    expiry = parse_expiry(fields.get("expiry"), now)
    try:
        emu.store.insert_image(
            NewImage(
                id=image_id,
                uploaded_ms=int(now.timestamp() * 1000),
                creator=creator,
                meta=meta or {},
                require_signed=require_signed,
                draft=True,
                expires_ms=int(expiry.timestamp() * 1000),
            )
        )
    except AlreadyExists as exc:
        raise CfError(5409, "Resource already exists: an image with this ID exists") from exc
    return envelope({"id": image_id, "uploadURL": emu.upload_url(image_id)})


# Batch tokens (a global API call; the token works on the batch host only).


@bp.get("/v1/batch_token")
def batch_token() -> Response:
    """Mint a batch token for the batch host and say when it expires."""
    emu = current_emulator()
    token, expires = emu.batch.issue(emu.now())
    return envelope({"token": token, "expiresAt": expires.isoformat().replace("+00:00", "Z")})


# Signing keys.


def _keys_body(keys: list[tuple[str, str]]) -> dict[str, Any]:
    return {"keys": [{"name": n, "value": v} for n, v in keys]}


@bp.get("/v1/keys")
def keys_list() -> Response:
    """List the signing keys."""
    return envelope(_keys_body(current_emulator().store.list_keys()))


@bp.put("/v1/keys/<name>")
def key_put(name: str) -> Response:
    """Create a signing key (or roll its value); answer every key."""
    return envelope(_keys_body(current_emulator().store.put_key(check_key_name(name))))


@bp.delete("/v1/keys/<name>")
def key_delete(name: str) -> Response:
    """Delete a signing key; deleting the last one mints a new `default`."""
    keys = current_emulator().store.delete_key(name)
    if keys is None:
        raise CfError(5404, "Signing key not found")
    return envelope(_keys_body(keys))


@bp.get("/v1/stats")
def stats() -> Response:
    """Return allowed and current image counts."""
    emu = current_emulator()
    return envelope({"count": {"allowed": emu.images_allowed, "current": emu.store.count_images()}})


# Variants.


def _variant_json(variant: VariantRecord) -> dict[str, Any]:
    return {
        "id": variant.id,
        "options": variant.options(),
        "neverRequireSignedURLs": variant.never_require_signed,
    }


def _json_body() -> dict[str, Any]:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise CfError(5400, "Body must be a JSON object")
    return data


@bp.get("/v1/variants")
def variants_list() -> Response:
    """List every variant keyed by id."""
    variants = current_emulator().store.list_variants()
    return envelope({"variants": {v.id: _variant_json(v) for v in variants}})


@bp.post("/v1/variants")
def variant_create() -> Response:
    """Create a variant (100 at most)."""
    data = _json_body()
    options = check_variant_options(data.get("options"))
    variant = VariantRecord(
        id=check_variant_id(data.get("id")),
        never_require_signed=parse_bool(
            data.get("neverRequireSignedURLs", False), "neverRequireSignedURLs"
        ),
        **options,
    )
    try:
        current_emulator().store.create_variant(variant)
    except AlreadyExists as exc:
        raise CfError(5409, "Resource already exists: a variant with this id exists") from exc
    except TooMany as exc:
        raise CfError(5400, "An account can have at most 100 variants") from exc
    return envelope({"variant": _variant_json(variant)})


def _variant_or_404(variant_id: str) -> VariantRecord:
    variant = current_emulator().store.get_variant(variant_id)
    if variant is None:
        raise CfError(5401, "Variant not found")
    return variant


@bp.get("/v1/variants/<variant_id>")
def variant_details(variant_id: str) -> Response:
    """Return one variant."""
    return envelope({"variant": _variant_json(_variant_or_404(variant_id))})


@bp.patch("/v1/variants/<variant_id>")
def variant_edit(variant_id: str) -> Response:
    """Replace a variant's options (and optionally neverRequireSignedURLs)."""
    current = _variant_or_404(variant_id)
    data = _json_body()
    options = check_variant_options(data.get("options"))
    never = current.never_require_signed
    if "neverRequireSignedURLs" in data:
        never = parse_bool(data["neverRequireSignedURLs"], "neverRequireSignedURLs")
    variant = VariantRecord(id=current.id, never_require_signed=never, **options)
    if current_emulator().store.update_variant(variant) is None:
        raise CfError(5401, "Variant not found")
    return envelope({"variant": _variant_json(variant)})


@bp.delete("/v1/variants/<variant_id>")
def variant_delete(variant_id: str) -> Response:
    """Delete a variant; `public` cannot be deleted."""
    if variant_id == "public":
        raise CfError(5400, "The public variant cannot be deleted")
    if not current_emulator().store.delete_variant(variant_id):
        raise CfError(5401, "Variant not found")
    return envelope({})

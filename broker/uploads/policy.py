"""Upload policy: what a caller may ask of a new upload, checked before anything is held.

Offers `UploadParams` (the caller's choices), `check_custom_id`, `effective_expiry`,
`build_metadata` / `public_metadata`, and `UploadError`, the refusal raised for uploads.

Rules it enforces, each refusal declared once below (the API documents the same declarations):
- metadata is at most 1024 bytes as compact UTF-8 JSON, the broker's own key included, and the
  caller may not set that key (`broker_upload_id`, which matches a listing to its upload);
- an upload URL lives 120 s to 6 h; the `expiry` sent to Cloudflare stays a few seconds inside
  those bounds and is whole seconds, never shorter than asked;
- a custom id follows Cloudflare's rules (not a UUID, no leading or trailing `/`, no empty, `.`
  or `..` segment, no `? # \\` or control character, ≤ 1024 characters) and needs
  `require_signed_urls: false`.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from broker.platform.errors import DomainError, Kind, Refusal

MIN_EXPIRY = 120
MAX_EXPIRY = 21600
# Cloudflare checks the bounds when the request arrives, not when we computed it: stay a few
# seconds inside them so latency or clock skew cannot turn a valid request into a 400.
EXPIRY_MARGIN = 5
MAX_METADATA_BYTES = 1024
# The broker's own key in every image's metadata: lets a v2 listing or a notification be
# matched to its upload without a lookup by image id.
BROKER_META_KEY = "broker_upload_id"
# The upload's profile, in the metadata of every image not made with the `default` profile
# (absent: `default`, so the images of apps without profiles keep their metadata as it was).
PROFILE_META_KEY = "broker_profile"
RESERVED_KEYS = (BROKER_META_KEY, PROFILE_META_KEY)

RESERVED_METADATA_KEY = Refusal(
    Kind.INVALID,
    "validation_error",
    "'{key}' is reserved",
    {"key": BROKER_META_KEY},
    field="metadata",
)
METADATA_TOO_LARGE = Refusal(
    Kind.INVALID,
    "validation_error",
    "metadata is {size} bytes as JSON; at most {room} bytes fit beside the broker's own keys",
    {"size": 1100, "room": 982},
    field="metadata",
)
EXPIRY_OUT_OF_RANGE = Refusal(
    Kind.INVALID,
    "validation_error",
    f"expires_in must be between {MIN_EXPIRY} and {MAX_EXPIRY} seconds",
    field="expires_in",
)
CUSTOM_ID_BROKEN = Refusal(
    Kind.INVALID, "validation_error", "{problem}", {"problem": "id cannot be a UUID"}, field="id"
)
CUSTOM_ID_WITH_SIGNED_URLS = Refusal(
    Kind.INVALID,
    "validation_error",
    "a custom id cannot be used with signed URLs; send require_signed_urls: false",
    field="id",
)


class UploadError(DomainError):
    """A new upload, or a listing, that the rules refuse (invalid input or a spent quota)."""


@dataclass(frozen=True)
class UploadParams:
    """What a caller may choose about a new upload (validated shapes; rules checked here)."""

    metadata: dict[str, Any] | None = None
    require_signed_urls: bool = True
    expires_in: int = 1800
    custom_id: str | None = None
    # The upload profile's name (`broker.uploads.profiles`).
    profile: str = "default"


def metadata_size(meta: dict[str, Any]) -> int:
    """Bytes of `meta` as compact UTF-8 JSON, the measure of Cloudflare's 1024-byte limit."""
    return len(json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode())


def build_metadata(
    user_meta: dict[str, Any] | None, upload_id: str, profile: str = "default"
) -> dict[str, Any]:
    """Add the broker's keys to the caller's metadata, refusing reserved keys and overflow."""
    user_meta = dict(user_meta or {})
    for key in RESERVED_KEYS:
        if key in user_meta:
            raise UploadError(RESERVED_METADATA_KEY, key=key)
    own: dict[str, Any] = {BROKER_META_KEY: upload_id}
    if profile != "default":
        own[PROFILE_META_KEY] = profile
    meta = {**user_meta, **own}
    if metadata_size(meta) > MAX_METADATA_BYTES:
        room = MAX_METADATA_BYTES - metadata_size(own)
        raise UploadError(METADATA_TOO_LARGE, size=metadata_size(user_meta), room=room)
    return meta


def public_metadata(meta: dict[str, Any] | None) -> dict[str, Any]:
    """The caller's metadata without the broker's own keys."""
    return {k: v for k, v in (meta or {}).items() if k not in RESERVED_KEYS}


def effective_expiry(now: datetime, expires_in: int) -> datetime:
    """The moment sent to Cloudflare as `expiry`: whole seconds, inside its bounds."""
    if not MIN_EXPIRY <= expires_in <= MAX_EXPIRY:
        raise UploadError(EXPIRY_OUT_OF_RANGE)
    seconds = min(max(expires_in, MIN_EXPIRY + EXPIRY_MARGIN), MAX_EXPIRY - EXPIRY_MARGIN)
    # Round up to whole seconds (RFC 3339 without fractions): never shorter than asked.
    start = now.replace(microsecond=0) + timedelta(seconds=1 if now.microsecond else 0)
    return start + timedelta(seconds=seconds)


_UUID = re.compile(
    r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$", re.IGNORECASE
)


# The same rules as one ECMA-262 pattern, for the OpenAPI document (clients can check before
# sending); custom_id_problem stays the check, as it says which rule an id breaks.
CUSTOM_ID_PATTERN = (
    r"^(?![0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{12}$)"
    r"(?!(?:.*/)?\.{0,2}(?:/|$))"
    r"[^/\x00-\x1f?#\\\x7f](?:[^\x00-\x1f?#\\\x7f]*[^/\x00-\x1f?#\\\x7f])?$"
)


def custom_id_problem(custom_id: str) -> str | None:
    """Say what breaks Cloudflare's custom id rules, or None when the id is acceptable."""
    if not custom_id:
        return "id must not be empty"
    if len(custom_id) > 1024:
        return "id must be at most 1024 characters"
    if custom_id.startswith("/") or custom_id.endswith("/"):
        return "id cannot start or end with /"
    if _UUID.match(custom_id):
        return "id cannot be a UUID"
    if any(segment in ("", ".", "..") for segment in custom_id.split("/")):
        return "id cannot contain empty, . or .. path segments"
    # Category Cc: the C0 controls, DEL and the C1 controls (U+0080..U+009F).
    if any(unicodedata.category(c) == "Cc" or c in "?#\\" for c in custom_id):
        return "id contains characters that cannot appear in a URL path"
    return None


def check_custom_id(custom_id: str, require_signed_urls: bool) -> None:
    """Apply Cloudflare's custom id rules before spending an upstream call on them."""
    problem = custom_id_problem(custom_id)
    if problem:
        raise UploadError(CUSTOM_ID_BROKEN, problem=problem)
    if require_signed_urls:
        raise UploadError(CUSTOM_ID_WITH_SIGNED_URLS)

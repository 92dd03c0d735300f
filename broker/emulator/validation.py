"""Parsing and validating request fields the way Cloudflare Images does (no Flask here)."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from broker.emulator.errors import CfError
from broker.emulator.imaging import FITS, MAX_SIDE, METADATA_MODES

MAX_METADATA_BYTES = 1024
MAX_CREATOR = 1024
MAX_CUSTOM_ID = 1024
MAX_FILENAME = 255
MIN_EXPIRY = timedelta(minutes=2)
MAX_EXPIRY = timedelta(hours=6)
DEFAULT_EXPIRY = timedelta(minutes=30)
# Clients compute "now + 2 min" before the request travels; a little slack keeps an expiry set
# exactly at a bound from failing on network latency or clock skew.
EXPIRY_SLACK = timedelta(seconds=5)

_UUID_RE = re.compile(
    r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$", re.IGNORECASE
)
_ALNUM_RE = re.compile(r"^[A-Za-z0-9]+$")
_META_KEY_RE = re.compile(r"\.([^.\[\]]+)|\[([^\]]*)\]")
_TRUE = {"true", "1"}
_FALSE = {"false", "0"}


def is_uuid(value: str) -> bool:
    """Tell whether `value` is spelled like a UUID (with or without dashes)."""
    return bool(_UUID_RE.match(value))


def parse_bool(value: Any, name: str) -> bool:
    """Read a JSON boolean or a form's "true"/"false"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise CfError(5400, f"{name} must be true or false")


def check_custom_id(image_id: Any, require_signed: bool) -> str:
    """Validate a custom image id; raise 5411 when it breaks a rule."""
    if not isinstance(image_id, str) or not image_id:
        raise CfError(5411, "Custom ID must be a non-empty string")
    if len(image_id) > MAX_CUSTOM_ID:
        raise CfError(5411, f"Custom ID must be at most {MAX_CUSTOM_ID} characters")
    if image_id.startswith("/") or image_id.endswith("/"):
        raise CfError(5411, "Custom ID cannot start or end with a /")
    if is_uuid(image_id):
        raise CfError(5411, "Custom ID cannot be a UUID")
    segments = image_id.split("/")
    if any(s in ("", ".", "..") for s in segments):
        # Empty or dot segments would not survive URL normalisation on the delivery path.
        raise CfError(5411, "Custom ID cannot contain empty, . or .. path segments")
    # Category Cc: the C0 controls, DEL and the C1 controls (U+0080..U+009F).
    if any(unicodedata.category(c) == "Cc" or c in "?#\\" for c in image_id):
        raise CfError(5411, "Custom ID contains characters that cannot appear in a URL path")
    if require_signed:
        raise CfError(5411, "Custom IDs cannot be used with requireSignedURLs")
    return image_id


def check_creator(creator: Any) -> str | None:
    """Validate the creator field."""
    if creator is None:
        return None
    if not isinstance(creator, str):
        raise CfError(5400, "creator must be a string")
    if len(creator) > MAX_CREATOR:
        raise CfError(5400, f"creator must be at most {MAX_CREATOR} characters")
    return creator


def check_metadata(meta: Any) -> dict[str, Any]:
    """Validate user metadata: a JSON object of at most 1024 bytes serialised."""
    if not isinstance(meta, dict):
        raise CfError(5400, "metadata must be a JSON object")
    size = len(json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_METADATA_BYTES:
        raise CfError(5400, f"Metadata must not exceed {MAX_METADATA_BYTES} bytes (got {size})")
    return meta


def _set_path(target: dict[str, Any], path: list[str], value: str, field: str) -> None:
    node: Any = target
    for i, part in enumerate(path):
        last = i == len(path) - 1
        nxt_is_list = i == len(path) - 2 and path[-1] == ""
        if part == "":
            raise CfError(5400, f"Unsupported metadata field {field!r}")
        if nxt_is_list:
            existing = node.setdefault(part, [])
            if not isinstance(existing, list):
                raise CfError(5400, f"Conflicting metadata field {field!r}")
            existing.append(value)
            return
        if last:
            if part in node:
                raise CfError(5400, f"Conflicting metadata field {field!r}")
            node[part] = value
            return
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise CfError(5400, f"Conflicting metadata field {field!r}")
        node = child


def _metadata_path(field: str) -> list[str]:
    """Split `metadata.a.b`, `metadata[a][b]` or `metadata.tags[]` into its keys."""
    rest = field[len("metadata") :]
    parts: list[str] = []
    pos = 0
    for match in _META_KEY_RE.finditer(rest):
        if match.start() != pos:
            break
        parts.append(match.group(1) if match.group(1) is not None else match.group(2))
        pos = match.end()
    if pos != len(rest) or not parts:
        raise CfError(5400, f"Unsupported metadata field {field!r}")
    return parts


def metadata_from_form(items: Iterable[tuple[str, str]]) -> dict[str, Any] | None:
    """Collect metadata from form fields in any of the three spellings clients use.

    `metadata` as one JSON string (curl examples), `metadata.<key>` with dots for nesting (the
    official Python SDK), `metadata[key]` brackets (other clients). Values stay strings.
    None when the form carries no metadata at all.
    """
    meta: dict[str, Any] | None = None
    for key, value in items:
        if key == "metadata":
            if value.strip() == "":
                continue
            try:
                parsed = json.loads(value)
            except ValueError as exc:
                raise CfError(5400, "metadata must be a JSON object") from exc
            if not isinstance(parsed, dict):
                raise CfError(5400, "metadata must be a JSON object")
            meta = {**(meta or {}), **parsed}
        elif key.startswith(("metadata.", "metadata[")):
            parts = _metadata_path(key)
            meta = meta if meta is not None else {}
            _set_path(meta, parts, value, key)
    return meta


def parse_expiry(value: Any, now: datetime) -> datetime:
    """Parse an RFC 3339 expiry and check it lies within now + 2 min .. now + 6 h."""
    if value is None or value == "":
        return now + DEFAULT_EXPIRY
    if not isinstance(value, str):
        raise CfError(5400, "expiry must be an RFC 3339 date-time")
    try:
        expiry = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise CfError(5400, "expiry must be an RFC 3339 date-time") from exc
    if expiry.tzinfo is None:
        raise CfError(5400, "expiry must carry a time zone (e.g. Z)")
    if expiry < now + MIN_EXPIRY - EXPIRY_SLACK:
        raise CfError(5400, "expiry must be at least 2 minutes in the future")
    if expiry > now + MAX_EXPIRY + EXPIRY_SLACK:
        raise CfError(5400, "expiry must be at most 6 hours in the future")
    return expiry


def check_key_name(name: str) -> str:
    """Validate a signing key name: alphanumeric, at most 20 characters."""
    if not _ALNUM_RE.match(name) or len(name) > 20:
        raise CfError(5400, "Key name must be alphanumeric and at most 20 characters")
    return name


def check_variant_id(variant_id: Any) -> str:
    """Validate a variant id: alphanumeric, at most 99 characters."""
    if not isinstance(variant_id, str) or not _ALNUM_RE.match(variant_id) or len(variant_id) > 99:
        raise CfError(5400, "Variant id must be alphanumeric and at most 99 characters")
    return variant_id


def _dimension(options: Mapping[str, Any], name: str) -> int:
    value = options.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CfError(5400, f"options.{name} must be a number")
    if value != int(value) or not 1 <= value <= MAX_SIDE:
        raise CfError(5400, f"options.{name} must be a whole number from 1 to {MAX_SIDE}")
    return int(value)


def check_variant_options(options: Any) -> dict[str, Any]:
    """Validate a variant's `options` object; return it normalised."""
    if not isinstance(options, dict):
        raise CfError(5400, "options must be an object")
    fit = options.get("fit")
    if fit not in FITS:
        raise CfError(5400, f"options.fit must be one of {', '.join(FITS)}")
    metadata = options.get("metadata", "none")
    if metadata not in METADATA_MODES:
        raise CfError(5400, f"options.metadata must be one of {', '.join(METADATA_MODES)}")
    return {
        "fit": fit,
        "width": _dimension(options, "width"),
        "height": _dimension(options, "height"),
        "metadata": metadata,
    }

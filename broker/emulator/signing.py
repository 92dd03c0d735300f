"""Signed delivery URLs: the HMAC-SHA256 scheme of Cloudflare Images (pure functions, no Flask)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from urllib.parse import parse_qsl


def sign(path: str, exp: int, key: str) -> str:
    """Return `path?exp=…&sig=…` signed with a signing key's value."""
    to_sign = f"{path}?exp={exp}"
    return f"{to_sign}&sig={signature(to_sign, key)}"


def signature(string_to_sign: str, key: str) -> str:
    """Return the lowercase hex HMAC-SHA256 of `string_to_sign` keyed with the key's UTF-8 value."""
    return hmac.new(key.encode(), string_to_sign.encode(), hashlib.sha256).hexdigest()


def strip_sig(query: str) -> tuple[str, str | None]:
    """Split a raw query string into (query without `sig`, the `sig` value or None)."""
    kept: list[str] = []
    sig: str | None = None
    for part in query.split("&") if query else []:
        if part.startswith("sig="):
            sig = part[4:]
        else:
            kept.append(part)
    return "&".join(kept), sig


def verify(paths: Iterable[str], query: str, keys: Iterable[str], now: int) -> bool:
    """Tell whether a delivery request carries a valid, unexpired signature by any of `keys`.

    `paths` lists the spellings of the request path to try (decoded and as sent), because the
    signer may have signed either form of an id that needs percent-encoding.
    """
    unsigned, sig = strip_sig(query)
    if not sig:
        return False
    exp_values = [v for k, v in parse_qsl(unsigned, keep_blank_values=True) if k == "exp"]
    if len(exp_values) != 1 or not exp_values[0].isdigit() or int(exp_values[0]) < now:
        return False
    sig = sig.lower()
    key_list = list(keys)
    for path in dict.fromkeys(paths):
        for key in key_list:
            if hmac.compare_digest(signature(f"{path}?{unsigned}", key), sig):
                return True
    return False

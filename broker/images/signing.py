"""Signed delivery URLs for Cloudflare Images (pure functions, no Flask import).

A private image is served at `<delivery>/<account_hash>/<image_id>/<variant>?exp=<t>&sig=<hex>`
where `sig` is the lowercase hex HMAC-SHA256, keyed with a signing key's value, of the URL's
path plus `?exp=<t>`. Expiries are rounded up to a bucket so repeated requests within the same
bucket get byte-identical URLs, which lets browsers and CDNs cache the images.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

FITS = ("scale-down", "contain", "cover", "crop", "pad")
METADATA = ("keep", "copyright", "none")
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9]{1,99}$")
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# Characters `quote(…, safe="/")` leaves alone: most ids (UUIDs) need no quoting at all.
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.~/-]*").fullmatch


def quote_id(image_id: str) -> str:
    """Percent-encode an image id for a URL path, keeping `/` of custom-id subpaths."""
    # Fast path for system ids (UUIDs): this runs once per minted URL.
    if image_id.isascii() and image_id.replace("-", "").isalnum():
        return image_id
    return image_id if _PLAIN_ID(image_id) else quote(image_id, safe="/")


@dataclass(frozen=True, slots=True)
class Variant:
    """A named variant the app needs: its box, fit, metadata policy and signing rule."""

    name: str
    width: int
    height: int
    fit: str = "scale-down"
    metadata: str = "none"
    never_signed: bool = False

    def options(self) -> dict[str, object]:
        """Return the variant's `options` object as the Cloudflare API spells it."""
        return {
            "fit": self.fit,
            "width": self.width,
            "height": self.height,
            "metadata": self.metadata,
        }

    def spec(self) -> str:
        """Return the variant in `BROKER_VARIANTS` syntax."""
        parts = [self.name, f"{self.width}x{self.height}", self.fit]
        if self.metadata != "none":
            parts.append(f"metadata={self.metadata}")
        if self.never_signed:
            parts.append("never-signed")
        return ":".join(parts)


# Cloudflare creates `public` in every account; apps may always ask for it.
PUBLIC_VARIANT = Variant("public", 10000, 10000, "scale-down", "none", False)


def parse_variants(spec: str | Iterable[str]) -> tuple[Variant, ...]:
    """Parse `BROKER_VARIANTS`: `name:WxH:fit[:metadata=keep|copyright|none][:never-signed]`.

    Entries are comma-separated (or given as a list). Raises ValueError naming the bad entry.
    """
    entries = spec.split(",") if isinstance(spec, str) else list(spec)
    variants: dict[str, Variant] = {}
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        parts = [p.strip() for p in entry.split(":")]
        if len(parts) < 2:
            raise ValueError(f"variant {entry!r}: expected name:WxH[:fit][:options]")
        name, size, *rest = parts
        if not _VARIANT_NAME.match(name):
            raise ValueError(f"variant {entry!r}: name must be 1-99 letters or digits")
        match = _SIZE.match(size)
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            raise ValueError(f"variant {entry!r}: size must be WxH with positive integers")
        fit, metadata, never_signed = "scale-down", "none", False
        for i, option in enumerate(rest):
            if i == 0 and option in FITS:
                fit = option
            elif option == "never-signed":
                never_signed = True
            elif option.startswith("metadata=") and option[9:] in METADATA:
                metadata = option[9:]
            else:
                raise ValueError(f"variant {entry!r}: unknown option {option!r}")
        if name in variants:
            raise ValueError(f"variant {name!r} is declared twice")
        variants[name] = Variant(name, int(match[1]), int(match[2]), fit, metadata, never_signed)
    return tuple(variants.values())


def bucketed_expiry(now: float, ttl: int, bucket: int, max_ttl: int | None = None) -> int:
    """Return `now + ttl` rounded up to a multiple of `bucket` (Unix seconds).

    Rounding up never shortens the requested lifetime, except near `max_ttl`: no URL may
    outlive `now + max_ttl`, so there the result falls back to the last bucket boundary inside
    that limit (or the limit itself when the bucket is longer than half of it).
    """
    if ttl < 1:
        raise ValueError("ttl must be at least one second")
    bucket = max(1, bucket)
    exp = math.ceil((now + ttl) / bucket) * bucket
    if max_ttl is not None and exp > now + max_ttl:
        ceiling = math.floor(now + max_ttl)
        floored = ceiling - ceiling % bucket
        exp = floored if floored - now >= max_ttl / 2 else ceiling
    return exp


def check_ttl(ttl: int | None, default: int, maximum: int) -> int:
    """Return the lifetime to use: `default` when none was asked; ValueError outside 1..maximum."""
    if ttl is None:
        return min(default, maximum)
    if ttl < 1 or ttl > maximum:
        raise ValueError(f"ttl must be between 1 and {maximum} seconds")
    return ttl


class Signer:
    """One signing key, with its HMAC state precomputed so each URL costs one copy and update."""

    __slots__ = ("_mac", "name")

    def __init__(self, name: str, value: str) -> None:
        self.name = name
        mac = hmac.new(value.encode(), digestmod=hashlib.sha256)
        # CPython's OpenSSL-backed HMAC wraps a C object with the same copy/update/hexdigest;
        # copying that directly skips a Python-level wrapper on every URL. Fall back when absent.
        self._mac: Any = getattr(mac, "_hmac", None) or mac

    def signature(self, string_to_sign: str) -> str:
        """Return the lowercase hex HMAC-SHA256 of `string_to_sign`."""
        mac = self._mac.copy()
        mac.update(string_to_sign.encode())
        digest: str = mac.hexdigest()
        return digest

    def __repr__(self) -> str:
        return f"Signer({self.name!r})"  # never the key's value


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where an account's images are served: origin plus the path up to the account hash."""

    origin: str  # e.g. https://imagedelivery.net
    prefix: str  # e.g. /<account_hash>

    @classmethod
    def from_settings(cls, base: str, account_hash: str) -> Delivery:
        """Build from the delivery base URL and the account hash."""
        parts = urlsplit(base.rstrip("/"))
        return cls(f"{parts.scheme}://{parts.netloc}", f"{parts.path}/{account_hash}")

    @classmethod
    def from_variant_url(cls, url: str, image_id: str) -> Delivery | None:
        """Recover the delivery origin and prefix from one of an image's stored variant URLs."""
        parts = urlsplit(url)
        head, sep, _variant = parts.path.rpartition("/")
        suffix = "/" + quote_id(image_id)
        if not sep or not parts.netloc:
            return None
        for spelling in (suffix, "/" + image_id):
            if head.endswith(spelling) and len(head) > len(spelling):
                return cls(f"{parts.scheme}://{parts.netloc}", head[: -len(spelling)])
        return None

    def path(self, image_id: str, variant: str) -> str:
        """Return the delivery path of an image variant."""
        return f"{self.prefix}/{quote_id(image_id)}/{variant}"


def needs_signature(require_signed: bool, variant: Variant) -> bool:
    """Tell whether a URL must be signed: private image and a variant that is not exempt."""
    return require_signed and not variant.never_signed


def sign_path(path: str, exp: int, signer: Signer) -> str:
    """Return `path?exp=<exp>&sig=<hex>`."""
    to_sign = f"{path}?exp={exp}"
    return f"{to_sign}&sig={signer.signature(to_sign)}"


def delivery_url(
    delivery: Delivery,
    image_id: str,
    variant: Variant,
    *,
    require_signed: bool,
    exp: int,
    signer: Signer | None,
) -> str:
    """Return the URL of an image variant: signed when the image is private and the variant
    is not exempt (ValueError when a signature is needed but no key is available)."""
    path = delivery.path(image_id, variant.name)
    if not needs_signature(require_signed, variant):
        return delivery.origin + path
    if signer is None:
        raise ValueError("no signing key available")
    return delivery.origin + sign_path(path, exp, signer)

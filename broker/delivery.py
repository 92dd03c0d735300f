"""Minting delivery URLs for the images a caller may see (API, batch and `/i/` redirect).

Everything a URL needs is in the `uploads` row and the cached signing key, so minting makes one
database query per request (one for a whole batch) and never calls Cloudflare.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from flask import current_app

from broker import keys, variants
from broker.db import db
from broker.models import Upload
from broker.signing import Delivery, Signer, Variant, bucketed_expiry, check_ttl, needs_signature

# The columns minting needs: no ORM objects, no joined user, so a batch stays cheap.
_COLUMNS = (
    Upload.id,
    Upload.user_id,
    Upload.image_id,
    Upload.status,
    Upload.require_signed_urls,
    Upload.variants,
)


class NotFound(Exception):
    """No such image for this caller (absent, another user's, or deleted)."""


class NotReady(Exception):
    """The image exists but has no file to deliver (pending, expired or rejected)."""

    def __init__(self, status: str) -> None:
        super().__init__(f"image is {status}")
        self.status = status


class UnknownVariant(Exception):
    """The variant is not one the broker declares."""


class NoSigningKey(Exception):
    """A private image needs a signature but no signing key is stored (run `flask keys sync`)."""


@dataclass(frozen=True, slots=True)
class Minted:
    """A delivery URL and when it stops working (None: unsigned, it never expires)."""

    url: str
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: their user id, and whether they may see every user's images."""

    user_id: int
    is_admin: bool = False


def lookup_variant(name: str) -> Variant:
    """Return the declared variant `name` (UnknownVariant otherwise)."""
    variant = variants.known_variants().get(name)
    if variant is None:
        raise UnknownVariant(name)
    return variant


def lifetime(ttl: int | None) -> int:
    """Return the URL lifetime to use for a requested `ttl` (ValueError outside the bounds)."""
    config = current_app.config
    return check_ttl(ttl, int(config["SIGNED_URL_TTL"]), int(config["SIGNED_URL_MAX_TTL"]))


def expiry(ttl: int, now: float) -> int:
    """Return the bucketed Unix expiry of a URL living `ttl` seconds from `now`."""
    config = current_app.config
    return bucketed_expiry(
        now, ttl, int(config["SIGNED_URL_BUCKET"]), int(config["SIGNED_URL_MAX_TTL"])
    )


def fallback_delivery() -> Delivery:
    """Return where images without a stored variant URL are served (from the settings)."""
    config = current_app.config
    return Delivery.from_settings(
        config["CLOUDFLARE_DELIVERY_BASE"], config.get("CLOUDFLARE_ACCOUNT_HASH") or ""
    )


def _visible(stmt: sa.Select[Any], caller: Caller) -> sa.Select[Any]:
    if not caller.is_admin:
        stmt = stmt.where(Upload.user_id == caller.user_id)
    return stmt


def load_one(upload_id: str, caller: Caller) -> sa.Row[Any]:
    """Load one upload the caller may see (NotFound otherwise), with one indexed query."""
    row = db.session.execute(
        _visible(sa.select(*_COLUMNS).where(Upload.id == upload_id), caller)
    ).first()
    if row is None or row.status == "deleted":
        raise NotFound(upload_id)
    return row


def load_many(upload_ids: Iterable[str], caller: Caller) -> dict[str, sa.Row[Any]]:
    """Load the uploads the caller may see among `upload_ids`, in one query, by id."""
    wanted = list(dict.fromkeys(upload_ids))
    if not wanted:
        return {}
    stmt = _visible(sa.select(*_COLUMNS).where(Upload.id.in_(wanted)), caller)
    return {row.id: row for row in db.session.execute(stmt)}


class Minter:
    """Mint URLs for one request: settings, key and expiry resolved once, then per-row work."""

    def __init__(self, ttl: int, now: float, signer: Signer | None = None) -> None:
        self.exp = expiry(ttl, now)
        self.expires_at = datetime.fromtimestamp(self.exp, UTC)
        self.signer = signer if signer is not None else keys.current_signer()
        self.fallback = fallback_delivery()

    def delivery(self, row: sa.Row[Any]) -> Delivery:
        """Return where the row's image is served: from its stored URLs, else the settings."""
        stored: Sequence[str] | None = row.variants
        if stored:
            found = Delivery.from_variant_url(stored[0], row.image_id)
            if found is not None:
                return found
        return self.fallback

    def mint(self, row: sa.Row[Any], variant: Variant) -> Minted:
        """Return the URL of one image variant (NotFound, NotReady or NoSigningKey)."""
        if row.status != "ready":
            if row.status == "deleted":
                raise NotFound(row.id)
            raise NotReady(row.status)
        where = self.delivery(row)
        path, origin = where.path(row.image_id, variant.name), where.origin
        if not needs_signature(row.require_signed_urls, variant):
            return Minted(origin + path, None)
        if self.signer is None:
            raise NoSigningKey()
        to_sign = f"{path}?exp={self.exp}"
        return Minted(f"{origin}{to_sign}&sig={self.signer.signature(to_sign)}", self.expires_at)


def prepare_upstream() -> list[str]:
    """Create or update the declared variants and mirror the signing keys (dev server start);
    return banner lines. Failures are reported, not raised: the pages still work without."""
    from broker.cloudflare import UpstreamError, get_client

    client = get_client()
    try:
        done = variants.sync_variants(client, variants.declared_variants())
        synced = keys.sync_keys(client)
        db.session.commit()
    except UpstreamError as exc:
        db.session.rollback()
        return [f"Variants/signing keys not synced ({exc}); run `flask variants sync`."]
    names = ", ".join(d.name for d in done) or "none"
    signer = keys.active_key()
    key = f"signing key {signer.name}" if signer else "no signing key"
    return [f"Variants: {names}; {key} ({len(synced.added)} new)."]

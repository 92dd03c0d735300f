"""Minting delivery URLs for the images a caller may see (API, batch and `/i/` redirect).

Everything a URL needs is in the `uploads` row and the cached signing key, so minting makes one
database query per request (one for a whole batch) and never calls Cloudflare.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import sqlalchemy as sa

from broker.auth import session_user_clause
from broker.auth.models import User
from broker.images import keys, variants
from broker.images.signing import Delivery, Signer, Variant, bucketed_expiry, check_ttl, quote_id
from broker.platform.config import current_settings
from broker.platform.db import Session, db
from broker.uploads.models import Upload, UploadStatus

# The columns minting needs: no ORM objects, no joined user, so a batch stays cheap.
_COLUMNS = (
    Upload.id,
    Upload.user_id,
    Upload.image_id,
    Upload.status,
    Upload.require_signed_urls,
    Upload.variants,
)


class UploadRef(NamedTuple):
    """The columns of an upload that minting needs (a plain tuple: fast attribute access)."""

    id: str
    user_id: int
    image_id: str
    status: UploadStatus
    require_signed_urls: bool
    variants: list[str] | None


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


class Minted(NamedTuple):
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
    settings = current_settings()
    return check_ttl(ttl, settings.signed_url_ttl, settings.signed_url_max_ttl)


def expiry(ttl: int, now: float) -> int:
    """Return the bucketed Unix expiry of a URL living `ttl` seconds from `now`."""
    settings = current_settings()
    return bucketed_expiry(now, ttl, settings.signed_url_bucket, settings.signed_url_max_ttl)


# Delivery origins parsed once per distinct setting, not once per request.
_from_settings = functools.lru_cache(maxsize=16)(Delivery.from_settings)


def fallback_delivery() -> Delivery:
    """Return where images without a stored variant URL are served (from the settings)."""
    settings = current_settings()
    return _from_settings(settings.cloudflare_delivery_base, settings.cloudflare_account_hash or "")


def _visible(stmt: sa.Select[*tuple[Any, ...]], caller: Caller) -> sa.Select[*tuple[Any, ...]]:
    if not caller.is_admin:
        stmt = stmt.where(Upload.user_id == caller.user_id)
    return stmt


@functools.cache
def _one_statement(is_admin: bool) -> sa.Select[*tuple[Any, ...]]:
    """Build the single-upload query once: the redirect runs it on every image shown."""
    stmt = sa.select(*_COLUMNS).where(Upload.id == sa.bindparam("upload_id"))
    if not is_admin:
        stmt = stmt.where(Upload.user_id == sa.bindparam("user_id"))
    return stmt


def load_one(session: Session, upload_id: str, caller: Caller) -> UploadRef:
    """Load one upload the caller may see (NotFound otherwise), with one indexed query."""
    params = {"upload_id": upload_id, "user_id": caller.user_id}
    # Core execution on the session's connection: plain rows need none of the ORM machinery.
    row = session.connection().execute(_one_statement(caller.is_admin), params).first()
    if row is None or row.status == UploadStatus.DELETED:
        raise NotFound(upload_id)
    return UploadRef._make(row)


@functools.cache
def _session_statement() -> sa.Select[*tuple[Any, ...]]:
    """Build the query that authenticates a session token and loads an upload together."""
    visible = sa.and_(
        Upload.id == sa.bindparam("upload_id"),
        sa.or_(Upload.user_id == User.id, User.is_admin.is_(True)),
    )
    return (
        sa.select(User.id, User.is_admin, *_COLUMNS)
        .select_from(User)
        .outerjoin(Upload, visible)
        .where(session_user_clause(sa.bindparam("token")))
    )


def load_for_session(session_token: str, upload_id: str) -> tuple[Caller, UploadRef | None] | None:
    """Authenticate a session token and load an upload it may see, in one indexed query.

    Returns None when the token belongs to no active user (the caller falls back to the
    regular login path), else the caller and the upload (None: not visible or deleted).
    """
    params = {"upload_id": upload_id, "token": session_token}
    # A short connection of its own, outside the ORM session: no session transaction to set
    # up and tear down for one read (this runs for every image a gallery page shows).
    with db.engine.connect() as conn:
        row = conn.execute(_session_statement(), params).first()
    if row is None:
        return None
    caller = Caller(row[0], bool(row[1]))
    if row[2] is None or row.status == UploadStatus.DELETED:
        return caller, None
    return caller, UploadRef._make(row[2:])


def load_many(session: Session, upload_ids: Iterable[str], caller: Caller) -> dict[str, UploadRef]:
    """Load the uploads the caller may see among `upload_ids`, in one query, by id."""
    wanted = list(dict.fromkeys(upload_ids))
    if not wanted:
        return {}
    stmt = _visible(sa.select(*_COLUMNS).where(Upload.id.in_(wanted)), caller)
    make = UploadRef._make
    return {row[0]: make(row) for row in session.execute(stmt)}


class Minter:
    """Mint URLs for one request: settings, key and expiry resolved once, then per-row work."""

    def __init__(self, ttl: int, now: float, signer: Signer | None = None) -> None:
        self.exp = expiry(ttl, now)
        self.expires_at = datetime.fromtimestamp(self.exp, UTC)
        self.signer = signer if signer is not None else keys.current_signer()
        self.fallback = fallback_delivery()
        # The last delivery parsed from a stored URL, with its `origin + prefix + "/"`: an
        # account's images share it, so a batch parses one URL instead of a thousand.
        self._last: tuple[str, Delivery] | None = None

    def delivery(self, row: UploadRef, quoted_id: str | None = None) -> Delivery:
        """Return where the row's image is served: from its stored URLs, else the settings."""
        stored: Sequence[str] | None = row.variants
        if not stored:
            return self.fallback
        first = stored[0]
        last = self._last
        if last is not None:
            base = last[0]
            # Same origin and prefix as the last one parsed, followed by this image's id.
            if first.startswith(base) and first.startswith(
                quoted_id or quote_id(row.image_id), len(base)
            ):
                return last[1]
        found = Delivery.from_variant_url(first, row.image_id)
        if found is None:
            return self.fallback
        self._last = (f"{found.origin}{found.prefix}/", found)
        return found

    def mint(self, row: UploadRef, variant: Variant) -> Minted:
        """Return the URL of one image variant (NotFound, NotReady or NoSigningKey)."""
        status = row.status
        if status != UploadStatus.READY:
            if status == UploadStatus.DELETED:
                raise NotFound(row.id)
            raise NotReady(status)
        quoted = quote_id(row.image_id)
        where = self.delivery(row, quoted)
        if not row.require_signed_urls or variant.never_signed:
            return Minted(f"{where.origin}{where.prefix}/{quoted}/{variant.name}", None)
        signer = self.signer
        if signer is None:
            raise NoSigningKey()
        to_sign = f"{where.prefix}/{quoted}/{variant.name}?exp={self.exp}"
        return Minted(f"{where.origin}{to_sign}&sig={signer.signature(to_sign)}", self.expires_at)

"""Signed delivery URLs of the caller's images: one at a time or up to 1000 in one request."""

from __future__ import annotations

import time
from datetime import datetime

from flask_login import current_user
from pydantic import BaseModel, Field

from broker.api import bp
from broker.api.spec import (
    RETRY_AFTER,
    UPLOAD_ID,
    ErrorCase,
    ErrorDetail,
    Header,
    dynamic_enum,
    endpoint,
    enum_source,
    example,
    field_error,
    not_found,
)
from broker.images import urls, variants
from broker.images.signing import Variant
from broker.platform.db import db, utcnow
from broker.platform.errors import ApiError
from broker.uploads.api import retry_after
from broker.uploads.models import Upload, UploadStatus

MAX_BATCH = 1000
# The worker syncs keys hourly; `flask keys sync` makes one at once. A minute is a fair pause.
NO_KEY_RETRY_AFTER = 60
# The document lists the declared variants (the app's own) as the values of `variant`.
enum_source("variant", lambda: sorted(variants.known_variants()))
VARIANT_DOC = "A declared variant (`BROKER_VARIANTS`), or `public` for the original."
TTL_DOC = (
    "Seconds the URL stays valid (default `BROKER_SIGNED_URL_TTL`, at most "
    "`BROKER_SIGNED_URL_MAX_TTL`); rounded up so repeated requests share a URL."
)
_URL = (
    "https://imagedelivery.net/ZWd9g1K7eljCn_KDTu_MWA/2cdc28f0-017a-49c4-9ed7-87056c83901b/"
    "thumb?exp=1777888800&sig=9a1f0e6c5b4d3a2918f7e6d5c4b3a2918f7e6d5c4b3a2918f7e6d5c4b3a29180"
)
NO_IMAGE = not_found("image")
UNKNOWN_VARIANT = field_error(
    422,
    "unknown_variant",
    "Unknown variant 'huge'; use one of: public, thumb.",
    "variant",
    "unknown_variant",
)
TTL_OUT_OF_RANGE = field_error(
    422, "validation_error", "ttl must be between 1 and 604800 seconds", "ttl", "out_of_range"
)
PENDING_RETRY_AFTER = Header(
    "Retry-After",
    "Only while the image is `pending`: seconds to wait before asking again (the same growing "
    "pause as `POST /uploads/{id}/complete`). An `expired` or `rejected` image stays so.",
    {"type": "integer", "minimum": 1},
    2,
    required=False,
)
NOT_READY = ErrorCase(
    409,
    "not_ready",
    "The image is pending.",
    {"status": "pending"},
    headers=(PENDING_RETRY_AFTER,),
)
NO_SIGNING_KEY = ErrorCase(
    503,
    "no_signing_key",
    "No signing key is available yet; try again later.",
    headers=(RETRY_AFTER,),
)


class UrlQuery(BaseModel):
    """Which variant, and for how long (seconds; default and maximum set by the operator)."""

    variant: str = Field(
        max_length=99,
        description=VARIANT_DOC,
        examples=["thumb"],
        json_schema_extra=dynamic_enum("variant"),
    )
    ttl: int | None = Field(None, ge=1, description=TTL_DOC, examples=[600])


class SignedUrl(BaseModel):
    """A delivery URL; `expires_at` is null for URLs that need no signature (public images)."""

    model_config = example({"url": _URL, "expires_at": "2026-05-04T10:40:00Z"})

    url: str
    expires_at: datetime | None


class UrlRequest(BaseModel):
    """One image variant of a batch."""

    id: str = Field(max_length=64, description="The upload's `id`.")
    variant: str = Field(
        max_length=99, description=VARIANT_DOC, json_schema_extra=dynamic_enum("variant")
    )


class UrlBatch(BaseModel):
    """Up to 1000 image variants to mint URLs for, with one lifetime for all."""

    model_config = example(
        {
            "items": [
                {"id": UPLOAD_ID, "variant": "thumb"},
                {"id": "0b2f6c1ad4e94f3fb1c1e0b5a7d9e8f1", "variant": "medium"},
            ],
            "ttl": 600,
        }
    )

    items: list[UrlRequest] = Field(min_length=1, max_length=MAX_BATCH)
    ttl: int | None = Field(None, ge=1, description=TTL_DOC)


class UrlResult(BaseModel):
    """The URL of one batch item, or why there is none (`not_found`, `not_ready`)."""

    id: str
    variant: str
    url: str | None = None
    expires_at: datetime | None = None
    error: ErrorDetail | None = None


class UrlBatchResult(BaseModel):
    """The batch's results, in the order asked."""

    model_config = example(
        {
            "items": [
                {
                    "id": UPLOAD_ID,
                    "variant": "thumb",
                    "url": _URL,
                    "expires_at": "2026-05-04T10:40:00Z",
                    "error": None,
                },
                {
                    "id": "0b2f6c1ad4e94f3fb1c1e0b5a7d9e8f1",
                    "variant": "medium",
                    "url": None,
                    "expires_at": None,
                    "error": {
                        "code": "not_ready",
                        "message": "The image is pending.",
                        "details": "pending",
                    },
                },
            ]
        }
    )

    items: list[UrlResult]


def _caller() -> urls.Caller:
    return urls.Caller(current_user.id, bool(current_user.is_admin))


def _lifetime(ttl: int | None) -> int:
    try:
        return urls.lifetime(ttl)
    except ValueError as exc:
        raise TTL_OUT_OF_RANGE.error(
            "The request is not valid.",
            [{"field": "ttl", "message": str(exc), "type": "out_of_range"}],
        ) from None


def _variant(name: str, field: str = "variant") -> Variant:
    try:
        return urls.lookup_variant(name)
    except urls.UnknownVariant:
        valid = ", ".join(sorted(variants.known_variants()))
        raise UNKNOWN_VARIANT.error(
            f"Unknown variant {name!r}; use one of: {valid}.",
            [{"field": field, "message": f"one of: {valid}", "type": "unknown_variant"}],
        ) from None


def not_ready(upload_id: str, status: str, details: object = None) -> ApiError:
    """Refuse an image without a file (409 `not_ready`); a pending one says when to ask again,
    with the pause `/complete` gives its upload."""
    headers = {}
    upload = db.session.get(Upload, upload_id) if status == UploadStatus.PENDING else None
    if upload is not None:
        headers["Retry-After"] = str(retry_after(upload, utcnow()))
    return NOT_READY.error(f"The image is {status}.", details, headers=headers)


def _no_key() -> ApiError:
    return NO_SIGNING_KEY.error(headers={"Retry-After": str(NO_KEY_RETRY_AFTER)})


@endpoint(
    bp,
    "GET",
    "/images/<upload_id>/url",
    query=UrlQuery,
    responses={200: SignedUrl},
    errors=(NO_IMAGE, NOT_READY, UNKNOWN_VARIANT, TTL_OUT_OF_RANGE, NO_SIGNING_KEY),
    tags=("images",),
    scope="images:urls",
)
def image_url(upload_id: str, query: UrlQuery) -> SignedUrl:
    """Mint a delivery URL for one of the caller's images."""
    variant = _variant(query.variant)
    ttl = _lifetime(query.ttl)
    try:
        row = urls.load_one(db.session, upload_id, _caller())
        minted = urls.Minter(ttl, time.time()).mint(row, variant)
    except urls.NotFound:
        raise NO_IMAGE.error() from None
    except urls.NotReady as exc:
        raise not_ready(upload_id, exc.status, {"status": exc.status}) from None
    except urls.NoSigningKey:
        raise _no_key() from None
    return SignedUrl(url=minted.url, expires_at=minted.expires_at)


@endpoint(
    bp,
    "POST",
    "/images/urls",
    body=UrlBatch,
    responses={200: UrlBatchResult},
    errors=(UNKNOWN_VARIANT, TTL_OUT_OF_RANGE, NO_SIGNING_KEY),
    tags=("images",),
    scope="images:urls",
    reads_only=True,
)
def image_urls(body: UrlBatch) -> UrlBatchResult:
    """Mint delivery URLs for up to 1000 image variants in one request."""
    known = variants.known_variants()
    wanted = []
    for i, item in enumerate(body.items):
        variant = known.get(item.variant)
        if variant is None:
            variant = _variant(item.variant, f"items.{i}.variant")  # raises the 422
        wanted.append(variant)
    minter = urls.Minter(_lifetime(body.ttl), time.time())
    rows = urls.load_many(db.session, (item.id for item in body.items), _caller())
    # The results are built from validated input and our own values: skip re-validating
    # a thousand models (most of the batch's time otherwise).
    result = UrlResult.model_construct
    results = []
    for item, variant in zip(body.items, wanted, strict=True):
        row = rows.get(item.id)
        try:
            if row is None:
                raise urls.NotFound(item.id)
            url, expires_at = minter.mint(row, variant)
        except urls.NotFound:
            error = ErrorDetail(code="not_found", message="No such image.", details=None)
        except urls.NotReady as exc:
            error = ErrorDetail(
                code="not_ready", message=f"The image is {exc.status}.", details=exc.status
            )
        except urls.NoSigningKey:
            raise _no_key() from None
        else:
            results.append(
                result(id=item.id, variant=item.variant, url=url, expires_at=expires_at, error=None)
            )
            continue
        results.append(
            result(id=item.id, variant=item.variant, url=None, expires_at=None, error=error)
        )
    return UrlBatchResult.model_construct(items=results)

"""Turn upstream failures into the API's error answers (one mapping for every view).

Registered on the API blueprint, so any /api/v1 view that lets a `CloudflareError` or
`BudgetExhausted` escape answers the same way (domain refusals, `DomainError`s, are mapped by
`broker.platform.errors`):

- Cloudflare refuses our credentials/account → 502 `upstream_auth` (an operator must act);
- no answer in time → 504 `upstream_timeout`;
- our budget is spent, or Cloudflare said 429 → 503 with `Retry-After`;
- Cloudflare failed (5xx, connection) → 502 `upstream_unavailable`;
- Cloudflare refused the content → 422 naming the field when we can tell it.

`UPSTREAM` lists what any route calling Cloudflare may answer; `CREATE_UPSTREAM` adds what only
a create can (a taken custom id, refused content). Views declare them in `endpoint(errors=…)`.
"""

from __future__ import annotations

import math
from typing import Any

from flask.typing import ResponseReturnValue

from broker.api.spec import RETRY_AFTER, ErrorCase, field_error
from broker.platform.errors import ApiError, handle_api_error
from broker.upstream.budget import BudgetExhausted
from broker.upstream.cloudflare import (
    CloudflareAuthError,
    CloudflareBadRequest,
    CloudflareConflict,
    CloudflareRateLimited,
    CloudflareTimeout,
    CloudflareUnavailable,
    UpstreamError,
)

# Cloudflare error codes that point at one request field.
_FIELD_FOR_CODE = {5411: "id", 5400: None, 5413: "file", 5455: "file"}
DEFAULT_RETRY_AFTER = 60

BUSY = ErrorCase(
    503,
    "upstream_busy",
    "The image service is busy; retry after the given time.",
    {"reason": "budget"},
    headers=(RETRY_AFTER,),
)
RATE_LIMITED = ErrorCase(
    503,
    "upstream_rate_limited",
    "The image service asked us to slow down; retry after the given time.",
    headers=(RETRY_AFTER,),
)
AUTH = ErrorCase(
    502,
    "upstream_auth",
    "Cloudflare refused the broker's credentials or account; an operator must fix them.",
)
TIMEOUT = ErrorCase(504, "upstream_timeout", "The image service did not answer in time.")
UNAVAILABLE = ErrorCase(502, "upstream_unavailable", "The image service failed; try again.")
UNEXPECTED = ErrorCase(502, "upstream_error", "The image service answered unexpectedly.")
ID_TAKEN = field_error(
    409,
    "image_id_taken",
    "An image with this id already exists.",
    "id",
    "cloudflare_5409",
)
REJECTED = field_error(
    422,
    "upstream_rejected",
    "Cloudflare refused the request: Invalid custom ID",
    "id",
    "cloudflare_5411",
)
UPSTREAM = (BUSY, RATE_LIMITED, AUTH, TIMEOUT, UNAVAILABLE, UNEXPECTED)
CREATE_UPSTREAM = (*UPSTREAM, ID_TAKEN, REJECTED)


def _retry_after(value: float | None) -> dict[str, str]:
    seconds = DEFAULT_RETRY_AFTER if value is None else max(1, math.ceil(value))
    return {"Retry-After": str(seconds)}


def upstream_api_error(exc: UpstreamError) -> ApiError:
    """Map an upstream failure to the API's answer."""
    if isinstance(exc, BudgetExhausted):
        return BUSY.error(details={"reason": exc.reason}, headers=_retry_after(exc.retry_after))
    if isinstance(exc, CloudflareRateLimited):
        return RATE_LIMITED.error(headers=_retry_after(exc.retry_after))
    if isinstance(exc, CloudflareAuthError):
        return AUTH.error()
    if isinstance(exc, CloudflareTimeout):
        return TIMEOUT.error()
    if isinstance(exc, CloudflareUnavailable):
        return UNAVAILABLE.error()
    if isinstance(exc, CloudflareConflict):
        return ID_TAKEN.error(details=_field("id", exc))
    if isinstance(exc, CloudflareBadRequest):
        field = _FIELD_FOR_CODE.get(exc.code or 0)
        return REJECTED.error(f"Cloudflare refused the request: {exc.message}", _field(field, exc))
    return UNEXPECTED.error()


def _field(field: str | None, exc: Any) -> list[dict[str, Any]]:
    return [{"field": field, "message": str(exc.message), "type": f"cloudflare_{exc.code}"}]


def _on_upstream(exc: UpstreamError) -> ResponseReturnValue:
    return handle_api_error(upstream_api_error(exc))


def register(bp: Any) -> None:
    """Install the mapping on a blueprint."""
    bp.register_error_handler(UpstreamError, _on_upstream)

"""Cloudflare's inbound completion hook (`POST /hooks/cloudflare`), taken as a hint only.

Cloudflare authenticates its notification with nothing but a static shared secret in
`cf-webhook-auth` (no HMAC, no timestamp), so the body is never trusted: a valid call only makes
the named upload due for verification (every pending upload, when no known image id can be read
from it: its Images payload is not documented), and the worker confirms with Cloudflare before
anything changes. A wrong or missing secret changes nothing.

The view is the hint's unit of work: it commits the hint itself (a view may; the domain
functions it calls, `completion.hint` and `hint_all`, never do).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Flask, request
from flask.typing import ResponseReturnValue

from broker.platform.config import current_settings
from broker.platform.db import db
from broker.platform.errors import ApiError
from broker.uploads import completion
from broker.uploads.models import Upload, UploadStatus

log = logging.getLogger("broker.hooks")

bp = Blueprint("hooks", __name__, url_prefix="/hooks")

MAX_BODY = 64 * 1024


@bp.post("/cloudflare")
def cloudflare_notification() -> ResponseReturnValue:
    """Take Cloudflare's upload notification as a hint to verify that upload now."""
    expected = current_settings().cloudflare_webhook_secret or ""
    given = request.headers.get("cf-webhook-auth", "")
    # Compare even when unconfigured so timing says nothing; an empty secret never matches.
    ok = hmac.compare_digest(given.encode(), expected.encode())
    if not expected or not ok:
        raise ApiError(401, "unauthorized", "Invalid or missing cf-webhook-auth.")
    if (request.content_length or 0) > MAX_BODY:
        raise ApiError(413, "too_large", "Notification body too large.")
    # The app's one JSON reader, as on the API: unreadable → 400 invalid_json, a value no field
    # may hold (NaN, a lone surrogate, NUL) → 422. Any content type: Cloudflare documents none.
    data = request.get_json(force=True)
    if not isinstance(data, dict):
        raise ApiError(
            422,
            "validation_error",
            "The request is not valid.",
            [{"field": None, "message": "The body must be a JSON object.", "type": "dict_type"}],
        )
    image = data.get("image")
    image_id = data.get("imageId") or (image.get("id") if isinstance(image, dict) else None)
    upload = None
    if isinstance(image_id, str) and 0 < len(image_id) <= 1024:
        # A custom id may have been used before (by uploads since deleted): the newest is it.
        upload = db.session.scalar(
            sa.select(Upload)
            .where(Upload.image_id == image_id)
            .order_by(Upload.created_at.desc())
            .limit(1)
        )
    if upload is None:
        # Cloudflare does not document this payload: an authenticated notification we cannot
        # match still says some upload finished, so every pending one is checked next.
        hinted = completion.hint_all(db.session)
        db.session.commit()
        log.info("cloudflare notification without a known image id: %d uploads due", hinted)
        return {"status": "accepted"}, 202
    if upload.status == UploadStatus.PENDING and (data.get("success") is True or _refusal(data)):
        # Shown to the client as what Cloudflare said of the last file (a later success clears
        # it); the state itself still changes only once verified.
        upload.upstream_refusal = _refusal(data)
    hinted = completion.hint(upload)
    db.session.commit()
    log.info("cloudflare notification for upload %s (hint=%s)", upload.id, hinted)
    return {"status": "accepted"}, 202


def _refusal(data: dict[str, Any]) -> dict[str, Any] | None:
    """Cloudflare's first error of a failed upload's notification (`{code, message}`), if any."""
    errors = data.get("errors")
    if data.get("success") is not False or not isinstance(errors, list) or not errors:
        return None
    first = errors[0]
    if not isinstance(first, dict) or not isinstance(first.get("code"), int):
        return None
    message = first.get("message")
    text = message[:200] if isinstance(message, str) and message.isprintable() else ""
    return {"code": first["code"], "message": text}


def init_app(app: Flask) -> None:
    """Register the blueprint, exempt from CSRF (it carries no cookie; the secret authenticates)."""
    from broker.platform.extensions import csrf

    csrf.exempt(bp)
    app.register_blueprint(bp)

"""`/i/<id>/<variant>`: a stable image address that redirects to a freshly signed URL.

So `<img src="/i/…">` works in the gallery and in apps (session cookie or bearer token), while
the browser caches the redirect for a little less than the signature's remaining life.
"""

from __future__ import annotations

import time

from flask import Blueprint, Response
from flask_login import current_user

from broker.auth import fast_session_token
from broker.images import urls
from broker.images.api import not_ready
from broker.platform.db import db
from broker.platform.errors import ApiError

bp = Blueprint("delivery", __name__)

# Never let a cached redirect point at a URL about to expire: keep this much of its life back
# (at most half of it) for clock skew between us and Cloudflare and for the image fetch itself.
SAFETY_MARGIN = 300


def _load(upload_id: str) -> urls.UploadRef:
    """Authenticate the caller and load the upload they may see (NotFound otherwise).

    A browser showing a gallery asks for dozens of images at once, so a session cookie is
    checked in the same indexed query that loads the upload, with broker.auth's own rule
    (`session_user_clause`); `fast_session_token` says when that rule alone decides. Bearer
    tokens, strong session protection, remember cookies and unknown tokens take the regular
    flask-login path.
    """
    token = fast_session_token()
    if token is not None:
        found = urls.load_for_session(token, upload_id)
        if found is not None:
            row = found[1]
            if row is None:
                raise urls.NotFound(upload_id)
            return row
    if not current_user.is_authenticated:
        raise ApiError(401, "unauthorized", "Log in to see this image.")
    return urls.load_one(db.session, upload_id, urls.Caller(current_user.id, current_user.is_admin))


@bp.get("/i/<upload_id>/<variant>")
def image(upload_id: str, variant: str) -> Response:
    """Redirect to a signed delivery URL of one of the caller's images."""
    try:
        wanted = urls.lookup_variant(variant)
        row = _load(upload_id)
        now = time.time()
        ttl = urls.lifetime(None)
        minted = urls.Minter(ttl, now).mint(row, wanted)
    except (urls.UnknownVariant, urls.NotFound):
        raise ApiError(404, "not_found", "No such image.") from None
    except urls.NotReady as exc:
        raise not_ready(upload_id, exc.status) from None
    except urls.NoSigningKey:
        raise ApiError(503, "no_signing_key", "Images cannot be shown right now.") from None
    remaining = int(minted.expires_at.timestamp() - now) if minted.expires_at else ttl
    max_age = max(0, remaining - min(SAFETY_MARGIN, remaining // 2))
    return Response(
        status=302,
        headers={
            "Location": minted.url,
            "Cache-Control": f"private, max-age={max_age}",
            "Vary": "Cookie, Authorization",
        },
    )

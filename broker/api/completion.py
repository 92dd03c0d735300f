"""POST /api/v1/uploads/{id}/complete: the client says its file upload returned.

The answer is the upload's current state (200 once it left `pending`, 202 while pending) and the
upload becomes due for verification now; the worker batches such checks (one `GET /v2` listing
for many uploads) so a busy minute costs a handful of upstream calls, not one per client.
"""

from __future__ import annotations

from flask import Response

from broker import completion, uploads
from broker.api import bp
from broker.api.spec import endpoint
from broker.api.uploads import ERRORS, UploadOut, _visible
from broker.db import db

# How long a client should wait before asking again (or fetching the upload).
RETRY_AFTER = "1"


@endpoint(
    bp,
    "POST",
    "/uploads/<upload_id>/complete",
    responses={200: UploadOut, 202: UploadOut, **ERRORS},
    tags=("uploads",),
)
def complete_upload(upload_id: str) -> tuple[UploadOut, int, dict[str, str]] | Response:
    """Tell the broker the file was sent; answers the state now (202 while still pending)."""
    upload = _visible(upload_id)
    if upload.status != uploads.PENDING:
        return UploadOut.of(upload), 200, {}
    completion.hint(upload)  # also wakes an in-process worker
    db.session.commit()
    return UploadOut.of(upload), 202, {"Retry-After": RETRY_AFTER}

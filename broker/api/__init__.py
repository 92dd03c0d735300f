"""The JSON API for browser pages and mobile apps, under /api/v1.

Each resource lives in its own module and declares its views with `spec.endpoint`, so the
OpenAPI document is generated from the same models that validate the requests.
"""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("api", __name__, url_prefix="/api/v1")

# Resource modules register their routes on `bp` when imported.
from broker.api import (  # noqa: E402, F401
    auth,
    completion,
    docs,
    images,
    uploads,
    upstream,
    webhooks,
)

upstream.register(bp)

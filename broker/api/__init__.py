"""The JSON API for browser pages and mobile apps, under /api/v1: the shared plumbing.

- `bp`: the "api" blueprint every feature's routes attach to.
- `spec.endpoint`: declares a route once; the same pydantic models validate the request and
  write its entry in the OpenAPI document (`/api/v1/openapi.json`, rendered at `/api/v1/docs`),
  with the domain's declared refusals as its error cases.
- `unit_of_work`: every unsafe route is one unit of work: views never commit; the request
  commits once, or rolls back and undoes what it did outside the database.
- `idempotency`: `@idempotent`, the `Idempotency-Key` replay of an unsafe route.
- `upstream_errors`: the one mapping of upstream failures to API answers.

The routes themselves live with their feature (`broker.uploads.api`, `broker.webhooks.api`,
`broker.images.api`, `broker.auth.api`); `broker.create_app` imports them before it registers
`bp`. This package imports no feature.
"""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("api", __name__, url_prefix="/api/v1")

from broker.api import docs, upstream_errors  # noqa: E402, F401  (routes and handlers on bp)

upstream_errors.register(bp)

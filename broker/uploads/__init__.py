"""Uploads: from a one-time direct-upload URL to a ready (or expired, rejected, deleted) image.

- `lifecycle`: the state machine (pending → ready | expired | rejected, any → deleted), each
  move writing its webhook event; `public_fields`, the upload's one public shape (API answers
  and webhook events).
- `create`: the create path, one function from a user's request to a pending upload (the API
  route and the web process's warm-up both call it).
- `policy`: the rules of a new upload (metadata, custom ids, expiry bounds); `quotas`: per-user
  quotas held by reservations while Cloudflare answers; `queries`: finding, listing and
  counting uploads.
- `completion`: verification — hints (`/complete`, Cloudflare's notification) make an upload
  due; the worker checks due uploads singly or with one batched listing, and expires stale ones.
- `api`: the `/api/v1/uploads` routes; `cloudflare_hook`: Cloudflare's inbound completion
  notification at `/hooks/cloudflare`; `warmup`: runs the create path once before a web
  process serves.
- `models`: `Upload`, `UploadReservation`, `VerifyTurn`.

Each refusal (`UploadError`) is declared once, beside the rule it enforces, and documented from
that declaration on the routes that may answer it. A request's transaction is its unit of
work's (`broker.api.unit_of_work`), never a function's here.

Every state change writes its webhook event through `broker.webhooks.outbox` in the same
transaction. This package imports webhooks; webhooks never import uploads.
"""

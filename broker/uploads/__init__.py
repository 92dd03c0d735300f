"""Uploads: from a one-time direct-upload URL to a ready (or expired, rejected, deleted) image.

- `lifecycle`: the state machine (pending → ready | expired | rejected, any → deleted), the
  create step against Cloudflare, per-user limits held by reservations, the upload's public
  shape (`public_fields`, shared by API answers and webhook events), listing.
- `completion`: verification — hints (`/complete`, Cloudflare's notification) make an upload
  due; the worker checks due uploads singly or with one batched listing, and expires stale ones.
- `idempotency`: `Idempotency-Key` replay for the create route.
- `api`: the `/api/v1/uploads` routes; `cloudflare_hook`: Cloudflare's inbound completion
  notification at `/hooks/cloudflare`.
- `models`: `Upload`, `UploadReservation`, `IdempotencyKey`.

Every state change writes its webhook event through `broker.webhooks.outbox` in the same
transaction. This package imports webhooks; webhooks never import uploads.
"""

"""Agreement with Cloudflare: reconciliation of the database with the account's listing, and
the account's usage.

Offers `run.reconcile` (one whole pass: `flask reconcile [--dry-run]` and the worker's
`reconcile` job), `check` (its pure steps: list, plan, confirm, apply), `usage` (Cloudflare's
image count and allowance, kept for the admin page and `/metrics`, with per-user counts), the
`ReconcileReport` and `CloudflareUsage` models and `metric_lines`.

Rules it enforces: every upstream call is background work within the budget's share (the batch
API carries the listing when on), and a spent budget ends the pass early with a report saying
so; no transaction is open while Cloudflare answers (`run` commits between the steps, the one
unit of work here); nothing is changed on the listing's word alone: a row is marked gone only
after Cloudflare answered 404 for its image, only a complete listing can show an image missing,
and nothing younger than `BROKER_RECONCILE_GRACE` (an upload in flight) is touched; an image
stamped with a user's `creator` but unknown here is adopted or deleted
(`BROKER_RECONCILE_ORPHANS`) and reported either way; images of other creators are left alone.
"""

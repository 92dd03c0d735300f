"""Erasing a user: every image gone upstream, credentials revoked, personal fields removed.

Offers `request_erasure` (the ask: at once the account is locked out, its tokens and sessions
end and its personal fields are removed, in the audit log and in the webhook events about
its uploads, queued or sent; the rest is queued), `erase_due` (the worker's job),
`find_erased` and the `Erasure` model; routes in `api` (admins by public id, the app's backend
by external id with a service key of scope `users:erase`) and `flask users erase` in `cli`.

Rules it enforces: asking twice is a no-op (one erasure per account, found again by the
external id it had); the upstream deletions are leased work (`broker.platform.leases`), done a
batch per turn, so a killed worker's erasure is taken over when its lease runs out and a
Cloudflare fault only delays it; an image is marked gone only after Cloudflare said so (deleted
or not found); the account's own images are found by both its upload rows and Cloudflare's
listing by `creator`, so an image whose create answer was lost goes too; exactly one
`user.erased` event, written in the transaction that finishes the erasure.
"""

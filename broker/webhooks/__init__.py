"""Outgoing webhooks to the app's backend, per Standard Webhooks.

- `outbox.emit(session, type, data)`: an event and one delivery per subscribed endpoint, in the
  caller's transaction, so the event exists exactly when its state change committed.
- `signing`: `webhook-signature` values (pure), secret generation, rotation windows.
- `schedule`: the retry schedule (pure).
- `endpoints`: register (behind the SSRF guard), rotate, enable/disable, redeliver, list.
- `sending`: the worker's job — claim due deliveries under a lease, sign, POST to the pinned
  address with a deadline, log the attempt, schedule the retry; each endpoint in its own lanes
  (threads), so a slow receiver never delays another's deliveries.
- `ssrf`: the address checks every outgoing request passes.
- `api`, `cli`: the admin API under `/api/v1/webhooks` and `flask webhooks …`.
- `models`: endpoints, events, deliveries, attempts.

This package knows nothing of uploads: the data of an event is built by whoever emits it.
(Cloudflare's inbound completion hook is `broker.uploads.cloudflare_hook`.)
"""

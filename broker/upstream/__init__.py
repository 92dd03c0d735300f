"""Everything that talks to Cloudflare Images (or the emulator standing in for it).

- `cloudflare`: the one client — typed results (`Image`, `DirectUpload`, …) and typed errors
  (`CloudflareError` and its kinds); idempotent calls retried with backoff, a POST never re-sent
  once it may have arrived.
- `budget`: the upstream budget every process shares through the database, so the broker
  stays under Cloudflare's global rate limit; `Priority` says who a call is for.
- `models`: the budget's tables.

How an upstream failure is answered over HTTP lives in `broker.api.upstream_errors`.
"""

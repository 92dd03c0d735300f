"""Everything that talks to Cloudflare Images (or the emulator standing in for it).

- `cloudflare`: the one client — typed results (`Image`, `DirectUpload`, …) and typed errors
  (`CloudflareError` and its kinds); idempotent calls retried with backoff, a POST never re-sent
  once it may have arrived. `Budget` is what it spends before each attempt (acquire, acquire_in
  a caller's transaction, pause after a 429, status for pacing); `Priority` says who a call is for.
- `budget`: `UpstreamBudget`, the window every process shares through the database, so the
  broker stays under Cloudflare's global rate limit.
- `batch`: the batch host's route and its per-token rate (a `Budget` without a window).
- `models`: the budget's tables.

How an upstream failure is answered over HTTP lives in `broker.api.upstream_errors`.
"""

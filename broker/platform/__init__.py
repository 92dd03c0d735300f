"""The shared platform every feature stands on; it imports no feature.

- `config`: the one table of every `BROKER_*` setting, the refusals of unsafe production
  settings, and `Settings`, every setting with its real type, read once per app
  (`current_settings()` in a request, a command or the worker; `settings_of(app)`).
- `columns`: `StrEnumText`, a `StrEnum` status kept as its plain string.
- `db`: the SQLAlchemy binding, `utcnow`, `UTCDateTime`, and the one transaction rule.
- `sqlite_writes`: one writer at a time per process on SQLite.
- `errors`: `ApiError` and `DomainError`, the one JSON error shape, HTML error pages.
- `json_input`: the one strict JSON reader of request bodies (400 unreadable, 422 unacceptable);
  `text_problem`, its rule for text (no NUL, no lone surrogate), for query strings and forms too.
- `routing`: URL converters; `<id:…>` parses a row id once (ASCII digits, 32-bit, else 404);
  string ids (the default converter) never hold NUL; `needs_no_user` marks a view that answers
  everyone alike (no credential is looked up for it).
- `encryption`: `EncryptedText` columns under `BROKER_ENCRYPTION_KEYS` (Fernet, rotatable);
  `cli`: `flask encryption generate-key | reencrypt`.
- `extensions`: CSRF, flask-login and the rate limiter, created unbound.
- `logs`: one log line per request with its request id (`request_id()`); every message
  escaped to one line. WSGI middleware, like `headers`, so no response goes without them.
- `headers`: the security headers and the strict Content-Security-Policy.
- `leases`: the leased-work unit: claim rows for one worker at a time (`FOR UPDATE SKIP
  LOCKED` or compare-and-set), ask the outside world between two transactions, record, commit.
- `wakeup`: the in-process worker's wake-up call.
- `text`: UTC times and aligned tables for the operators' commands.
- `health`: `/livez`, `/readyz` and the Prometheus `/metrics` page, whose gauges the features
  register with `metrics.register_gauge`.
"""

"""When a dependency fails, the broker degrades instead of answering 500.

- Rate-limit storage (Redis, `BROKER_RATELIMIT_STORAGE_URI`) unreachable: Flask-Limiter counts in
  this process instead (its in-memory fallback), checks the storage again with a backoff, and
  goes back to it once it answers. Each switch is logged once, and `/metrics` shows
  `broker_ratelimit_storage_up` (0 while counting in-process) and how often it switched.
- Database unreachable (a refused or dropped connection, a pool that cannot hand one out):
  503 `database_unavailable` with `Retry-After`, one log line, no trace.
- `/readyz` names the dependency that is down (broker.platform.health).

Public interface: `init_app(app)`, `metric_lines(session)`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from flask import Flask, g
from flask.typing import ResponseReturnValue

from broker.platform import health
from broker.platform.db import Session, db
from broker.platform.errors import ApiError, handle_api_error
from broker.platform.extensions import login_manager
from broker.platform.health import gauge

log = logging.getLogger("broker.outages")

DATABASE_RETRY_AFTER = 5
# Seconds a rate-limit storage call may take before it counts as down: a login must not wait
# on a Redis that does not answer.
STORAGE_TIMEOUT = 1.0
# Flask-Limiter says it switched, and switched back, in these log messages (its only signal).
_FELL_BACK = "falling back to in-memory storage"
_RECOVERED = "storage recovered"


class _StorageWatch(logging.Handler):
    """Follow Flask-Limiter's storage switches: log each once as the broker's, count them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.in_process = False
        self.fallbacks = 0
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        """Note a switch to in-process counting, or back to the storage."""
        message = record.getMessage()
        with self._lock:
            if _FELL_BACK in message and not self.in_process:
                self.in_process, self.fallbacks = True, self.fallbacks + 1
                log.warning(
                    "rate-limit storage unreachable: counting attempts in this process until "
                    "it answers again"
                )
            elif _RECOVERED in message and self.in_process:
                self.in_process = False
                log.warning("rate-limit storage answers again: counting attempts in it")
            elif record.levelno >= logging.ERROR:  # a count swallowed mid-request: one line
                log.warning("rate limit not counted: %s", message)


# One per process, as Flask-Limiter's logger and its storage state are.
_watch = _StorageWatch()


def metric_lines(session: Session) -> Iterable[str]:
    """Render the rate-limit storage's state and how often the process fell back from it."""
    return [
        *gauge(
            "broker_ratelimit_storage_up",
            "1 while rate limits count in the shared storage, 0 while this process counts on "
            "its own because the storage is unreachable.",
            0 if _watch.in_process else 1,
        ),
        *gauge(
            "broker_ratelimit_fallbacks",
            "Times this process fell back to counting rate limits on its own.",
            _watch.fallbacks,
        ),
    ]


def _database_unavailable(exc: Exception) -> ResponseReturnValue:
    """Answer a request the database could not serve with 503 and when to try again."""
    log.warning("database unavailable: %s", type(getattr(exc, "orig", exc)).__name__)
    db.session.rollback()  # SQLAlchemy drops a connection that died with the transaction
    # The error page shows who is logged in: nobody, rather than asking the database again.
    g._login_user = login_manager.anonymous_user()
    return handle_api_error(
        ApiError(
            503,
            "database_unavailable",
            "The database cannot be reached right now; try again shortly.",
            headers={"Retry-After": str(DATABASE_RETRY_AFTER)},
        )
    )


def init_app(app: Flask) -> None:
    """Register the database error handlers; let rate limits fall back to in-process counting.

    Call before broker.platform.extensions.init_app, which binds the limiter to these settings.
    """
    config: dict[str, Any] = app.config
    config.setdefault("RATELIMIT_IN_MEMORY_FALLBACK_ENABLED", True)
    # A storage that fails between the check and the count after the view: log, carry on.
    config.setdefault("RATELIMIT_SWALLOW_ERRORS", True)
    if str(config.get("RATELIMIT_STORAGE_URI") or "").startswith(("redis", "rediss")):
        options = dict(config.get("RATELIMIT_STORAGE_OPTIONS") or {})
        options.setdefault("socket_timeout", STORAGE_TIMEOUT)
        options.setdefault("socket_connect_timeout", STORAGE_TIMEOUT)
        config["RATELIMIT_STORAGE_OPTIONS"] = options
    limiter_log = logging.getLogger("flask-limiter")
    if _watch not in limiter_log.handlers:
        # Its switches, once each, in the broker's log instead of its own lines and traces.
        limiter_log.addHandler(_watch)
        limiter_log.setLevel(logging.INFO)
        limiter_log.propagate = False
    health.register_metrics(app, metric_lines)
    for kind in (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError):
        app.register_error_handler(kind, _database_unavailable)

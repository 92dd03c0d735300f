"""The Images batch API: batch tokens, the batch host's own limit, and its known refusals.

Cloudflare hands out a batch token at `GET …/images/v1/batch_token` (a global API call) and
accepts it at `https://batch.imagedelivery.net/images/...` for six endpoints. Those calls do not
count toward the global limit; each token allows 200 requests per second. The emulator serves the
batch host under `/batch` on its own port (`/batch/images/v1/…`) and keeps its counters apart
(`batch.<endpoint>`).

Every call of `batch_token` mints a new, distinct token; an account may hold several at once,
each with its own 200 calls per second (a sliding one-second window per token).

Controls (see `control.py`) make chosen endpoints answer `{"code": 103, "message": "forbidden
endpoint"}` on the batch host, as some accounts have reported, and revoke every token or one.
"""

from __future__ import annotations

import hmac
import math
import secrets
import threading
from collections import deque
from datetime import datetime, timedelta

# Endpoints the batch host serves (Cloudflare's list: upload v1, delete, details, update,
# list v2, direct upload v2); anything else there is "no route".
BATCH_ENDPOINTS = frozenset(
    {"upload_v1", "image_delete", "image_details", "image_edit", "list_v2", "direct_upload"}
)
# How the batch host's endpoints are named in counters and faults.
BATCH_PREFIX_NAME = "batch."
FORBIDDEN_CODE = 103


class BatchHost:
    """Issued batch tokens, their per-second limit, and the endpoints refused with code 103."""

    def __init__(self, token_ttl: float, rate_limit: int) -> None:
        self.token_ttl = self._default_ttl = token_ttl
        self.rate_limit = self._default_rate = rate_limit
        self._tokens: dict[str, datetime] = {}
        self._calls: dict[str, deque[float]] = {}
        # Per token: calls let through in all, and the most in any one-second window.
        self._use: dict[str, list[int]] = {}
        self._forbidden: set[str] = set()
        self._lock = threading.Lock()

    def issue(self, now: datetime) -> tuple[str, datetime]:
        """Mint a token valid for `token_ttl` seconds from `now`; return it and its expiry."""
        token = secrets.token_urlsafe(32)
        expires = now + timedelta(seconds=self.token_ttl)
        with self._lock:
            # Forget tokens long expired so the table stays small.
            self._tokens = {t: e for t, e in self._tokens.items() if e > now}
            self._tokens[token] = expires
        return token, expires

    def valid(self, token: str, now: datetime) -> bool:
        """Tell whether `token` was issued here and has not expired (or been revoked)."""
        with self._lock:
            for known, expires in self._tokens.items():
                if hmac.compare_digest(known.encode(), token.encode()):
                    return expires > now
        return False

    def revoke_all(self) -> None:
        """Make every issued token fail authentication (a control)."""
        with self._lock:
            self._tokens.clear()
            self._calls.clear()

    def revoke(self, token: str) -> bool:
        """Make one issued token fail authentication (a control); False when it is unknown."""
        with self._lock:
            self._calls.pop(token, None)
            return self._tokens.pop(token, None) is not None

    def use(self) -> list[dict[str, int]]:
        """Per token used, in the order first used: calls let through and the most in any
        one-second window."""
        with self._lock:
            return self._uses()

    def _uses(self) -> list[dict[str, int]]:
        """`use`'s answer, with the lock held by the caller."""
        return [{"calls": calls, "peak": peak} for calls, peak in self._use.values()]

    def use_of(self, token: str) -> tuple[int, int]:
        """Calls let through with `token`, and the most in any one-second window."""
        with self._lock:
            calls, peak = self._use.get(token, [0, 0])
            return calls, peak

    def hit(self, token: str, now: float) -> int | None:
        """Count a call of `token` in its one-second window; Retry-After seconds when over."""
        with self._lock:
            calls = self._calls.setdefault(token, deque())
            while calls and calls[0] <= now - 1.0:
                calls.popleft()
            if len(calls) >= self.rate_limit:
                return max(1, math.ceil(calls[0] + 1.0 - now))
            calls.append(now)
            use = self._use.setdefault(token, [0, 0])
            use[0] += 1
            use[1] = max(use[1], len(calls))
            return None

    def forbid(self, endpoints: set[str]) -> None:
        """Answer code 103 for these endpoints from now on (replacing the previous set)."""
        with self._lock:
            self._forbidden = set(endpoints)

    def forbidden(self, endpoint: str) -> bool:
        """Tell whether `endpoint` answers code 103 on the batch host."""
        with self._lock:
            return endpoint in self._forbidden or "*" in self._forbidden

    def state(self) -> dict[str, object]:
        """The batch host's settings and refusals, as the control answers them."""
        with self._lock:
            return {
                "forbidden": sorted(self._forbidden),
                "rate_limit": self.rate_limit,
                "token_ttl": self.token_ttl,
                "tokens": len(self._tokens),
                "use": self._uses(),
            }

    def reset(self) -> None:
        """Forget tokens, call windows and refusals; restore the configured settings."""
        with self._lock:
            self.token_ttl, self.rate_limit = self._default_ttl, self._default_rate
            self._tokens.clear()
            self._calls.clear()
            self._use.clear()
            self._forbidden.clear()

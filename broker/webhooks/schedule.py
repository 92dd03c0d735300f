"""The retry schedule of a failed delivery (pure)."""

from __future__ import annotations

import random

# Seconds after the first attempt fails: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, then failed.
RETRY_DELAYS: tuple[int, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)


JITTER = 0.1


MAX_RETRY_AFTER = 86400


def retry_delay(
    failed_attempts: int,
    *,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float | None:
    """Return seconds to wait after the `failed_attempts`-th failure, or None to give up.

    Each delay gets ±10 % jitter so a recovering receiver is not hit by a synchronized wave.
    A `Retry-After` from a 429/503 is honoured as a minimum (capped at a day).
    """
    if failed_attempts < 1 or failed_attempts > len(RETRY_DELAYS):
        return None
    base = RETRY_DELAYS[failed_attempts - 1]
    rng = rng or random.Random()
    delay = base * (1 + rng.uniform(-JITTER, JITTER))
    if retry_after is not None:
        delay = max(delay, min(float(retry_after), MAX_RETRY_AFTER))
    return delay


def max_attempts() -> int:
    """Return how many attempts a delivery gets before it is marked failed."""
    return len(RETRY_DELAYS) + 1

"""The retry schedule (pure): 5 s to 10 h with jitter, Retry-After as a capped minimum."""

from __future__ import annotations

import random

from broker.webhooks import schedule


def test_retry_schedule():
    expected = [5, 300, 1800, 7200, 18000, 36000, 36000]
    rng = random.Random(1)
    for n, base in enumerate(expected, start=1):
        delay = schedule.retry_delay(n, rng=rng)
        assert delay is not None and base * 0.9 <= delay <= base * 1.1
    assert schedule.retry_delay(8) is None
    assert schedule.max_attempts() == 8
    # Retry-After is honoured as a minimum, capped at a day.
    assert schedule.retry_delay(1, retry_after=120, rng=rng) == 120
    assert schedule.retry_delay(1, retry_after=10**9, rng=rng) == 86400

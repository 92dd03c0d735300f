"""The worker's wake-up call: fresh work (an event, a due verification) need not wait a poll."""

from __future__ import annotations

import threading

# The inline worker (and tests) wait on this; emitting an event wakes them early.
wake = threading.Event()


def notify_worker() -> None:
    """Wake an in-process worker so fresh work is not left waiting for the next poll."""
    wake.set()

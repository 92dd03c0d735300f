"""gunicorn.conf.py hands a web process's freed heap pages back after it served requests, and
leaves an idle process alone."""

from __future__ import annotations

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class _Worker:
    """A gunicorn worker whose request count (`nr`) follows `counts`, one per look."""

    def __init__(self, counts: list[int]) -> None:
        self.nr = 0
        self._counts = iter(counts)

    @property
    def alive(self) -> bool:
        try:
            self.nr = next(self._counts)
        except StopIteration:
            return False
        return True


class _Libc:
    def __init__(self) -> None:
        self.trims: list[int] = []

    def malloc_trim(self, pad: int) -> int:
        self.trims.append(pad)
        return 1


def test_the_heap_is_trimmed_once_per_interval_that_served_requests() -> None:
    trim_after_requests = runpy.run_path(str(ROOT / "gunicorn.conf.py"))["_trim_after_requests"]
    libc = _Libc()
    # Idle, then 3 requests, idle, 2 more, idle: two intervals served requests.
    trim_after_requests(_Worker([0, 3, 3, 5, 5]), libc, interval=0)
    assert libc.trims == [0, 0]

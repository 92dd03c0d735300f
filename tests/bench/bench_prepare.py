"""Benchmark: a phone photo made right in the browser against the original, on a 10 Mbit/s uplink.

Runs the side-by-side browser test (real Chromium, the emulator, the broker's page; the uplink
throttled through the DevTools protocol) and prints its figures: bytes sent and the time from the
drop until the file is ready, for the photo as taken and for it resized to a 2048 px rule.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST = (
    "tests/browser/test_prepare.py::test_prepared_photo_against_the_original_on_a_throttled_uplink"
)
# A phone's uplink; the suite runs the same test at 100 Mbit/s.
UPLINK_BITS = "10000000"


def main() -> int:
    """Run the side-by-side test and print what it measured."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST],
        cwd=ROOT,
        env={**os.environ, "BENCH_PREPARE_UPLINK_BITS": UPLINK_BITS},
        check=False,
    )
    figures = ROOT / "test-artifacts" / "bench-prepare.txt"
    if run.returncode == 0 and figures.exists():
        print(figures.read_text(), end="")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())

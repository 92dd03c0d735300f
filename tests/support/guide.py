"""The operations guide (broker/OPERATIONS.md) as the tests read it: its fenced blocks, found by
first line."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "broker" / "OPERATIONS.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def block(first_line: str, language: str | None = None) -> str:
    """Return the guide's one fenced block whose first line is `first_line` (whole text)."""
    found = [
        body
        for lang, body in _FENCE.findall(GUIDE.read_text())
        if body.split("\n", 1)[0].strip() == first_line and language in (None, lang)
    ]
    assert len(found) == 1, f"guide blocks starting {first_line!r}: {len(found)}"
    return found[0]


def run(
    args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run a command as a reader would, to its end (2 minutes at most); its output as text."""
    return subprocess.run(
        args,
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

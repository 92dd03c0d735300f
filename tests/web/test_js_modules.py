"""The page's JavaScript modules unit-tested without a browser: node's test runner on tests/js/."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]


def test_queue_module_cases_pass_in_node() -> None:
    node = shutil.which("node")
    require(node is not None, "needs node (Debian package nodejs)")
    assert node
    result = subprocess.run(
        [node, "--test", "tests/js/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Every case ran (a runner that found no file would also exit 0).
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout, result.stdout

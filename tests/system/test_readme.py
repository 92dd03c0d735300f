"""The README, executed: every `sh` block a reader would run, run with bash against a live stack.

The stack is what `make run` starts (`python -m broker.devserver` after `flask db upgrade`, the
Makefile's two commands) on ports from the OS, in a folder of its own that holds `instance/`,
the checkout's `wsgi.py` and `gunicorn.conf.py`, and a `photo.jpg` (the reader's photo). The
blocks run there with `.venv/bin` first on PATH (the README's `. .venv/bin/activate`), and
`localhost:5000` / `localhost:8788` in their text become the stack's ports. What the runner does
with blocks and `# →` answers: tests/readme.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.emulator.testing import make_image
from tests.readme import run_document
from tests.system.topology import wait_for

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The sections whose commands a reader runs against make run's stack: each must run a block.
FLOWS = {
    "Uploading: the JSON API",
    "Accounts and authentication",
    "Use it with your own users",
    "Completion and webhooks",
    "Showing private images",
    "The local Cloudflare Images emulator",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """make run's stack, started for the README."""

    folder: Path
    env: dict[str, str]
    broker_port: int
    emulator_port: int


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Start the development stack as make run does; stop it (and only it) afterwards."""
    folder = tmp_path / "checkout"
    (folder / "instance").mkdir(parents=True)
    for name in ("wsgi.py", "gunicorn.conf.py"):
        (folder / name).symlink_to(ROOT / name)
    (folder / "photo.jpg").write_bytes(make_image(120, 80, "JPEG"))
    broker_port, emulator_port = _free_port(), _free_port()
    # A reader's shell: none of this test run's own settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "PYTEST_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        BROKER_INSTANCE_PATH=str(folder / "instance"),
        BROKER_PORT=str(broker_port),
        EMULATOR_PORT=str(emulator_port),
    )
    subprocess.run(
        [BIN / "flask", "--app", "broker", "db", "upgrade"],
        cwd=folder,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    log = folder / "make-run.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "broker.devserver"],
            cwd=folder,
            # As the README says to try webhooks with a receiver on this machine.
            env={**env, "BROKER_WEBHOOK_ALLOW_PRIVATE": "true"},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: "Press Ctrl-C to stop" in log.read_text() or server.poll() is not None,
            120,
            "the development server's banner",
        )
        assert server.poll() is None, log.read_text()
        yield Stack(folder, env, broker_port, emulator_port)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)


@pytest.mark.timeout(600)
def test_the_readme_runs_against_make_runs_stack(stack: Stack, report) -> None:
    """Every unmarked `sh` block runs and prints what the README shows; the reader's flows all
    run (none is marked away)."""
    ran = run_document(
        (ROOT / "README.md").read_text(),
        cwd=stack.folder,
        env=stack.env,
        replace={
            "localhost:5000": f"127.0.0.1:{stack.broker_port}",
            "localhost:8788": f"127.0.0.1:{stack.emulator_port}",
        },
    )
    ran_sections = {b.section for b in ran.run}
    assert not FLOWS - ran_sections, ran_sections
    log = (stack.folder / "make-run.log").read_text()
    assert "Traceback" not in log and "batch token refused" not in log, log[-3000:]
    report(
        "README blocks",
        [f"run     line {b.line:4d}  {b.section}" for b in ran.run]
        + [f"not run line {b.line:4d}  {b.section}: {b.skip_reason}" for b in ran.skipped],
    )

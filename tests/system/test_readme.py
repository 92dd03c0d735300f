"""The README and the operations guide it links to, executed: every `sh` block a reader would
run, run with bash against a live stack.

The stack is what `make run` starts (`python -m broker.devserver` after `flask db upgrade`, the
Makefile's two commands) on ports from the OS, in a folder of its own that holds `instance/`,
the checkout's `wsgi.py` and `gunicorn.conf.py`, and a `photo.jpg` (the reader's photo). The
blocks run there with `.venv/bin` first on PATH (the README's `. .venv/bin/activate`), and
`localhost:5000` / `localhost:8788` in their text become the stack's ports. What the runner does
with blocks and `# →` answers: tests/readme.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from broker.emulator.testing import make_image
from tests.readme import DOCUMENTS, run_document
from tests.support.reader import free_port, reader_env
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
    "Agreement with Cloudflare",  # the operations guide's
}


@dataclass
class Stack:
    """make run's stack, started for the README."""

    folder: Path
    env: dict[str, str]
    broker_port: int
    emulator_port: int


@contextlib.contextmanager
def _serving(stack: Stack, log: Path) -> Iterator[None]:
    """Run `python -m broker.devserver` (make run's last command) until the block ends."""
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "broker.devserver"],
            cwd=stack.folder,
            # As the README says to try webhooks with a receiver on this machine.
            env={**stack.env, "BROKER_WEBHOOK_ALLOW_PRIVATE": "true"},
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
        yield
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)


@pytest.fixture
def prepared(tmp_path: Path) -> Stack:
    """A folder for make run's stack, its database migrated (make run's first command)."""
    folder = tmp_path / "checkout"
    (folder / "instance").mkdir(parents=True)
    for name in ("wsgi.py", "gunicorn.conf.py"):
        (folder / name).symlink_to(ROOT / name)
    (folder / "photo.jpg").write_bytes(make_image(120, 80, "JPEG"))
    broker_port, emulator_port = free_port(), free_port()
    env = reader_env()  # a reader's shell: none of this test run's own settings
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
    return Stack(folder, env, broker_port, emulator_port)


@pytest.fixture
def stack(prepared: Stack) -> Iterator[Stack]:
    """Start the development stack as make run does; stop it (and only it) afterwards."""
    with _serving(prepared, prepared.folder / "make-run.log"):
        yield prepared


@pytest.mark.timeout(600)
def test_the_readme_runs_against_make_runs_stack(stack: Stack, report) -> None:
    """Every unmarked `sh` block of the README and the guide runs and prints what the text
    shows; the reader's flows all run (none is marked away)."""
    ran_sections: set[str] = set()
    lines: list[str] = []
    for document in DOCUMENTS:
        ran = run_document(
            (ROOT / document).read_text(),
            cwd=stack.folder,
            env=stack.env,
            replace={
                "localhost:5000": f"127.0.0.1:{stack.broker_port}",
                "localhost:8788": f"127.0.0.1:{stack.emulator_port}",
            },
            document=document,
        )
        ran_sections |= {b.section for b in ran.run}
        lines += [f"run     {document}:{b.line}  {b.section}" for b in ran.run]
        lines += [f"not run {document}:{b.line}  {b.section}: {b.skip_reason}" for b in ran.skipped]
    assert not FLOWS - ran_sections, ran_sections
    log = (stack.folder / "make-run.log").read_text()
    assert "Traceback" not in log and "batch token refused" not in log, log[-3000:]
    report("README and guide blocks", lines)


@pytest.mark.timeout(300)
def test_a_second_make_run_keeps_the_batch_api(prepared: Stack) -> None:
    """Stopped and started again on the same instance folder, make run creates through the
    batch host at once: no refused batch token, no fall-back to the global API."""
    base = f"http://127.0.0.1:{prepared.broker_port}"

    def create() -> None:
        password = (prepared.folder / "instance" / "demo-password").read_text().strip()
        with requests.Session() as http:
            token = http.post(
                f"{base}/api/v1/auth/tokens",
                json={"username": "demo", "password": password, "device_name": "restart"},
                timeout=10,
            )
            assert token.status_code == 201, token.text
            auth = {"Authorization": f"Bearer {token.json()['token']}"}
            created = http.post(f"{base}/api/v1/uploads", json={}, headers=auth, timeout=30)
            assert created.status_code == 201, created.text

    logs = [prepared.folder / "first-run.log", prepared.folder / "second-run.log"]
    for log in logs:
        with _serving(prepared, log):
            create()  # the first run fetches a batch token and keeps it in the database
    first, second = (log.read_text() for log in logs)
    assert "batch API: new token" in first, first[-2000:]
    assert "batch API: new token" in second, second[-2000:]
    for unwanted in ("batch token refused", "goes to the global API", "using the global API"):
        assert unwanted not in second, second[-2000:]

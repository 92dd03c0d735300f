"""`make run` as a reader runs it: a fresh checkout, the command in a shell, the printed login used.

The checkout is a copy of every file git would clone (tracked, plus new files it does not
ignore), with no `.venv` and no `instance/`, so `make run` installs, migrates and starts from
nothing. The banner's demo login then uploads one file through the JSON API and one through the
page in Chromium; both must become ready.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from broker.emulator.testing import make_image
from tests.support.reader import free_port, reader_env

ROOT = Path(__file__).resolve().parent.parent.parent
# A fresh install downloads or unpacks every dependency: generous, and only a bound.
START_DEADLINE = 420.0


def _fresh_checkout(into: Path) -> Path:
    """Copy what a clone of this checkout would hold (committed or not) into `into`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        rel = raw.decode()
        source = ROOT / rel
        if not source.is_file():  # deleted in the working tree
            continue
        target = into / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return into


@dataclass
class Running:
    """`make run` started in its own process group; its output is read as it comes."""

    process: subprocess.Popen[str]
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def start_reading(self) -> None:
        self.reader = threading.Thread(target=self.read, name="make-run-output", daemon=True)
        self.reader.start()

    def read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pattern: str, deadline: float) -> re.Match[str]:
        """Return the first output line matching `pattern`, or fail with what was printed."""
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                pytest.fail("make run printed no banner in time:\n" + "\n".join(self.seen[-40:]))
            if line is None:
                pytest.fail(
                    f"make run exited ({self.process.wait()}):\n" + "\n".join(self.seen[-40:])
                )
            self.seen.append(line)
            found = re.search(pattern, line)
            if found:
                return found

    def stop(self) -> None:
        """End make and everything it started (they share its process group)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        if self.reader is not None:
            self.reader.join(timeout=30)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[tuple[Running, int]]:
    """Start `make run` in a fresh checkout on ports from the OS; yield it and the broker port."""
    if not shutil.which("make"):
        pytest.skip("needs make")
    checkout = _fresh_checkout(tmp_path / "checkout")
    broker_port, emulator_port = free_port(), free_port()
    env = reader_env()  # a reader's shell: none of this test run's own settings
    env.update(BROKER_PORT=str(broker_port), EMULATOR_PORT=str(emulator_port))
    process = subprocess.Popen(
        ["make", "run"],
        cwd=checkout,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    running = Running(process)
    running.start_reading()
    try:
        yield running, broker_port
    finally:
        running.stop()


@pytest.mark.timeout(START_DEADLINE + 180)
def test_make_run_from_a_fresh_checkout_serves_the_demo_login_through_api_and_page(
    make_run: tuple[Running, int], request: pytest.FixtureRequest
) -> None:
    """The quick start's first command, as a new user types it: install, migrate, start, and the
    printed login uploads through the JSON API and through the page, both files ready."""
    running, port = make_run
    deadline = time.monotonic() + START_DEADLINE
    login = running.wait_for(r"Demo login: username (\S+), password (\S+)", deadline)
    running.wait_for(r"Press Ctrl-C to stop", deadline)
    username, password = login.group(1), login.group(2).rstrip(",")
    base = f"http://127.0.0.1:{port}"
    assert requests.get(f"{base}/livez", timeout=10).status_code == 200

    # The JSON API, as the README's mobile flow does it.
    token = requests.post(
        f"{base}/api/v1/auth/tokens",
        json={"username": username, "password": password, "device_name": "make-run test"},
        timeout=10,
    )
    assert token.status_code == 201, token.text
    auth = {"Authorization": f"Bearer {token.json()['token']}"}
    created = requests.post(f"{base}/api/v1/uploads", json={}, headers=auth, timeout=10)
    assert created.status_code == 201, created.text
    upload = created.json()
    sent = requests.post(
        upload["upload_url"],
        files={"file": ("api.png", make_image(64, 48, "PNG"), "image/png")},
        timeout=30,
    )
    assert sent.status_code == 200, sent.text
    done = requests.post(f"{base}/api/v1/uploads/{upload['id']}/complete", headers=auth, timeout=30)
    assert done.status_code == 200 and done.json()["status"] == "ready", done.text

    # The page, in Chromium, with the same login: the run's one browser (launched only now, not
    # while `make run` installs and starts).
    from playwright.sync_api import expect

    page = request.getfixturevalue("browser").new_page()
    try:
        page.set_default_timeout(30_000)
        page.goto(f"{base}/auth/login")
        page.get_by_label("Username").fill(username)
        page.get_by_label("Password", exact=True).fill(password)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(f"{base}/upload")
        page.locator("input[type=file]").first.set_input_files(
            [{"name": "page.jpg", "mimeType": "image/jpeg", "buffer": make_image(80, 60, "JPEG")}]
        )
        row = page.locator("li.queue-item", has=page.locator(".name", has_text="page.jpg"))
        expect(row).to_have_attribute("data-state", "ready")
    finally:
        page.context.close()

    listed = requests.get(f"{base}/api/v1/uploads", headers=auth, timeout=10)
    assert listed.status_code == 200
    names = {u.get("filename"): u["status"] for u in listed.json()["items"]}
    assert names == {"api.png": "ready", "page.jpg": "ready"}, names

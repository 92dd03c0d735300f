"""The production topology on loopback: real processes started with compose.yaml's commands.

Every service runs the `command:` compose.yaml gives it (read from the file, so the two cannot
drift apart); only addresses, data folders and settings differ, given through the environment
or flags appended after the command's own (the last value of a flag wins). Servers bind port 0
or a socket this process bound on port 0 and hands over (`gunicorn --bind fd://N`), so nothing
depends on a fixed port. Every process writes its own log file, read by the assertions.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml
from werkzeug.serving import BaseWSGIServer, make_server

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def compose_commands() -> dict[str, list[str]]:
    """Return each compose.yaml service's `command:` (services without one are left out)."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    return {name: list(svc["command"]) for name, svc in services.items() if "command" in svc}


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` s.

    Real processes take real time: this waits on them (never on a fixed sleep) and gives up.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        pause.wait(interval)


@dataclass
class Process:
    """One started service process and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    group: bool = False  # started in its own process group (killed as a whole)
    killed: bool = False

    @property
    def pid(self) -> int:
        """Return the process id."""
        return self.popen.pid

    def output(self) -> str:
        """Return everything the process logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        """Tell whether the process still runs."""
        return self.popen.poll() is None

    def kill9(self) -> None:
        """SIGKILL the process (and its children, when it leads a group): no chance to clean up."""
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            if self.group:
                os.killpg(self.popen.pid, signal.SIGKILL)
            else:
                self.popen.kill()
        self.popen.wait(10)

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, wait up to `timeout` s; return the exit code (None: had to be killed)."""
        if not self.alive():
            return self.popen.returncode
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            return None


@dataclass
class Topology:
    """Starts processes, remembers them, and stops every one of them at the end."""

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    _counts: dict[str, int] = field(default_factory=dict)

    def start(
        self,
        name: str,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
        group: bool = False,
    ) -> Process:
        """Start `args` (a compose command plus extra flags) with the topology's environment."""
        number = self._counts[name] = self._counts.get(name, 0) + 1
        log = self.workdir / f"{name}-{number}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                args,
                cwd=ROOT,
                env={**self.env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=pass_fds,
                start_new_session=group,
            )
        process = Process(f"{name}-{number}", popen, log, group=group)
        self.processes.append(process)
        return process

    def start_redis(self, command: list[str]) -> str:
        """Start compose's redis command on a unix socket in the work folder; return its URI."""
        sock = self.workdir / "redis.sock"
        self.start(
            "redis",
            [
                *command,
                "--port",
                "0",
                "--unixsocket",
                str(sock),
                "--unixsocketperm",
                "700",
                "--dir",
                str(self.workdir),
            ],
        )
        return f"redis+unix://{sock}"

    def start_emulator(
        self, command: list[str], data_dir: Path, env: dict[str, str] | None = None
    ) -> tuple[Process, str]:
        """Start compose's emulator command on a free loopback port; return it and its URL,
        once it answers."""
        emulator = self.start(
            "emulator",
            [
                *command,
                *("--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir)),
                "--control",  # faults and counters, on loopback (compose's command has none)
            ],
            env=env,
        )
        port = port_from_log(emulator, r"Running on http://127\.0\.0\.1:(\d+)")
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/_emulator/counters", process=emulator)
        return emulator, url

    def start_web(
        self, command: list[str], sock: socket.socket, env: dict[str, str] | None = None
    ) -> Process:
        """Start compose's web command (gunicorn) serving on `sock` (kept by the caller)."""
        fd = sock.fileno()
        return self.start(
            "web",
            command,
            env={**(env or {}), "GUNICORN_CMD_ARGS": f"--bind fd://{fd}"},
            pass_fds=(fd,),
            group=True,
        )

    def run(self, args: list[str], *, stdin: str = "", timeout: float = 180) -> str:
        """Run a one-shot command (setup, the operator CLI) to completion; return its stdout."""
        done = subprocess.run(
            args,
            cwd=ROOT,
            env=self.env,
            input=stdin.encode(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        out, err = done.stdout.decode(), done.stderr.decode()
        assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{out}{err}"
        return out

    def stop_all(self) -> None:
        """Stop whatever still runs (SIGTERM, then SIGKILL), so no process outlives the test."""
        for process in reversed(self.processes):
            if process.alive():
                process.stop(10)
            if process.group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)


def stop_gracefully(processes: list[Process], timeout: float) -> dict[str, int | None]:
    """SIGTERM them all at once (as an orchestrator stops a service), then collect each exit
    code; None for one that had to be killed after `timeout` seconds."""
    for process in processes:
        if process.alive():
            process.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    codes: dict[str, int | None] = {}
    for process in processes:
        try:
            codes[process.name] = process.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill9()
            codes[process.name] = None
    return codes


def broker_env(emulator_url: str) -> dict[str, str]:
    """The broker's settings that point it at the emulator as its Cloudflare account."""
    return {
        "BROKER_CLOUDFLARE_API_BASE": f"{emulator_url}/client/v4",
        "BROKER_CLOUDFLARE_ACCOUNT_ID": "emulator-account",
        "BROKER_CLOUDFLARE_API_TOKEN": "emulator-token",
        "BROKER_CLOUDFLARE_ACCOUNT_HASH": "emuhash000000000000000",
        "BROKER_CLOUDFLARE_DELIVERY_BASE": emulator_url,
        "BROKER_CLOUDFLARE_UPLOAD_ORIGIN": emulator_url,
    }


def listening_socket() -> socket.socket:
    """Bind a loopback socket on a port the OS picks, ready to hand to a server process."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def port_from_log(process: Process, pattern: str, timeout: float = 30) -> int:
    """Wait until the process logs the port it listens on (`pattern` has one group)."""

    def found() -> int | None:
        if not process.alive():
            raise AssertionError(f"{process.name} exited:\n{process.output()[-3000:]}")
        match = re.search(pattern, process.output())
        return int(match.group(1)) if match else None

    return int(wait_for(found, timeout, f"{process.name} to listen"))


def wait_http(url: str, timeout: float = 60, process: Process | None = None) -> None:
    """Wait until `url` answers 200."""

    def ok() -> bool:
        if process is not None and not process.alive():
            raise AssertionError(f"{process.name} exited:\n{process.output()[-3000:]}")
        try:
            return requests.get(url, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_for(ok, timeout, url)


class Receiver:
    """The app backend's webhook endpoint: a threaded server on loopback that verifies every
    delivery with the `standardwebhooks` library and can be taken down, made to answer 503, or
    made to hold requests (so a worker is caught in the middle of a delivery)."""

    def __init__(self) -> None:
        from standardwebhooks.webhooks import Webhook

        self._webhook: Webhook | None = None
        self.secret = ""
        self.lock = threading.Lock()
        self.received: list[dict[str, Any]] = []
        self.unavailable = False  # answer 503 + Retry-After (a deploy on the receiving side)
        self.hold = threading.Event()  # while set, requests wait for `released`
        self.released = threading.Event()
        self.holding = threading.Event()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Return the endpoint URL."""
        return f"http://127.0.0.1:{self.port}/hooks/images"

    def set_secret(self, secret: str) -> None:
        """Verify deliveries against the endpoint's `whsec_…` secret."""
        from standardwebhooks.webhooks import Webhook

        self.secret = secret
        self._webhook = Webhook(secret)

    def app(self, environ: dict[str, Any], start_response: Any) -> Any:
        """Verify and record one delivery; answer as the test scripted."""
        from standardwebhooks.webhooks import WebhookVerificationError
        from werkzeug.wrappers import Request, Response

        request = Request(environ)
        body = request.get_data()
        headers = {k.lower(): v for k, v in request.headers.items()}
        record: dict[str, Any] = {"id": headers.get("webhook-id", ""), "verified": False}
        try:
            assert self._webhook is not None
            payload = self._webhook.verify(body, headers)
            record.update(
                verified=True, type=payload["type"], upload=payload["data"]["upload"]["id"]
            )
        except (WebhookVerificationError, AssertionError, KeyError, TypeError) as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
        if self.unavailable:
            record["answer"] = 503
            with self.lock:
                self.received.append(record)
            return Response(b"maintenance", 503, {"Retry-After": "3"})(environ, start_response)
        if self.hold.is_set():
            record["held"] = True
            self.holding.set()
            self.released.wait(30)
        record["answer"] = 204
        with self.lock:
            self.received.append(record)
        return Response(b"", 204)(environ, start_response)

    def start(self) -> None:
        """Serve (again) on the same port."""
        self._server = make_server("127.0.0.1", self.port, self.app, threaded=True)
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening: deliveries now meet a refused connection."""
        if self._server is not None:
            self.released.set()
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(10)
            self._server = None

    def records(self) -> list[dict[str, Any]]:
        """Return a copy of everything received so far."""
        with self.lock:
            return list(self.received)


class Front:
    """What a load balancer does for the clients: spread requests over the web instances and
    leave out, for a few seconds, one that did not answer (a passive health check)."""

    DOWN_FOR = 5.0

    def __init__(self, bases: list[str]) -> None:
        self.bases = bases
        self._next = 0
        self._down_until = dict.fromkeys(bases, 0.0)
        self._lock = threading.Lock()
        self.failovers = 0

    def request(self, session: requests.Session, method: str, path: str, **kw: Any) -> Any:
        """Send to the next live instance; on a connection failure, to the others in turn."""
        with self._lock:
            start = self._next
            self._next += 1
            now = time.monotonic()
            order = [self.bases[(start + i) % len(self.bases)] for i in range(len(self.bases))]
            order.sort(key=lambda base: self._down_until[base] > now)  # live ones first
        last: Exception | None = None
        for base in order:
            try:
                return session.request(method, base + path, timeout=30, **kw)
            except requests.ConnectionError as exc:
                last = exc
                with self._lock:
                    self.failovers += 1
                    self._down_until[base] = time.monotonic() + self.DOWN_FOR
        assert last is not None
        raise last


@contextlib.contextmanager
def topology(workdir: Path, env: dict[str, str]) -> Iterator[Topology]:
    """A Topology that stops all its processes on the way out."""
    topo = Topology(workdir, env)
    try:
        yield topo
    finally:
        topo.stop_all()

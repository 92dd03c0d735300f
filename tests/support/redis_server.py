"""A redis-server of a test's own, on a unix socket (no TCP port at all), that the test can stop
and start again (a Redis outage): `with redis_server(tmp_path) as redis: … redis.uri …`."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import require


class RedisServer:
    """One redis-server process on `folder/redis.sock`, started and stopped on demand."""

    def __init__(self, folder: Path) -> None:
        self.sock = folder / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """The URL Flask-Limiter and the broker take (`BROKER_RATELIMIT_STORAGE_URI`)."""
        return f"redis+unix://{self.sock}"

    def start(self) -> None:
        """Start the server and wait until it answers a ping (up within milliseconds)."""
        import redis

        command = ["redis-server", "--port", "0", "--unixsocket", str(self.sock)]
        self.proc = subprocess.Popen(
            [*command, "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with redis.Redis(unix_socket_path=str(self.sock)) as client:
            for _ in range(400):  # give up after ~10 s
                if self.sock.exists():
                    try:
                        client.ping()
                        return
                    except redis.exceptions.ConnectionError:
                        pass
                try:
                    self.proc.wait(timeout=0.025)
                    pytest.fail(f"redis-server exited with {self.proc.returncode}")
                except subprocess.TimeoutExpired:
                    continue
            client.ping()

    def stop(self) -> None:
        """Stop the server (its socket goes with it): every call to it now fails."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@contextmanager
def redis_server(folder: Path) -> Iterator[RedisServer]:
    """Run a redis-server in `folder` for the block; stop it after."""
    require(shutil.which("redis-server") is not None, "needs redis-server (Debian: redis-server)")
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()

"""Dependencies that fail under traffic: gunicorn (compose.yaml's web command) serving creates and
reads while its PostgreSQL restarts and its Redis stops; every answer is counted and none may be
a 500 (a 503 with `Retry-After` is allowed while a dependency is away).

PostgreSQL is one of this test's own (initdb + pg_ctl into a scratch folder, as the `postgres`
user when run as root), so restarting it disturbs no other suite; the test is skipped where the
server binaries are not installed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from cryptography.fernet import Fernet

from tests.conftest import require
from tests.system.topology import (
    BIN,
    broker_env,
    compose_commands,
    listening_socket,
    topology,
    wait_for,
    wait_http,
)

FLASK = ["flask", "--app", "broker"]
CLIENTS = 3
# Answers each phase waits for before the next fault: enough to see the broker serve again.
PER_PHASE = 24


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    """A PostgreSQL server of this test's own on a loopback port."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.data = Path(tempfile.mkdtemp(prefix="broker-outages-pg-"))
        with listening_socket() as probe:  # a free port (closed again for the server)
            self.port = probe.getsockname()[1]
        # The server refuses to run as root: then it runs as the `postgres` user.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            user = pwd.getpwnam("postgres")
            os.chown(self.data, user.pw_uid, user.pw_gid)

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the broker's database."""
        return f"postgresql+psycopg://broker@127.0.0.1:{self.port}/broker"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=120)

    def _ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.data / "server.log")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data / "db"), "-o", options,
                  "-l", log, "-w", "-t", "60", *args)  # fmt: skip

    def start(self) -> None:
        """Create the cluster and the `broker` database, and start the server."""
        self._run(str(self.bindir / "initdb"), "-D", str(self.data / "db"), "-A", "trust",
                  "-U", "broker", "--no-sync")  # fmt: skip
        self._ctl("start")
        admin = sa.create_engine(f"postgresql+psycopg://broker@127.0.0.1:{self.port}/postgres")
        try:
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(sa.text("CREATE DATABASE broker"))
        finally:
            admin.dispose()

    def restart(self) -> None:
        """Restart the server (fast: open connections are dropped)."""
        self._ctl("-m", "fast", "restart")

    def stop(self) -> None:
        """Stop the server and remove its data."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self._ctl("-m", "immediate", "stop")
        shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server to restart at will."""
    bindir = _pg_bin()
    if bindir is None or (os.geteuid() == 0 and shutil.which("runuser") is None):
        pytest.skip("needs PostgreSQL's server binaries (Debian: postgresql)")
    server = PrivatePostgres(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


class Traffic:
    """Clients creating uploads and reading their account until told to stop; every answer
    is counted by (phase, status)."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}"}
        self.phase = "before"
        self.answers: Counter[tuple[str, int]] = Counter()
        self.bad: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(n,)) for n in range(CLIENTS)]

    def _client(self, n: int) -> None:
        with requests.Session() as session:
            turn = 0
            while not self.stop.is_set():
                turn += 1
                try:
                    if turn % 2:
                        answer = session.post(
                            f"{self.base}/api/v1/uploads", json={}, headers=self.headers, timeout=30
                        )
                    else:
                        answer = session.get(
                            f"{self.base}/api/v1/me", headers=self.headers, timeout=30
                        )
                except requests.RequestException as exc:  # the web tier itself must not fail
                    with self.lock:
                        self.bad.append(f"no answer: {exc}")
                    return
                status = answer.status_code
                with self.lock:
                    self.answers[(self.phase, status)] += 1
                    unexplained = status == 503 and "Retry-After" not in answer.headers
                    if (status >= 500 and status != 503) or unexplained:
                        self.bad.append(f"{status} {answer.text[:300]}")

    def served(self, phase: str) -> int:
        """How many answers of `phase` were a success."""
        with self.lock:
            return sum(n for (p, status), n in self.answers.items() if p == phase and status < 300)

    def enter(self, phase: str) -> None:
        """Count the next answers under `phase`."""
        with self.lock:
            self.phase = phase


def test_no_500_while_postgres_restarts_and_redis_stops(
    postgres: PrivatePostgres, tmp_path: Path, report
) -> None:
    require(shutil.which("redis-server") is not None, "needs redis-server (Debian: redis-server)")
    commands = compose_commands()
    sock = listening_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "EMULATOR_"))},
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }
    with topology(tmp_path, env) as topo:
        redis = topo.start_redis(commands["redis"])
        _, emu_url = topo.start_emulator(commands["emulator"], tmp_path / "emulator")
        topo.env.update(
            {
                "BROKER_ENV": "testing",
                "BROKER_SECRET_KEY": secrets.token_urlsafe(32),
                "BROKER_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
                "BROKER_DATABASE_URL": postgres.url,
                "BROKER_INSTANCE_PATH": str(tmp_path / "instance"),
                "BROKER_RATELIMIT_STORAGE_URI": redis,
                **broker_env(emu_url),
                "BROKER_CLOUDFLARE_BATCH": "auto",
                "BROKER_MAX_PENDING_UPLOADS": "1000",
                "BROKER_MAX_UPLOADS_PER_DAY": "1000",
                "WEB_CONCURRENCY": "1",
            }
        )
        topo.run(commands["setup"], timeout=180)
        topo.run([*FLASK, "users", "create", "ana", "--password-stdin"], stdin="a long password\n")
        token = topo.run([*FLASK, "tokens", "create", "ana"]).splitlines()[0]
        web = topo.start_web(commands["web"], sock)
        wait_http(f"{base}/readyz", process=web)
        sock.close()

        traffic = Traffic(base, token)
        for thread in traffic.threads:
            thread.start()
        try:
            wait_for(lambda: traffic.served("before") >= PER_PHASE, 120, "traffic")
            traffic.enter("postgres restarted")
            postgres.restart()
            wait_for(lambda: traffic.served("postgres restarted") >= PER_PHASE, 120, "served")
            traffic.enter("redis stopped")
            [redis_process] = [p for p in topo.processes if p.name.startswith("redis")]
            redis_process.stop(10)
            wait_for(lambda: traffic.served("redis stopped") >= PER_PHASE, 120, "served")
        finally:
            traffic.stop.set()
            for thread in traffic.threads:
                thread.join(60)
        log = web.output()

    report(
        "outages",
        [f"{phase}: {status} x {n}" for (phase, status), n in sorted(traffic.answers.items())],
    )
    assert traffic.bad == []
    statuses = {status for _, status in traffic.answers}
    assert statuses <= {200, 201, 503}, traffic.answers
    assert "Traceback" not in log

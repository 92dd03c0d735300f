"""Behind PgBouncer in transaction mode (broker/OPERATIONS.md, "Database connections"): a real
pgbouncer process (Debian's, before 1.21: it does not carry protocol-level prepared statements)
in front of the test PostgreSQL, made to lose them every time: `server_reset_query = DISCARD
ALL` run after every transaction (`server_reset_query_always`), so the create step's prepared
statements (`broker.api.round_trips`) are gone by the next transaction, whichever server
session it lands on.

Runs in the PostgreSQL pass (it asks for `database_url`); needs pgbouncer (Debian package
pgbouncer, installed by .ci/run): skipped without it, failed in CI.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from flask import Flask

from broker.api.round_trips import commit_in_one_round_trip
from broker.platform.db import db, server_pool_options
from tests import factories
from tests.api.test_round_trips import _count, _insert_returning, _probe, _trace
from tests.api.test_round_trips import engine as _probe_engine
from tests.conftest import require

# The round trips' tests' fixture: their probe table made and dropped straight on the server,
# and the engine to read it there (not through the pooler).
engine = _probe_engine

# Debian puts it in /usr/sbin, not on a non-root user's PATH.
_DEBIAN_BINARY = "/usr/sbin/pgbouncer"

_NOT_KEPT = "do not keep prepared statements"


def _binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found is None and os.access(_DEBIAN_BINARY, os.X_OK):
        found = _DEBIAN_BINARY
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _accepts(url: str) -> bool:
    """Whether a connection through `url` runs a query (not only whether the port is open:
    pgbouncer must also reach the server)."""
    import psycopg

    try:
        with psycopg.connect(
            sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False),
            connect_timeout=2,
        ) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def _start(binary: str, folder: Path, server: sa.URL) -> tuple[subprocess.Popen[bytes], str]:
    """Start pgbouncer in front of `server`'s database on a free loopback port; return the
    process and the SQLAlchemy URL through it, once it answers a query. Started again on
    another port should the one found free be taken before it binds it."""
    users = folder / "users.txt"
    # With trust, its clients give no password; it logs in to the server with this one.
    users.write_text(f'"{server.username}" "{server.password or ""}"\n')
    for _ in range(3):
        port = _free_port()
        config = folder / "pgbouncer.ini"
        config.write_text(
            f"""[databases]
{server.database} = host={server.host} port={server.port or 5432} dbname={server.database}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {users}
pool_mode = transaction
; Every transaction starts on a reset session: what a client prepared is gone by its next one.
server_reset_query = DISCARD ALL
server_reset_query_always = 1
default_pool_size = 2
max_client_conn = 200
"""
        )
        # It refuses to run as root: then it drops to `nobody` once it has read its files.
        as_user = ["-u", "nobody"] if os.geteuid() == 0 else []
        with (folder / "pgbouncer.log").open("wb") as log:
            process = subprocess.Popen([binary, *as_user, str(config)], stdout=log, stderr=log)
        url = server.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
        deadline = time.monotonic() + 15
        pause = threading.Event()
        while process.poll() is None and time.monotonic() < deadline:
            if _accepts(url):
                return process, url
            pause.wait(0.05)  # the next poll of a connect
        _stop(process)
        if "already in use" not in (folder / "pgbouncer.log").read_text():
            break
    raise AssertionError(f"pgbouncer did not start:\n{(folder / 'pgbouncer.log').read_text()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()  # its PID: SIGTERM, a fast exit
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture
def pgbouncer(database_url: str, tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """`pgbouncer(url)`: `url`'s database through a pgbouncer of this test's own (transaction
    mode, every server session reset after each transaction); each stopped by its PID at the
    end of the test."""
    if not database_url.startswith("postgresql"):
        pytest.skip("PgBouncer in front of PostgreSQL: runs in the PostgreSQL pass")
    binary = _binary()
    require(binary is not None, "needs pgbouncer (Debian package pgbouncer)")
    assert binary
    started: list[subprocess.Popen[bytes]] = []

    def start(url: str) -> str:
        folder = tmp_path / f"pgbouncer{len(started)}"
        folder.mkdir()
        process, through = _start(binary, folder, sa.make_url(url))
        started.append(process)
        return through

    try:
        yield start
    finally:
        for process in started:
            _stop(process)


@pytest.fixture
def bouncer_url(pgbouncer: Callable[[str], str], database_url: str) -> str:
    """The test database's URL through a pgbouncer of this test's own."""
    return pgbouncer(database_url)


def _not_kept(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "broker.api" and _NOT_KEPT in r.getMessage()]


def _ids(direct: sa.Engine) -> list[int]:
    with direct.connect() as conn:
        return list(conn.scalars(sa.select(_probe.c.id).order_by(_probe.c.id)))


def test_steps_through_a_pooler_that_loses_prepared_statements_commit_once_each(
    bouncer_url: str, engine: sa.Engine, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Several steps on one connection through pgbouncer: the first meets its statements gone
    (refused, prepared again, refused again), then says once that this connection does not
    keep prepared statements and sends its statements as SQL; every step commits exactly once
    with its rows, and the later ones, and the first of another connection of the engine, go
    as one simple-query message, one wait, no error."""
    caplog.set_level(logging.WARNING, logger="broker.api")
    bounced = sa.create_engine(bouncer_url)
    try:
        with bounced.connect() as conn:
            wires = []
            for step in range(5):
                pgconn = _trace(conn, tmp_path / f"wire{step}")
                rows = commit_in_one_round_trip(
                    conn,
                    [
                        (_insert_returning, {"id": 2 * step, "at": None}),
                        (_insert_returning, {"id": 2 * step + 1, "at": None}),
                        (_count, {}),
                    ],
                )
                pgconn.untrace()
                wires.append((tmp_path / f"wire{step}").read_text())
                assert rows == [[(2 * step, None)], [(2 * step + 1, None)], [(2 * step + 2,)]]
                assert not conn.in_transaction()
                assert _ids(engine) == list(range(2 * step + 2))  # committed, once
                assert len(_not_kept(caplog)) == 1
            # Another connection of the engine sends its first step as SQL at once.
            with bounced.connect() as other:
                pgconn = _trace(other, tmp_path / "other")
                rows = commit_in_one_round_trip(other, [(_count, {})])
                pgconn.untrace()
                assert rows == [[(10,)]]
            wires.append((tmp_path / "other").read_text())
    finally:
        bounced.dispose()
    first = wires[0]
    # Prepared, refused (26000), prepared again behind a ROLLBACK, refused again, rolled back,
    # sent as SQL: six waits.
    assert first.count("26000") == 2 and first.count("\tReadyForQuery") == 6
    for wire in wires[1:]:
        assert wire.count("\tQuery\t") == 1 and wire.count("\tReadyForQuery") == 1
        assert "Parse" not in wire and "ErrorResponse" not in wire
        assert '"BEGIN;' in wire and "COMMIT" in wire


def test_the_brokers_engine_through_a_pooler_reads_and_creates_in_turn(
    bouncer_url: str, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """With the broker's engine options (psycopg's own prepared statements off), read-only
    transactions between the steps, committed or rolled back, the same query run in them past
    psycopg's threshold for preparing it (five runs), break nothing: each step commits once,
    each read sees what was committed, the warning comes once. (With psycopg's threshold on,
    its statement prepared in one transaction is sought in the next on a reset session.)"""
    caplog.set_level(logging.WARNING, logger="broker.api")
    bounced = sa.create_engine(bouncer_url, **server_pool_options())
    try:
        for step in range(4):
            with bounced.connect() as conn:  # the pool's one connection, again and again
                for end in (conn.commit, conn.commit, conn.rollback):
                    for _ in range(3):
                        assert conn.scalar(_count) == step
                    end()
                rows = commit_in_one_round_trip(
                    conn, [(_insert_returning, {"id": step, "at": None}), (_count, {})]
                )
                assert rows == [[(step, None)], [(step + 1,)]]
            assert _ids(engine) == list(range(step + 1))
    finally:
        bounced.dispose()
    assert len(_not_kept(caplog)) == 1


USERS = 4
CREATES = 6


def test_users_create_and_read_uploads_concurrently_through_a_pooler(
    bouncer_url: str,
    make_app: Callable[..., Flask],
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker's database URL through pgbouncer (the schema migrated straight on the
    server): several users creating uploads at once over real HTTP, each create followed by a
    read of it, another client listing in between; every answer 201 or 200, and the rows
    counted on the server afterwards are exactly the ones created; the engine said once that
    its connections send their statements as SQL, and nothing else was logged as going
    wrong. (`bouncer_url` before
    `make_app`: the pooler outlives the app's teardown, which empties the tables through it.)"""
    caplog.set_level(logging.WARNING, logger="broker")
    app = make_app(DATABASE_URL=bouncer_url, DB_POOL_SIZE=2, DB_MAX_OVERFLOW=2)
    tokens = [
        factories.issue_token(app, factories.create_user(app, f"bouncer{n}")) for n in range(USERS)
    ]
    answers: Counter[tuple[str, int]] = Counter()
    created: list[tuple[int, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(USERS + 1)

    def count(what: str, response: requests.Response) -> Any:
        with lock:
            answers[(what, response.status_code)] += 1
        return response.json()

    def user(n: int, base: str) -> None:
        with requests.Session() as session:
            session.headers.update(tokens[n])
            start.wait(30)
            for _ in range(CREATES):
                upload = count(
                    "create", session.post(f"{base}/api/v1/uploads", json={}, timeout=30)
                )
                if "id" not in upload:
                    continue
                with lock:
                    created.append((n, upload["id"]))
                shown = count(
                    "read", session.get(f"{base}/api/v1/uploads/{upload['id']}", timeout=30)
                )
                assert shown.get("id") == upload["id"], shown

    def reader(base: str) -> None:
        with requests.Session() as session:
            session.headers.update(tokens[0])
            start.wait(30)
            for _ in range(CREATES * 2):
                count("list", session.get(f"{base}/api/v1/uploads", timeout=30))

    with factories.live_server(app) as base, ThreadPoolExecutor(USERS + 1) as pool:
        futures = [pool.submit(user, n, base) for n in range(USERS)]
        futures.append(pool.submit(reader, base))
        for future in futures:
            future.result(timeout=120)

    assert answers == {
        ("create", 201): USERS * CREATES,
        ("read", 200): USERS * CREATES,
        ("list", 200): CREATES * 2,
    }
    direct = sa.create_engine(database_url)
    try:
        with direct.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT u.username, count(*), count(DISTINCT x.id) FROM uploads x"
                    " JOIN users u ON u.id = x.user_id GROUP BY u.username ORDER BY 1"
                )
            ).all()
            ids = set(conn.scalars(sa.text("SELECT id FROM uploads")))
    finally:
        direct.dispose()
    assert rows == [(f"bouncer{n}", CREATES, CREATES) for n in range(USERS)]
    assert ids == {upload_id for _, upload_id in created}
    # Once for the app's engine, however many of its connections found it (the overflow's are
    # closed when given back and new ones opened), and only then: each new connection of the
    # engine sends its statements as SQL from its first create on.
    assert len(_not_kept(caplog)) == 1
    others = [r.getMessage() for r in caplog.records if r not in _not_kept(caplog)]
    assert others == []


def test_the_token_caches_version_reads_through_a_pooler(
    bouncer_url: str, migrated: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The token cache reads `auth_versions` on a connection of its own, once per request,
    each read a transaction of its own: through the pooler every read answers (none falls
    back to the request's session), on the one connection, and nothing is logged. (With
    psycopg's own prepared statements on, its sixth read ran a statement prepared on a
    session since reset: a warning and a new connection every few requests.)"""
    from broker.auth.tokens import VersionStamp

    caplog.set_level(logging.WARNING, logger="broker")
    stamp = VersionStamp(sa.make_url(bouncer_url))
    try:
        versions = [stamp.read()]
        first = stamp._conn
        versions += [stamp.read() for _ in range(11)]
        assert versions == [0] * 12 and stamp.reads == 12
        assert first is not None and stamp._conn is first
    finally:
        stamp.close()
    assert [r.getMessage() for r in caplog.records] == []


def test_migrations_run_through_a_pooler(
    new_database: Callable[[str], str],
    pgbouncer: Callable[[str], str],
    migrated: str,
    tmp_path: Path,
) -> None:
    """`flask db upgrade` through pgbouncer in transaction mode (its lock an advisory lock of
    the transaction's, its settings SET LOCAL) builds an empty database up to the same head
    and tables as the one migrated straight on the server. (The suite's own schema is
    migrated straight on the server; `new_database` first: its database is dropped once the
    pooler stopped.)"""
    from flask_migrate import upgrade

    from broker import create_app
    from tests.conftest import base_config

    scratch = new_database(migrated)
    app = create_app(base_config(pgbouncer(scratch), str(tmp_path)))
    try:
        with app.app_context():
            upgrade()
            db.engine.dispose()
    finally:
        app.extensions["budget"].engine.dispose()
        app.extensions["tokens"].close()
    heads, tables = [], []
    for url in (scratch, migrated):
        direct = sa.create_engine(url)
        try:
            with direct.connect() as conn:
                heads.append(conn.scalar(sa.text("SELECT version_num FROM alembic_version")))
                tables.append(set(sa.inspect(conn).get_table_names()))
        finally:
            direct.dispose()
    assert heads[0] == heads[1] and heads[0]
    assert tables[0] == tables[1] and "uploads" in tables[0]

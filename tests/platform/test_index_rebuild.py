"""The upgrade that widens two indexes of uploads (revision c7a2e4f1d9b6) on PostgreSQL: reads
of uploads go on while it builds them, and it gives up on a lock it waits for too long (5 s, or
the connection's own shorter lock_timeout: 2 s here)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask_migrate import upgrade

from broker import create_app
from broker.platform.db import db
from tests.conftest import base_config
from tests.platform.test_migrations import FLASK, ROOT, flask_env
from tests.system.topology import wait_for

BEFORE, REBUILD = "b3f1d8e2c6a4", "c7a2e4f1d9b6"

# The locks this database's other backends hold or wait for on uploads.
LOCKS = sa.text(
    "SELECT l.mode, l.granted FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
    " WHERE c.relname = 'uploads' AND l.pid <> pg_backend_pid()"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


def _widened(engine: sa.Engine) -> dict[str, list[Any]]:
    """The columns of the two indexes the rebuild widens, and any index it left behind."""
    indexes = sa.inspect(engine).get_indexes("uploads")
    return {
        i["name"]: i["column_names"]
        for i in indexes
        if i["name"].startswith(("ix_uploads_user_created", "ix_uploads_user_profile_status"))
    }


def test_the_index_rebuild_lets_reads_go_on_and_gives_up_on_a_lock(
    postgres_url: str, new_database: Any, tmp_path: Path
) -> None:
    """With a reader's transaction open on uploads, the upgrade builds both indexes (the reader
    is not blocked), then waits for the exclusive lock of the swap only, gives up after the
    lock_timeout leaving the schema as it was, and succeeds once the reader is done."""
    url = new_database(postgres_url)
    with create_app(base_config(url, str(tmp_path))).app_context():
        upgrade(revision=BEFORE)
        db.engine.dispose()
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    before = _widened(engine)
    # A shorter wait than the migration's own 5 s, which it keeps: the polls below (every 0.2 s)
    # still see the swap waiting on a busy machine.
    env = {**flask_env(url, tmp_path), "PGOPTIONS": "-c lock_timeout=2s"}
    command = [FLASK, "--app", "broker", "db", "upgrade", REBUILD]
    reader = engine.connect()
    try:
        reader.execute(sa.text("SELECT count(*) FROM uploads"))  # holds ACCESS SHARE until done
        run = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        seen: set[tuple[str, bool]] = set()

        def swap_waiting() -> bool:
            with engine.connect() as conn:
                seen.update((mode, granted) for mode, granted in conn.execute(LOCKS))
            return ("AccessExclusiveLock", False) in seen or run.poll() is not None

        wait_for(swap_waiting, 60, "the upgrade to wait for the swap's exclusive lock")
        # Both builds ran beside the open read (SHARE is granted with it); only the swap waits.
        assert ("ShareLock", True) in seen and ("AccessExclusiveLock", False) in seen, seen
        output = run.communicate(timeout=60)[0].decode()
        assert run.returncode != 0 and "lock timeout" in output, output
        assert _widened(engine) == before  # rolled back: the old indexes, no build left over
    finally:
        reader.close()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _widened(engine) == {
        "ix_uploads_user_created": ["user_id", "created_at", "id", "profile"],
        "ix_uploads_user_profile_status": ["user_id", "profile", "status", "expires_at"],
    }
    engine.dispose()

"""The database: migrations build exactly the models' schema; failing statements hide their
parameters."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from flask import Flask
from flask_migrate import upgrade

from broker import create_app
from broker.platform.db import MIGRATIONS_DIR, SQLITE_CACHE_KIB, db
from broker.uploads.models import Upload
from tests.conftest import base_config


def _migrations_triggers(dialect: str) -> set[str]:
    """The triggers the revisions leave at head on `dialect`: a revision names the SQLite one it
    creates in `TRIGGER` (and one it drops for good in `DROPS_TRIGGER`), or those it creates
    per dialect in `TRIGGERS`."""
    modules = [rev.module for rev in ScriptDirectory(MIGRATIONS_DIR).walk_revisions()]
    created = {
        name for module in modules for name in getattr(module, "TRIGGERS", {}).get(dialect, ())
    }
    if dialect == "sqlite":
        created |= {module.TRIGGER for module in modules if hasattr(module, "TRIGGER")}
    return created - {
        module.DROPS_TRIGGER for module in modules if hasattr(module, "DROPS_TRIGGER")
    }


def _triggers(conn: sa.Connection) -> set[str]:
    """The triggers the database on `conn` holds."""
    if conn.dialect.name == "sqlite":
        query = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
    else:
        query = (
            "SELECT DISTINCT trigger_name FROM information_schema.triggers "
            "WHERE trigger_schema = current_schema()"
        )
    return set(conn.execute(sa.text(query)).scalars())


def drift(conn: sa.Connection) -> list[Any]:
    """What the schema on `conn` differs in from the models, and from the triggers the
    migrations create (which autogenerate does not compare): a SQLite `batch_alter_table`
    recreates its table without them, and the create path relies on `uploads_take_reservation`
    there, the quota check on the usage triggers on both. Call inside the app's context."""
    context = MigrationContext.configure(conn, opts={"compare_type": True, "render_as_batch": True})
    diff: list[Any] = list(compare_metadata(context, db.metadata))
    expected = _migrations_triggers(conn.dialect.name)
    present = _triggers(conn)
    diff += [("missing_trigger", name) for name in sorted(expected - present)]
    diff += [("unexpected_trigger", name) for name in sorted(present - expected)]
    return diff


def test_migrations_match_models(app):
    with app.app_context(), db.engine.connect() as conn:
        assert drift(conn) == []


def test_the_drift_check_reports_a_trigger_a_migration_lost(tmp_path) -> None:
    """A SQLite database whose `uploads_take_reservation` is gone (as a later
    `batch_alter_table('uploads')` would leave it) fails the check, naming the trigger."""
    app = create_app(base_config(f"sqlite:///{tmp_path}/drift.sqlite3", str(tmp_path)))
    with app.app_context():
        upgrade()
        with db.engine.connect() as conn:
            assert drift(conn) == []
            conn.execute(sa.text("DROP TRIGGER uploads_take_reservation"))
            assert drift(conn) == [("missing_trigger", "uploads_take_reservation")]
            conn.execute(
                sa.text("CREATE TRIGGER stray AFTER DELETE ON uploads BEGIN SELECT 1; END")
            )
            assert drift(conn)[-1] == ("unexpected_trigger", "stray")
        db.engine.dispose()


def test_a_sqlite_connection_keeps_a_page_cache_of_its_own_bounded(tmp_path) -> None:
    """Every pooled SQLite connection (one per request thread) caches at most
    SQLITE_CACHE_KIB of pages, not SQLite's 2 MiB: a web process's memory stays flat."""
    app = create_app(base_config(f"sqlite:///{tmp_path}/cache.sqlite3", str(tmp_path)))
    with app.app_context():
        with db.engine.connect() as first, db.engine.connect() as second:
            for conn in (first, second):
                assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -SQLITE_CACHE_KIB
        db.engine.dispose()


def test_a_partial_index_gets_its_condition_in_the_terms_of_the_database_in_use(app):
    """The live-image-id index is partial on SQLite and PostgreSQL alike, though the models
    name no dialect (only the one in use is loaded)."""
    index = next(i for i in Upload.__table__.indexes if i.name == "uq_uploads_live_image_id")
    with app.app_context():
        ddl = str(sa.schema.CreateIndex(index).compile(dialect=db.engine.dialect))
    assert ddl.startswith("CREATE UNIQUE INDEX uq_uploads_live_image_id ON uploads (image_id)")
    assert ddl.endswith("WHERE status IN ('pending', 'ready')")


def test_single_migration_head():
    heads = ScriptDirectory(MIGRATIONS_DIR).get_heads()
    assert len(heads) == 1, f"several migration heads: {heads}"


def test_database_errors_do_not_carry_bound_values(app: Flask) -> None:
    """A failing statement's message (logged with the traceback of a 500) hides its parameters,
    so a webhook secret or signing key being written never reaches the log."""
    secret = "whsec_c2VjcmV0LXRoYXQtbXVzdC1ub3QtbGVhaw=="
    with app.app_context():
        with pytest.raises(sa.exc.DBAPIError) as caught:
            db.session.execute(sa.text("INSERT INTO no_such_table VALUES (:v)"), {"v": secret})
        db.session.rollback()
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value)


def _idle_pinging_engine(url: str, now: list[float]) -> tuple[sa.Engine, list[int]]:
    """An engine with the broker's PostgreSQL pool options and a hand-moved clock; the list
    counts its pings."""
    from broker.platform.db import ping_when_idle, server_pool_options

    engine = sa.create_engine(url, **server_pool_options())
    ping_when_idle(engine, clock=lambda: now[0])
    pings = [0]
    real_ping = engine.dialect.do_ping

    def counted(dbapi_connection: object) -> bool:
        pings[0] += 1
        return bool(real_ping(dbapi_connection))

    engine.dialect.do_ping = counted  # type: ignore[method-assign]
    return engine, pings


def test_a_busy_pool_hands_out_connections_without_a_ping(postgres_url: str) -> None:
    """A connection given back moments ago is reused as it is (a busy process would otherwise
    pay a round trip per checkout); one idle past PING_WHEN_IDLE is checked first."""
    from broker.platform.db import PING_WHEN_IDLE

    now = [1000.0]
    engine, pings = _idle_pinging_engine(postgres_url, now)
    try:
        for _ in range(5):
            with engine.connect() as conn:
                assert conn.scalar(sa.text("SELECT 1")) == 1
            now[0] += 1
        assert pings[0] == 0
        now[0] += PING_WHEN_IDLE
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT 1")) == 1
        assert pings[0] == 1
    finally:
        engine.dispose()


def test_after_a_burst_the_pool_keeps_using_the_connection_given_back_last(
    postgres_url: str,
) -> None:
    """A burst opened several connections; the quiet requests after it all get the one given
    back last, so the others sit idle instead of each request taking the next in turn."""
    now = [1000.0]
    engine, _pings = _idle_pinging_engine(postgres_url, now)
    try:
        burst = [engine.connect() for _ in range(4)]
        backends = [conn.scalar(sa.text("SELECT pg_backend_pid()")) for conn in burst]
        assert len(set(backends)) == 4
        for conn in burst:
            conn.close()
        used = set()
        for _ in range(6):
            with engine.connect() as conn:
                used.add(conn.scalar(sa.text("SELECT pg_backend_pid()")))
        assert used == {backends[-1]}
    finally:
        engine.dispose()


def test_an_idle_connection_the_server_dropped_is_replaced_before_use(postgres_url: str) -> None:
    """The server ended a pooled connection while it sat idle (a restart, an idle timeout): the
    ping on checkout sees it and the pool hands out a new connection; the caller never fails."""
    from broker.platform.db import PING_WHEN_IDLE

    now = [1000.0]
    engine, pings = _idle_pinging_engine(postgres_url, now)
    try:
        with engine.connect() as conn:
            victim = conn.scalar(sa.text("SELECT pg_backend_pid()"))
        admin = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
        with admin.connect() as other:
            other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": victim})
        admin.dispose()
        now[0] += PING_WHEN_IDLE + 1
        with engine.connect() as conn:
            fresh = conn.scalar(sa.text("SELECT pg_backend_pid()"))
        assert fresh != victim and pings[0] >= 1
    finally:
        engine.dispose()

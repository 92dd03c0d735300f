"""Upgrades: a database with rows in every table migrates from the first revision to head, and
two `flask db upgrade` started together leave one schema (PostgreSQL's advisory lock)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from flask_migrate import upgrade

from broker import create_app
from broker.platform.db import MIGRATION_LOCK, MIGRATIONS_DIR, db
from broker.platform.encryption import current_keyring
from tests.conftest import base_config
from tests.factories import TEST_ENCRYPTION_KEY
from tests.system.topology import wait_for

ROOT = Path(__file__).resolve().parents[2]
FLASK = str(Path(sys.executable).parent / "flask")


def flask_env(url: str, instance: Path) -> dict[str, str]:
    """The environment of a `flask --app broker` process on the database at `url`."""
    return {
        **os.environ,
        "BROKER_ENV": "testing",
        "BROKER_DATABASE_URL": url,
        "BROKER_ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
        "BROKER_INSTANCE_PATH": str(instance),
    }


def _value(column: sa.Column[Any], table: str, related: dict[str, Any]) -> Any:
    """A plausible value of `column`'s type (the referenced row's key for a foreign key)."""
    if column.foreign_keys:
        target = next(iter(column.foreign_keys)).target_fullname
        return related[target]
    kind = column.type
    if isinstance(kind, sa.Boolean):
        return False
    if isinstance(kind, sa.DateTime):
        return datetime(2026, 11, 23, tzinfo=UTC)
    if isinstance(kind, sa.Integer):
        return 1
    if isinstance(kind, sa.Float | sa.Numeric):
        return 1.0
    if isinstance(kind, sa.LargeBinary):
        return b"x"
    if isinstance(kind, sa.JSON):
        return {}
    text = f"{table}-{column.name}"
    length = getattr(kind, "length", None)
    return text[:length] if length else text


def _fill_empty_tables(engine: sa.Engine) -> list[str]:
    """Insert one row into every table that has none (parents first); return their names."""
    meta = sa.MetaData()
    meta.reflect(engine)
    filled = []
    related: dict[str, Any] = {}
    with engine.begin() as conn:
        for table in meta.sorted_tables:
            if table.name == "alembic_version":
                continue
            row = conn.execute(sa.select(table).limit(1)).mappings().first()
            if row is None:
                values = {}
                for column in table.columns:
                    auto = (
                        column.primary_key
                        and isinstance(column.type, sa.Integer)
                        and len(table.primary_key.columns) == 1
                        and (
                            engine.dialect.name == "sqlite"
                            or column.server_default is not None
                            or column.identity is not None
                        )
                    )
                    if not auto:
                        values[column.name] = _value(column, table.name, related)
                conn.execute(table.insert().values(values))
                row = conn.execute(sa.select(table).limit(1)).mappings().one()
                filled.append(table.name)
            related.update({f"{table.name}.{name}": value for name, value in row.items()})
    engine.dispose()
    return filled


def test_every_revision_migrates_a_database_holding_rows_of_every_table(
    database_url: str, new_database: Any, tmp_path: Path
) -> None:
    """From the first revision to head, one step at a time, with a row in every table that
    exists at each step: no migration fails on existing rows, and none loses them."""
    url = new_database(database_url)
    app = create_app(base_config(url, str(tmp_path)))
    revisions = list(reversed(list(ScriptDirectory(MIGRATIONS_DIR).walk_revisions())))
    assert revisions[0].down_revision is None
    filled: list[str] = []
    with app.app_context():
        for revision in revisions:
            upgrade(revision=revision.revision)
            filled += _fill_empty_tables(db.engine)
        inspector = sa.inspect(db.engine)
        head_tables = set(inspector.get_table_names()) - {"alembic_version"}
        # Every table of head got its row on the way: the counts of uploads from the uploads
        # row, by its revision's backfill.
        assert set(filled) | {"upload_usage", "upload_usage_hours"} == head_tables
        with db.engine.connect() as conn:
            for name in head_tables:
                count = sa.select(sa.func.count()).select_from(sa.table(name))
                assert conn.execute(count).scalar_one() == 1
            # Stored as plain text before the encryption revision, readable with the key after.
            secret = conn.execute(sa.text("SELECT secret FROM webhook_endpoints")).scalar_one()
            assert current_keyring().decrypt(secret) == "webhook_endpoints-secret"
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
        assert version == revisions[-1].revision
        db.engine.dispose()


def test_two_upgrades_started_together_leave_one_schema(
    postgres_url: str, new_database: Any, tmp_path: Path
) -> None:
    """`flask --app broker db upgrade` twice at once, as two replicas starting together run it:
    both wait on the migration lock (held here until both are queued on it), then one migrates
    and the other finds nothing to do; both exit 0."""
    url = new_database(postgres_url)
    env = flask_env(url, tmp_path)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    holder = engine.connect()
    holder.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
    holder.commit()
    runs = [
        subprocess.Popen(
            [FLASK, "--app", "broker", "db", "upgrade"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    try:
        waiting = sa.text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )

        def both_waiting() -> bool:
            assert all(run.poll() is None for run in runs), "an upgrade ended before the lock"
            with engine.connect() as conn:
                return bool(conn.execute(waiting).scalar_one() == 2)

        wait_for(both_waiting, 60, "both upgrades to wait on the migration lock")
        assert "users" not in sa.inspect(engine).get_table_names()
    finally:
        holder.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
        holder.close()
        outputs = [run.communicate(timeout=120)[0].decode() for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    head = ScriptDirectory(MIGRATIONS_DIR).get_current_head()
    with engine.connect() as conn:
        versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars()
        assert versions.all() == [head]
    create_app(base_config(url, str(tmp_path)))  # registers every model on the metadata
    tables = set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    assert tables == set(db.metadata.tables)
    engine.dispose()


def test_the_usage_counts_revision_commits_at_once_on_sqlite(tmp_path: Path) -> None:
    """SQLite's driver runs DDL outside a transaction, each statement committing alone: the
    revision that adds the usage counts takes the write lock first, so an upload written while
    it runs can neither be counted twice nor missed, and a failure half way leaves nothing
    behind. Here its third table is in the way: the first two are gone with it."""
    url = f"sqlite:///{tmp_path}/broker.sqlite3"
    app = create_app(base_config(url, str(tmp_path)))
    with app.app_context():
        upgrade(revision="c7a2e4f1d9b6")
        with db.engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE upload_usage_changes (id INTEGER)"))
        with pytest.raises(sa.exc.OperationalError, match="already exists"):
            upgrade()
        with db.engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        db.engine.dispose()
    assert {"upload_usage", "upload_usage_hours"}.isdisjoint(tables), tables
    assert version == "c7a2e4f1d9b6"

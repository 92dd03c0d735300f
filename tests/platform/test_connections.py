"""Database connections sized from the process's threads, and a warning at start when the
deployment may open more than PostgreSQL accepts."""

from __future__ import annotations

import logging
import os
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from flask import Flask

from broker.platform.db import connections_per_process, db
from tests.factories import production_app

ROOT = Path(__file__).resolve().parents[2]


def test_gunicorn_hands_its_threads_to_the_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    """gunicorn.conf.py's on_starting hook (run in the master, before any process loads the
    app) sets BROKER_DB_POOL_SIZE to the threads gunicorn runs, unless the operator set it."""
    monkeypatch.delenv("BROKER_DB_POOL_SIZE", raising=False)
    hooks = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    hooks["on_starting"](SimpleNamespace(cfg=SimpleNamespace(threads=6)))
    assert os.environ["BROKER_DB_POOL_SIZE"] == "6"
    monkeypatch.setenv("BROKER_DB_POOL_SIZE", "3")
    hooks["on_starting"](SimpleNamespace(cfg=SimpleNamespace(threads=6)))
    assert os.environ["BROKER_DB_POOL_SIZE"] == "3"


def test_both_engines_pool_the_threads_plus_a_small_overflow(
    postgres_url: str, tmp_path: Path
) -> None:
    """Pool = BROKER_DB_POOL_SIZE on the app's engine and the budget's; 2 x (pool + overflow)
    per process."""
    app = production_app(tmp_path, DATABASE_URL=postgres_url, DB_POOL_SIZE=5)
    assert _pools(app) == [(5, 2), (5, 2)]
    assert connections_per_process(app.config) == 14


def _pools(app: Flask) -> list[tuple[int, int]]:
    """(size, overflow) of the pools of the app's engine and the budget's (then disposed)."""
    budget_engine = app.extensions["budget"].engine
    with app.app_context():
        engines = [db.engine, budget_engine]
        pools = [(e.pool.size(), e.pool._max_overflow) for e in engines]  # type: ignore[attr-defined]
        db.engine.dispose()
    budget_engine.dispose()
    return pools


def test_a_sqlite_files_engines_pool_the_threads_too(tmp_path: Path) -> None:
    """On SQLite as well: each of a process's threads keeps its connection (beyond the default
    five, every request would open one, set its pragmas up and close it again)."""
    url = f"sqlite:///{tmp_path}/pooled.sqlite3"
    app = production_app(tmp_path, DATABASE_URL=url, DB_POOL_SIZE=16)
    assert _pools(app) == [(16, 2), (16, 2)]


def _server_limit(url: str) -> int:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        limit = int(conn.execute(sa.text("SHOW max_connections")).scalar_one())
        reserved = int(conn.execute(sa.text("SHOW superuser_reserved_connections")).scalar_one())
    engine.dispose()
    return limit - reserved


@pytest.mark.parametrize("over", [True, False])
def test_start_warns_when_the_deployment_may_exceed_max_connections(
    postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, over: bool
) -> None:
    """A production process warns, with the figures, when BROKER_DB_PROCESSES processes like
    it may open more connections than the server's max_connections less its reserve; not when
    they fit."""
    available = _server_limit(postgres_url)
    per_process = 2 * (8 + 2)
    processes = available // per_process + 1 if over else max(1, available // per_process)
    with caplog.at_level(logging.WARNING, logger="broker.db"):
        app = production_app(
            tmp_path, DATABASE_URL=postgres_url, DB_POOL_SIZE=8, DB_PROCESSES=processes
        )
    with app.app_context():
        db.engine.dispose()
    app.extensions["budget"].engine.dispose()
    warnings = [r.getMessage() for r in caplog.records if r.name == "broker.db"]
    if over:
        (warning,) = warnings
        assert f"{processes} broker processes" in warning
        assert f"may open {processes * per_process} PostgreSQL connections" in warning
        assert f"the server accepts {available}" in warning
    else:
        assert warnings == []

"""A web process warms up before it takes requests (broker.uploads.warmup, run by
gunicorn.conf.py's `post_worker_init`): the create path's statements are compiled and its
connections opened, with nothing kept and nothing sent upstream."""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.engine.default import CACHE_MISS

from broker.api import round_trips
from broker.auth.models import ApiToken, User
from broker.platform.db import db
from broker.uploads.models import Upload, UploadReservation

URL = "/api/v1/uploads"
ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def compiled(engine: sa.Engine) -> Iterator[list[str]]:
    """Record the statements `engine` had to compile (not found in its compiled cache)."""
    missed: list[str] = []

    def on_execute(_c: Any, _cur: Any, statement: str, _p: Any, context: Any, _m: Any) -> None:
        if context is not None and getattr(context, "cache_hit", None) == CACHE_MISS:
            missed.append(" ".join(statement.split()))

    sa.event.listen(engine, "after_cursor_execute", on_execute)
    try:
        yield missed
    finally:
        sa.event.remove(engine, "after_cursor_execute", on_execute)


def _create_compiles(app: Flask, auth: dict[str, str]) -> list[str]:
    """The statements on uploads and reservations a create had to compile on `app`."""
    with app.app_context(), compiled(db.engine) as missed:
        assert app.test_client().post(URL, json={}, headers=auth).status_code == 201
    return [" ".join(s.split()[:3]) for s in missed if "upload" in s]


def test_after_the_warm_up_a_create_compiles_none_of_its_upload_statements(
    app, make_app, make_user, bearer
) -> None:
    auth = bearer(app, make_user("alice"))
    # Without it (the check can fail): a fresh app compiles the reservation and the upload row.
    assert _create_compiles(make_app(), auth)
    warm = make_app()
    warm.extensions["warm_up"](connections=2)
    # Nor any statement of the reservation step sent in one round trip (PostgreSQL), the
    # budget's spend among them: the warm-up runs it with the app's budget.
    before = round_trips._compiled.cache_info().misses
    assert _create_compiles(warm, auth) == []
    assert round_trips._compiled.cache_info().misses == before


def _counts(app: Flask) -> dict[str, int]:
    with app.app_context():
        return {
            model.__tablename__: db.session.scalar(sa.select(sa.func.count()).select_from(model))
            for model in (User, ApiToken, Upload, UploadReservation)
        }


def test_the_warm_up_keeps_nothing_and_sends_nothing_upstream(
    app, make_user, emulator, caplog
) -> None:
    make_user("alice")
    before, calls = _counts(app), emulator.counters()
    with caplog.at_level(logging.INFO):
        seconds = app.extensions["warm_up"](connections=3)
    assert seconds > 0
    assert _counts(app) == before
    assert emulator.counters() == calls
    # Its made-up upload is not logged as created; and it did not fail.
    assert not [r for r in caplog.records if "upload created" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_the_warm_up_leaves_its_connections_open_in_the_pool(app) -> None:
    """On PostgreSQL each connection a first burst would open is opened (and its server-side
    caches filled) before requests come; SQLite has no such caches: one."""
    app.extensions["warm_up"](connections=3)
    with app.app_context():
        expected = 1 if db.engine.dialect.name == "sqlite" else 3
        assert db.engine.pool.checkedin() == expected  # type: ignore[attr-defined]
        budget_pool = app.extensions["budget"].engine.pool
        assert budget_pool.checkedin() == expected


def test_a_failed_warm_up_is_logged_and_the_process_serves_anyway(
    app, make_app, tmp_path, caplog
) -> None:
    broken = make_app(DATABASE_URL=f"sqlite:///{tmp_path / 'no-tables.sqlite3'}")
    with caplog.at_level(logging.WARNING, logger="broker.warmup"):
        broken.extensions["warm_up"](connections=2)
    assert "warm-up failed" in caplog.text


def _gunicorn_config() -> Any:
    spec = importlib.util.spec_from_file_location("gunicorn_conf", ROOT / "gunicorn.conf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("threads", [1, 4])
def test_gunicorn_warms_each_web_process_with_one_connection_per_thread(app, threads: int) -> None:
    seen: list[int] = []
    app.extensions["warm_up"] = lambda connections: seen.append(connections) or 0.25
    logged: list[str] = []
    worker = SimpleNamespace(
        wsgi=app,
        cfg=SimpleNamespace(threads=threads),
        log=SimpleNamespace(info=lambda msg, *args: logged.append(msg % args)),
    )
    _gunicorn_config().post_worker_init(worker)
    assert seen == [threads]
    assert logged == ["warmed up in 250 ms"]


def test_gunicorn_leaves_an_app_without_a_warm_up_alone() -> None:
    """The emulator runs under the same gunicorn.conf.py in the benchmarks."""
    from broker.emulator import create_app

    emulator_app = create_app()
    assert "warm_up" not in emulator_app.extensions
    logged: list[str] = []
    worker = SimpleNamespace(
        wsgi=emulator_app,
        cfg=SimpleNamespace(threads=4),
        log=SimpleNamespace(info=lambda msg, *args: logged.append(msg % args)),
    )
    _gunicorn_config().post_worker_init(worker)
    assert logged == []


def test_the_warm_up_takes_no_lock_the_apps_creates_wait_for(app, make_user, bearer) -> None:
    """The warm-up runs the create path with a budget of its own scope: while another
    transaction holds the app's budget state row (as a create spending does, for a moment),
    the warm-up runs through instead of waiting for it; and its transaction (rolled back at
    the end) never held that row, which every create of every process takes."""
    with app.app_context():
        engine = db.engine
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's row locks (SQLite's write lock is the database's)")
    auth = bearer(app, make_user("alice"))
    assert app.test_client().post(URL, json={}, headers=auth).status_code == 201  # its row
    done = threading.Event()

    def warm() -> None:
        app.extensions["warm_up"](connections=1)
        done.set()

    with engine.connect() as holder:
        holder.execute(sa.text("SELECT 1 FROM upstream_budget_state FOR UPDATE"))
        worker = threading.Thread(target=warm)
        worker.start()
        finished = done.wait(20)
        holder.rollback()
    worker.join(30)
    assert finished, "the warm-up waited for the app's budget row"

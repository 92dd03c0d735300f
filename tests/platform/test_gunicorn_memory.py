"""gunicorn.conf.py's memory: the master loads the app once for its web processes to share
(closing the connections the load opened, starting no thread, leaving a refused load to the web
processes, and its log lines on stderr), and a web process hands its freed heap pages back after
it served requests."""

from __future__ import annotations

import gc
import json
import logging
import re
import runpy
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from flask import Flask

from broker.platform.db import db
from tests.factories import production_env
from tests.support.redis_server import redis_server
from tests.system.topology import BIN, listening_socket, topology, wait_for, wait_http

ROOT = Path(__file__).resolve().parents[2]


def _hooks() -> dict[str, Any]:
    return runpy.run_path(str(ROOT / "gunicorn.conf.py"))


class _Application:
    """gunicorn's application object: `wsgi()` loads the app once and keeps it."""

    def __init__(self, load: Any) -> None:
        self.callable: Any = None
        self._load = load

    def wsgi(self) -> Any:
        if self.callable is None:
            self.callable = self._load()
        return self.callable


def test_the_master_loads_the_app_once_and_hands_no_connection_to_its_children(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BROKER_DB_POOL_SIZE", raising=False)  # on_starting sets it
    budget_engine = app.extensions["budget"].engine
    with app.app_context():
        db.session.execute(sa.text("SELECT 1"))
        db.session.remove()
        main_pool = db.engine.pool
    with budget_engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    assert main_pool.checkedin() == 1 and budget_engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    origins = app.extensions["cloudflare"]._origins
    assert origins._openers  # the client builds its API pool when it is made
    warmed: list[int] = []
    warm_up = app.extensions["warm_up"]
    app.extensions["warm_up"] = lambda connections: (
        warmed.append(connections) or warm_up(connections=connections)
    )
    application = _Application(lambda: app)
    try:
        _hooks()["on_starting"](SimpleNamespace(cfg=SimpleNamespace(threads=4), app=application))
        assert application.callable is app  # the web processes get this one, loaded once
        assert warmed == []  # each web process warms itself up: a request starts threads
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    with app.app_context():
        assert db.engine.pool.checkedin() == 0  # type: ignore[attr-defined]
    assert budget_engine.pool.checkedin() == 0  # type: ignore[attr-defined]
    assert not origins._openers  # no Cloudflare pool is shared with the web processes


def test_the_master_hands_its_free_heap_pages_back_before_it_forks(app: Flask) -> None:
    load_before_fork = _hooks()["_load_before_fork"]
    libc = _Libc()
    load_before_fork.__globals__["_libc"] = lambda: libc
    try:
        load_before_fork(_Application(lambda: app))
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert libc.trims == [0]  # everything free, not only the top of the heap


def test_a_load_the_master_cannot_do_is_left_to_the_web_processes(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BROKER_DB_POOL_SIZE", raising=False)  # on_starting sets it

    def refused() -> None:
        sys.stderr.write("upload broker refuses to start: BROKER_SECRET_KEY is missing\n")
        raise SystemExit(4)

    application = _Application(refused)
    _hooks()["on_starting"](SimpleNamespace(cfg=SimpleNamespace(threads=4), app=application))
    assert application.callable is None  # each web process loads it, and reports the refusal
    assert capsys.readouterr().err == ""  # once per web process, as before, not once more


def test_the_master_forks_with_no_thread_and_no_connection_of_the_app(
    make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("BROKER_DB_POOL_SIZE", raising=False)  # on_starting sets it
    before = set(threading.enumerate())
    with redis_server(tmp_path) as redis:
        app = make_app(RATELIMIT_STORAGE_URI=redis.uri, WORKER_INLINE=True)
        cache = app.extensions["tokens"]
        try:
            _hooks()["on_starting"](
                SimpleNamespace(cfg=SimpleNamespace(threads=4), app=_Application(lambda: app))
            )
        finally:
            gc.unfreeze()
        assert set(threading.enumerate()) == before  # no token feed, no inline worker
        assert cache.stamp._conn is None and cache.publisher._conn is None
        assert app.before_request_funcs[None]  # the inline worker's hook is the children's


def test_what_a_load_logs_and_everything_logged_after_reach_stderr(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BROKER_DB_POOL_SIZE", raising=False)  # on_starting sets it
    logger = logging.getLogger("broker.test_load")
    handlers: list[logging.Handler] = []

    def load() -> Flask:
        handlers.append(logging.StreamHandler(sys.stderr))  # as the broker's: today's stderr
        logger.addHandler(handlers[0])
        logger.warning("said while loading")
        return Flask(__name__)

    try:
        _hooks()["on_starting"](
            SimpleNamespace(cfg=SimpleNamespace(threads=4), app=_Application(load))
        )
        logger.warning("said after the fork")
    finally:
        gc.unfreeze()
        logger.removeHandler(handlers[0])
    assert capsys.readouterr().err == "said while loading\nsaid after the fork\n"


def test_under_gunicorn_the_broker_logs_to_stderr_and_a_web_process_runs_the_inline_worker(
    migrated: str, tmp_path: Path
) -> None:
    env = production_env(
        migrated, str(tmp_path), BROKER_LOG_FORMAT="json", BROKER_WORKER_INLINE="1"
    )
    gunicorn = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "--workers=1", "wsgi:app"]
    with listening_socket() as sock, topology(tmp_path, env) as topo:
        web = topo.start_web(gunicorn, sock)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        wait_http(f"{base}/livez", process=web)
        answer = requests.get(
            f"{base}/livez", headers={"X-Request-ID": "seen-on-stderr"}, timeout=10
        )
        assert answer.status_code == 200

        def request_line() -> dict[str, Any] | None:
            for line in web.output().splitlines():
                if line.startswith("{") and "seen-on-stderr" in line:
                    return json.loads(line)  # type: ignore[no-any-return]
            return None

        line = wait_for(request_line, 30, "the request's JSON line on stderr")
        assert line["logger"] == "broker.request" and line["request_id"] == "seen-on-stderr"
        started = wait_for(
            lambda: re.search(r"worker [^:\s]+:(\d+):\d+ started", web.output()),
            30,
            "the inline worker's start",
        )
        assert int(started.group(1)) != web.popen.pid  # a web process's, not the master's


class _Worker:
    """A gunicorn worker whose request count (`nr`) follows `counts`, one per look."""

    def __init__(self, counts: list[int]) -> None:
        self.nr = 0
        self._counts = iter(counts)

    @property
    def alive(self) -> bool:
        try:
            self.nr = next(self._counts)
        except StopIteration:
            return False
        return True


class _Libc:
    def __init__(self) -> None:
        self.trims: list[int] = []

    def malloc_trim(self, pad: int) -> int:
        self.trims.append(pad)
        return 1


def test_the_heap_is_trimmed_once_per_interval_that_served_requests() -> None:
    trim_after_requests = runpy.run_path(str(ROOT / "gunicorn.conf.py"))["_trim_after_requests"]
    libc = _Libc()
    # Idle, then 3 requests, idle, 2 more, idle: two intervals served requests.
    trim_after_requests(_Worker([0, 3, 3, 5, 5]), libc, interval=0)
    assert libc.trims == [0, 0]

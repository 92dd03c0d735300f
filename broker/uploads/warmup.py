"""Warm a web process up before it takes requests.

A process's first create costs several times a later one: SQLAlchemy compiles each statement
once per process, and the libraries under it set up their own caches on first use. When all of
a fresh process's threads get their first requests at once, under load, that one-off cost
lands on all of them together; the requests queue, the queue opens more database connections,
and a restart under 40 creates/s stayed slow for seconds (bench_scale part 2: the first 2-12 s
at p50 1-2 s, against about 40 ms after).

`warm_up` runs the create path's database work once, before gunicorn hands the process any
request (gunicorn.conf.py's `post_worker_init`): a throwaway user, the token lookup, then the
create path itself (`broker.uploads.create.create_upload`, the function the route calls: the
reservation and the upload row), all inside one transaction that is rolled back. Nothing is
sent upstream (a stand-in answers the direct-upload call) and nothing is kept. A failure is
logged and the process serves anyway, only colder.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from flask import Flask, current_app
from sqlalchemy.orm import Session

from broker.api.unit_of_work import UnitOfWork
from broker.auth import passwords, tokens
from broker.auth.models import User
from broker.platform.config import Settings, settings_of
from broker.platform.db import db
from broker.uploads import create
from broker.uploads.policy import UploadParams
from broker.upstream import batch
from broker.upstream.budget import UpstreamBudget
from broker.upstream.cloudflare import Budget, DirectUpload
from broker.upstream.models import UpstreamBatchFallback, UpstreamBatchToken, UpstreamBudgetBucket

log = logging.getLogger("broker.warmup")


# The budget scope the warm-up spends in: one with no state row, so the create path runs every
# statement of its spend and spends nothing.
WARM_UP_SCOPE = "warm-up"


class _StandIn:
    """Answers the create path's one upstream call without leaving the process; its budget is
    the app's under a scope of its own (`_warm_up_budget`), so the create path runs its spend's
    statements too."""

    def __init__(self, budget: Budget | None) -> None:
        self.budget = budget

    def budget_for(self, batch: str | None) -> Budget | None:
        return self.budget

    def direct_upload(self, **_: Any) -> DirectUpload:
        return DirectUpload(id=f"warm-up-{secrets.token_hex(8)}", upload_url="")

    def delete_image(self, image_id: str, **_: Any) -> None:
        return None


class _Quiet(logging.Filter):
    """Keeps the warm-up's made-up upload out of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


def warm_up(app: Flask, connections: int = 1) -> float:
    """Run the create path's statements once on each of `connections` pooled connections
    (one on SQLite), rolled back; return the seconds it took."""
    started = time.perf_counter()
    quiet = _Quiet()
    uploads_log = logging.getLogger(create.log.name)
    uploads_log.addFilter(quiet)
    try:
        with app.app_context():
            _warm_connections(
                db.engine, connections, lambda conn: _create_path(conn, settings_of(app))
            )
            budget_engine = app.extensions["budget"].engine
            _warm_connections(budget_engine, connections, _read_upstream_tables)
            route = app.extensions.get(batch.EXTENSION_KEY)
            if route is not None:
                route.warm_up()
        _refused_request(app)
    except Exception:
        log.warning("warm-up failed; this process starts cold", exc_info=True)
    finally:
        uploads_log.removeFilter(quiet)
    return time.perf_counter() - started


def _warm_connections(engine: sa.Engine, count: int, work: Callable[[sa.Connection], None]) -> None:
    """Open `count` connections of `engine`'s pool at once and run `work` on each in a
    transaction that is rolled back. A new PostgreSQL connection's first statements cost the
    server far more than later ones (it loads the tables' descriptions), and a process's first
    burst of requests takes as many connections as it has busy threads."""
    if engine.dialect.name == "sqlite":
        count = 1  # no server-side caches; and one writer at a time
    size = getattr(engine.pool, "size", None)
    if callable(size):
        count = min(count, size())  # those the pool keeps
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(engine.connect()) for _ in range(max(count, 1))]
        for conn in held:
            outer = conn.begin()
            try:
                work(conn)
            finally:
                outer.rollback()


def _read_upstream_tables(conn: sa.Connection) -> None:
    """What a create reads and writes on the budget's engine: the batch token, the fall-backs,
    the per-token rate's slices (read only: counting would spend a call)."""
    for model in (UpstreamBatchToken, UpstreamBatchFallback, UpstreamBudgetBucket):
        conn.execute(sa.select(sa.func.count()).select_from(model.__table__))


def _refused_request(app: Flask) -> None:
    """A create with an unknown token, dispatched in the process (no access-log line): the
    request's hooks, authentication and the error answer, without a view's side effects."""
    secret = tokens.new_secret(tokens.PREFIX)
    with app.test_request_context(
        "/api/v1/uploads",
        method="POST",
        json={},
        headers={"Authorization": f"Bearer {secret}"},
        base_url="http://localhost",
    ):
        response = app.full_dispatch_request()
    if response.status_code != 401:
        raise RuntimeError(f"the warm-up's refused request got {response.status_code}")


def _create_path(conn: sa.Connection, settings: Settings) -> None:
    """What `POST /api/v1/uploads` does in the database, on `conn`'s open transaction."""
    key = f"warm-up-{secrets.token_hex(8)}"
    # No password opens it; the row never outlives the transaction anyway.
    user_id = conn.scalar(
        sa.insert(User)
        .values(username=key, username_key=key, password_hash=passwords.NO_PASSWORD)
        .returning(User.id)
    )
    # The create path's committed step ends savepoints; the caller's rollback undoes everything.
    with Session(bind=conn, join_transaction_mode="create_savepoint") as session:
        secret = tokens.issue(session, session.get_one(User, user_id), "warm-up").secret
        session.flush()
        session.expunge_all()
        # As a request authenticates: the token, its user, the last-used stamp.
        token = tokens.authenticate(session, secret)
        if token is None:
            raise RuntimeError("the warm-up's own token did not authenticate")
        user = token.user
        session.flush()
        stand_in = _StandIn(_warm_up_budget(current_app.extensions.get("budget")))
        create.create_upload(session, user, UploadParams(), stand_in, settings, UnitOfWork(session))


def _warm_up_budget(budget: Budget | None) -> Budget | None:
    """The app's budget under `WARM_UP_SCOPE`: the same statements, none of its locks. The
    warm-up's transaction keeps what it takes until it is rolled back, and with the app's
    scope every create of every process would wait for a process's warm-up (each of its
    connections, at each start)."""
    return budget.in_scope(WARM_UP_SCOPE) if isinstance(budget, UpstreamBudget) else budget

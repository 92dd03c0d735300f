"""The background worker: claims due work from the database with leases and does it.

    flask --app broker worker          # production: one or more processes
    BROKER_WORKER_INLINE=1             # development: a thread of each web process, started
                                       # by make run or with the first request it serves

Jobs, in the order one pass runs them (each guarded, so one failing job never stops the others):
- `heartbeat`: this worker's row in `worker_heartbeats`, every 10 s (broker.operations), read
  by `/metrics` and by `flask worker health`, the container healthcheck;
- `verify_uploads`: completion detection for due uploads (broker.uploads.completion);
- `expire_uploads`: drafts past their expiry + grace become `expired`;
- `delete_drafts`: expired drafts whose deletion upstream was postponed are deleted now;
- `replace_uploads`: replaced images whose grace is over are deleted upstream (replace mode);
- `deliver_webhooks`: outgoing events (broker.webhooks.sending);
- `erase_users`: a turn of each asked erasure: images deleted upstream (broker.erasure);
- `sync_keys`: mirror Cloudflare's signing keys (broker.images.keys.sync_keys), hourly;
- `purge_idempotency_keys`: forget `Idempotency-Key` answers past their 24 hours, hourly;
- `prune`: delete what is past its retention (broker.retention), every 5 minutes;
- `fold_usage`: fold the usage changes of users who stopped creating into their counts
  (PostgreSQL; broker.uploads.quotas), a batch a minute;
- `agree_with_cloudflare`: usage and reconciliation, each on its shared turn (broker.reconcile).

`verify_uploads` to `erase_users` ask the outside world about leased rows and so are leased work
(broker.platform.leases), which commits each row's record itself. For every job the loop is the
unit of work: it commits what the job left (all of `sync_keys` and `purge_idempotency_keys`),
or rolls back when the job failed.

Tests drive `run_once(app, now=...)` step by step; `run_forever` loops until its stop event is
set (SIGTERM in `flask worker`), then gives back what it has not started and returns.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import click
import sqlalchemy as sa
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext

from broker import operations, retention
from broker.api import idempotency
from broker.erasure import erase
from broker.images import keys
from broker.platform import wakeup
from broker.platform.config import current_settings, settings_of
from broker.platform.db import db, utcnow
from broker.reconcile import run as reconcile
from broker.uploads import completion, quotas
from broker.upstream.cloudflare import get_client
from broker.webhooks import sending

log = logging.getLogger("broker.worker")

EXTENSION_KEY = "worker"
INLINE_KEY = "inline_worker"
# SIGTERM must lead to exit within this many seconds (one webhook attempt takes at most 15 s).
SHUTDOWN_DEADLINE = 30


def _new_worker_id() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{threading.get_ident() % 100000}"


@dataclass
class Job:
    """One kind of work and how often to look for it (0 = every pass)."""

    name: str
    run: Callable[[Worker, datetime], int]
    every: float = 0.0


@dataclass
class Worker:
    """One worker's identity, per-job bookkeeping and stop flag."""

    app: Flask
    worker_id: str = field(default_factory=_new_worker_id)
    stop: threading.Event = field(default_factory=threading.Event)
    last_run: dict[str, datetime] = field(default_factory=dict)
    started_at: datetime = field(default_factory=utcnow)
    # Webhook senders (started with the first delivery). A looping worker does not wait for
    # them: a slow receiver must not hold up the pass, nor other receivers.
    webhook_lanes: sending.Lanes | None = None
    looping: bool = False

    @property
    def jobs(self) -> list[Job]:
        """Return the jobs in the order one pass runs them."""
        keys_every = settings_of(self.app).keys_sync_interval or 3600
        return [
            Job("heartbeat", _heartbeat, every=operations.HEARTBEAT_EVERY),
            Job("verify_uploads", _verify_uploads),
            Job("expire_uploads", _expire_uploads, every=10),
            Job("delete_drafts", _delete_drafts, every=10),
            Job("replace_uploads", _replace_uploads, every=10),
            Job("deliver_webhooks", _deliver_webhooks),
            Job("erase_users", _erase_users),
            Job("sync_keys", _sync_keys, every=keys_every),
            Job("purge_idempotency_keys", _purge_idempotency_keys, every=3600),
            Job("prune", _prune, every=300),
            Job("fold_usage", _fold_usage, every=60),
            Job("agree_with_cloudflare", _agree_with_cloudflare, every=60),
        ]

    def run_once(self, now: datetime | None = None) -> dict[str, int]:
        """Run every due job once; return how much each one did."""
        done: dict[str, int] = {}
        with self.app.app_context():
            for job in self.jobs:
                if self.stop.is_set():
                    break
                moment = now or utcnow()
                last = self.last_run.get(job.name)
                if job.every and last is not None and (moment - last).total_seconds() < job.every:
                    continue
                self.last_run[job.name] = moment
                try:
                    done[job.name] = job.run(self, moment)
                    db.session.commit()
                except Exception:
                    db.session.rollback()
                    log.exception("worker job %s failed", job.name)
                    done[job.name] = 0
            db.session.remove()
        return done

    def run_forever(self) -> None:
        """Loop until `stop` is set, idling between passes that found nothing to do."""
        poll = settings_of(self.app).worker_poll_interval or 1.0
        self.first_beat()
        log.info("worker %s started", self.worker_id)
        self.looping = True
        while not self.stop.is_set():
            done = self.run_once()
            if self.stop.is_set():
                break
            if not any(done.values()):
                # Short naps keep /complete hints and fresh events quick; `wake` cuts them short.
                wakeup.wake.wait(poll)
                wakeup.wake.clear()
        if self.webhook_lanes is not None:
            self.webhook_lanes.close()  # the attempts under way end, the rest is given back
        self.retire()
        log.info("worker %s stopped", self.worker_id)

    def first_beat(self) -> None:
        """Write the heartbeat before any job runs: a started worker is seen at once."""
        now = utcnow()
        with self.app.app_context():
            try:
                _heartbeat(self, now)
                db.session.commit()
                self.last_run["heartbeat"] = now
            except Exception:
                db.session.rollback()  # the first pass tries again
                log.exception("worker %s could not write its heartbeat", self.worker_id)
            db.session.remove()

    def retire(self) -> None:
        """Remove this worker's heartbeat: a clean stop is not a stale worker."""
        with self.app.app_context():
            try:
                operations.forget(db.session, self.worker_id)
                db.session.commit()
            except Exception:
                db.session.rollback()  # the row ages out: seen as stale, forgotten in a day
                log.exception("worker %s could not remove its heartbeat", self.worker_id)
            db.session.remove()


def _heartbeat(worker: Worker, now: datetime) -> int:
    stale_after = settings_of(worker.app).worker_stale_after
    operations.beat(db.session, worker.worker_id, worker.started_at, stale_after, now)
    return 0  # no work done: an idle worker still naps


def _verify_uploads(worker: Worker, now: datetime) -> int:
    settings = settings_of(worker.app)
    return completion.verify_due(db.session, get_client(), settings, worker.worker_id, now=now)


def _expire_uploads(worker: Worker, now: datetime) -> int:
    settings = settings_of(worker.app)
    return completion.expire_due(db.session, get_client(), settings, worker.worker_id, now=now)


def _delete_drafts(worker: Worker, now: datetime) -> int:
    return completion.delete_drafts_due(db.session, get_client(), worker.worker_id, now=now)


def _replace_uploads(worker: Worker, now: datetime) -> int:
    return completion.replace_due(db.session, get_client(), worker.worker_id, now=now)


def _deliver_webhooks(worker: Worker, now: datetime) -> int:
    if not worker.looping:
        # Driven pass by pass (tests, --once): the pass ends with its attempts done.
        return sending.deliver_due(
            db.session, worker.worker_id, worker.app.config, now=now, stop=worker.stop
        )
    if worker.webhook_lanes is None:
        worker.webhook_lanes = sending.Lanes(worker.app, worker.worker_id, stop=worker.stop)
    return worker.webhook_lanes.dispatch(db.session, now)  # the loop claims again when a lane ends


def _erase_users(worker: Worker, now: datetime) -> int:
    return erase.erase_due(
        db.session,
        get_client(),
        worker.worker_id,
        lease_seconds=settings_of(worker.app).erasure_lease,
        now=now,
        stop=worker.stop,
    )


def _sync_keys(worker: Worker, now: datetime) -> int:
    """Mirror the account's signing keys (and purge retired ones past their grace)."""
    return int(keys.sync_keys(db.session, get_client(), now=now).changed)


def _purge_idempotency_keys(worker: Worker, now: datetime) -> int:
    """Forget Idempotency-Key answers past their 24 hours, so the table does not grow forever."""
    return idempotency.purge_expired(db.session, now)


def _fold_usage(worker: Worker, now: datetime) -> int:
    """Fold the usage changes users who stopped creating left (PostgreSQL), a batch a pass: its
    own short transaction, since it holds each user's lock until the commit."""
    return quotas.fold_usage_changes(db.session.connection(), now)


def _prune(worker: Worker, now: datetime) -> int:
    """Delete deliveries, events, uploads and reservations past their retention."""
    gone = retention.prune(db.session, settings_of(worker.app), now)
    if any(gone.values()):
        log.info("pruned %s", " ".join(f"{kind}={n}" for kind, n in gone.items() if n))
    return sum(gone.values())


def _agree_with_cloudflare(worker: Worker, now: datetime) -> int:
    settings = settings_of(worker.app)
    return reconcile.when_due(db.session, get_client(), settings, worker.worker_id, now)


def get_worker(app: Flask) -> Worker:
    """Return the app's default worker (created on first use)."""
    worker = app.extensions.get(EXTENSION_KEY)
    if worker is None:
        worker = app.extensions[EXTENSION_KEY] = Worker(app)
    return worker


def run_once(
    app: Flask, now: datetime | None = None, worker_id: str | None = None
) -> dict[str, int]:
    """Run one pass of every due job (tests pass `now` to drive time)."""
    worker = get_worker(app) if worker_id is None else _named(app, worker_id)
    return worker.run_once(now)


def _named(app: Flask, worker_id: str) -> Worker:
    workers: dict[str, Worker] = app.extensions.setdefault("workers", {})
    if worker_id not in workers:
        workers[worker_id] = Worker(app, worker_id=worker_id)
    return workers[worker_id]


def run_forever(app: Flask, stop_event: threading.Event, worker_id: str | None = None) -> None:
    """Work until `stop_event` is set."""
    worker = Worker(app, worker_id=worker_id or _new_worker_id(), stop=stop_event)
    worker.run_forever()


def start_inline(app: Flask) -> tuple[threading.Thread, threading.Event]:
    """Start the worker in a daemon thread of this process (development's `make run`)."""
    stop = threading.Event()
    thread = threading.Thread(
        target=run_forever, args=(app, stop), name="broker-worker", daemon=True
    )
    thread.start()
    return thread, stop


@dataclass
class InlineWorker:
    """The worker thread a web process runs for itself (BROKER_WORKER_INLINE)."""

    thread: threading.Thread
    stop: threading.Event
    pid: int

    def close(self, timeout: float = SHUTDOWN_DEADLINE) -> None:
        """Stop the thread (it finishes or releases its work) and wait for it."""
        self.stop.set()
        wakeup.notify_worker()
        self.thread.join(timeout)


_inline_lock = threading.Lock()


def ensure_inline(app: Flask) -> InlineWorker:
    """Start this process's inline worker for `app` unless it runs already; return it.

    Kept per process id: threads do not survive a fork, so a gunicorn worker forked from a
    master that built the app (`--preload`) starts its own.
    """
    with _inline_lock:
        running: InlineWorker | None = app.extensions.get(INLINE_KEY)
        if running is None or running.pid != os.getpid():
            thread, stop = start_inline(app)
            running = app.extensions[INLINE_KEY] = InlineWorker(thread, stop, os.getpid())
        return running


def init_app(app: Flask) -> None:
    """With WORKER_INLINE on, start the inline worker with the first request a process serves.

    Not when the app is built: every `flask` command (`db upgrade`, `worker`, …) builds it too
    and must not start one, nor must a gunicorn master or the reloader's watcher, which serve
    no requests. `make run` starts it eagerly with `ensure_inline`; the first request then finds
    it running.
    """
    if not settings_of(app).worker_inline:
        return

    def start_inline_worker() -> None:
        ensure_inline(app)
        # Running for this process now: the hook takes itself out, so no later request pays
        # for it. A new list, not an edit of the one Flask may be iterating over right now.
        hooks = app.before_request_funcs[None]
        app.before_request_funcs[None] = [f for f in hooks if f is not start_inline_worker]

    app.before_request(start_inline_worker)


@click.group("worker", cls=AppGroup, invoke_without_command=True)
@click.option("--once", is_flag=True, help="Run one pass and exit (for cron or debugging).")
@click.pass_context
@with_appcontext
def worker_command(ctx: click.Context, once: bool) -> None:
    """Run the background worker until SIGTERM/SIGINT (finishes or releases its work first)."""
    if ctx.invoked_subcommand is not None:
        return
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if once:
        one_shot = get_worker(app)
        click.echo(one_shot.run_once())
        one_shot.retire()
        return
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        log.info("worker got signal %s: finishing current work", signum)
        stop.set()
        wakeup.notify_worker()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    thread = threading.Thread(target=run_forever, args=(app, stop), name="broker-worker")
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        if stop.is_set():
            thread.join(SHUTDOWN_DEADLINE - 1)
            break
    if thread.is_alive():
        log.error("worker did not stop within %ss; exiting anyway", SHUTDOWN_DEADLINE)
        os._exit(1)


@worker_command.command("health")
def worker_health() -> None:
    """Exit 0 when a worker on this host beat within BROKER_WORKER_STALE_AFTER, else 1."""
    stale_after = current_settings().worker_stale_after
    host = operations.this_host()
    try:
        ages = operations.heartbeat_ages(db.session, host=host)
    except sa.exc.SQLAlchemyError as exc:
        raise click.ClickException(f"cannot read the heartbeats: {type(exc).__name__}") from None
    if not ages:
        raise click.ClickException(f"no worker on {host} has written a heartbeat")
    worker_id, age = next(iter(ages.items()))
    if age > stale_after:
        raise click.ClickException(
            f"worker {worker_id} is stale: last heartbeat {age:.0f} s ago "
            f"(BROKER_WORKER_STALE_AFTER is {stale_after:.0f})"
        )
    click.echo(f"worker {worker_id}: last heartbeat {age:.0f} s ago")

"""What one `POST /api/v1/uploads` costs the database: two write transactions (reserve and
pay for the upstream call, then store the row), and exactly one budget call per create."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from broker.api import round_trips
from broker.auth.models import ApiToken
from broker.platform.db import db, utcnow
from broker.uploads.models import UploadReservation
from broker.upstream.budget import get_budget
from broker.upstream.cloudflare import CloudflareImages
from tests.factories import upload_rows

URL = "/api/v1/uploads"
_WRITES = ("INSERT", "UPDATE", "DELETE", "WITH")  # WITH: a DELETE carried by an INSERT


@contextmanager
def write_transactions(*engines: sa.Engine) -> Iterator[list[str]]:
    """Record one entry per committed transaction that wrote, on any of `engines`."""
    committed: list[str] = []

    def on_execute(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith(_WRITES):
            conn.info.setdefault("written", []).append(statement.split()[0:3])

    def on_commit(conn: Any) -> None:
        written = conn.info.pop("written", None)
        if written:
            committed.append(" / ".join(" ".join(w) for w in written))

    def on_rollback(conn: Any) -> None:
        conn.info.pop("written", None)

    for engine in engines:
        sa.event.listen(engine, "before_cursor_execute", on_execute)
        sa.event.listen(engine, "commit", on_commit)
        sa.event.listen(engine, "rollback", on_rollback)
    try:
        yield committed
    finally:
        for engine in engines:
            sa.event.remove(engine, "before_cursor_execute", on_execute)
            sa.event.remove(engine, "commit", on_commit)
            sa.event.remove(engine, "rollback", on_rollback)


def _quiet_token(app: Flask) -> None:
    """Keep the token's throttled last-used write out of the count."""
    with app.app_context():
        db.session.execute(sa.update(ApiToken).values(last_used_at=utcnow() + timedelta(hours=1)))
        db.session.commit()


def test_a_create_is_two_write_transactions(app, client, make_user, bearer, emulator) -> None:
    auth = bearer(app, make_user("alice"))
    _quiet_token(app)
    assert client.post(URL, json={}, headers=auth).status_code == 201  # creates the budget row
    with app.app_context():
        engines = (db.engine, get_budget().engine)
        with write_transactions(*engines) as committed:
            assert client.post(URL, json={}, headers=auth).status_code == 201
    assert len(committed) == 2, committed
    with app.app_context():
        assert get_budget().status().used == 2
        assert db.session.scalar(sa.select(sa.func.count()).select_from(UploadReservation)) == 0
    assert emulator.counters()["direct_upload"] == 2


@contextmanager
def statements(*engines: sa.Engine) -> Iterator[list[tuple[str, str]]]:
    """Record (engine label, first words) of every statement and transaction end on `engines`."""
    seen: list[tuple[str, str]] = []
    hooks = []
    for label, engine in zip("ab", engines, strict=True):

        def on_execute(_c: Any, _cur: Any, statement: str, *_: Any, label: str = label) -> None:
            seen.append((label, " ".join(statement.split()[:4])))

        def on_end(_c: Any, label: str = label, *, word: str = "") -> None:
            seen.append((label, word))

        ends = [
            ("commit", lambda c, label=label: on_end(c, label, word="COMMIT")),
            ("rollback", lambda c, label=label: on_end(c, label, word="ROLLBACK")),
        ]
        hooks += [(engine, "before_cursor_execute", on_execute), *((engine, *e) for e in ends)]
    for engine, name, fn in hooks:
        sa.event.listen(engine, name, fn)
    try:
        yield seen
    finally:
        for engine, name, fn in hooks:
            sa.event.remove(engine, name, fn)


def _count_one_create(app: Flask, headers: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Run one create (after one that fetched the batch token) and return its statements."""
    client = app.test_client()
    auth = bearer_of(app)
    assert client.post(URL, json={}, headers=auth).status_code == 201  # fetches the token
    stamp = app.extensions["tokens"].stamp
    stamp_reads = stamp.reads
    with app.app_context():
        engines = (db.engine, get_budget().engine)
        with statements(*engines) as seen:
            answer = client.post(URL, json={}, headers={**auth, **(headers or {})})
            assert answer.status_code == 201, answer.get_json()
    # The token and its user come from the process's memory, for one read of the auth version.
    assert stamp.reads == stamp_reads + 1
    return seen


def test_the_global_budget_is_spent_in_one_statement_last_in_the_reservation(
    app, make_user, bearer
) -> None:
    """With the batch API off, the create pays for its call in the reservation's transaction:
    on SQLite one conditional upsert of the budget's bucket (the reservation's write lock
    serialises it); on PostgreSQL the user's lock, the reservation, the scope's lock, the
    spend and the commit, sent together, so the lock every create of every process shares is
    held while the server runs the spend and commits, never across a round trip."""
    app.config["TEST_BEARER"] = bearer(app, make_user("alice"))
    _quiet_token(app)
    seen = _count_one_create(app)
    assert [s for s in seen if s[0] == "b"] == [], seen  # nothing on the budget's own engine
    words = [" ".join(w.split()[:3]) for _, w in seen]
    reservation = words[: words.index("COMMIT") + 1]
    row = words[len(reservation) :]
    budget = ["UPDATE upstream_budget_state SET", "INSERT INTO upstream_budget_buckets"]
    if _dialect(app) == "postgresql":
        # The user's lock, the reservation when there is room (with the fold of the user's
        # usage changes), the scope's lock when reserved, the spend (unreserving when
        # refused), the commit: one round trip (below).
        assert reservation == [
            "SELECT pg_advisory_xact_lock(%(param_1)s::INTEGER, %(user_id)s::INTEGER)",
            "WITH moved AS",
            budget[0],
            "WITH budget_spend AS",
            "COMMIT",
        ], seen
        assert [w.split()[0] for w in row] == ["WITH", "COMMIT"], seen
    else:
        assert reservation[0].startswith("INSERT INTO upload_reservations"), seen
        assert reservation[1:] == [budget[1], "COMMIT"], seen
        # The row's INSERT takes the reservation's slot (a trigger deletes the reservation).
        assert [w.split()[0] for w in row] == ["INSERT", "COMMIT"], seen
    with app.app_context():
        assert get_budget().status().used == 2


@contextmanager
def wire_traces(engine: sa.Engine, folder: Path) -> Iterator[list[Path]]:
    """Trace what psycopg sends and receives (libpq's trace) on `engine`'s connections, one
    file per checkout from its pool, listed in order."""
    from psycopg import pq

    files: list[Path] = []

    def on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        path = folder / f"checkout-{len(files)}.trace"
        files.append(path)
        with path.open("w") as out:
            dbapi_connection.pgconn.trace(os.dup(out.fileno()))  # libpq closes its copy
        dbapi_connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)

    def on_checkin(dbapi_connection: Any, _record: Any) -> None:
        if dbapi_connection is not None and not dbapi_connection.closed:
            dbapi_connection.pgconn.untrace()

    sa.event.listen(engine, "checkout", on_checkout)
    sa.event.listen(engine, "checkin", on_checkin)
    try:
        yield files
    finally:
        sa.event.remove(engine, "checkout", on_checkout)
        sa.event.remove(engine, "checkin", on_checkin)


def test_the_reservation_step_is_one_round_trip_on_postgresql(
    app, make_user, bearer, database_url, tmp_path, monkeypatch
) -> None:
    """On PostgreSQL the reservation's step (the user's lock, the reservation, the scope's
    lock, the spend, the commit) waits for the server once: its locks are held while the
    server works, never while this process turns around (counted on the wire, BEGIN and
    COMMIT included). Its statements are prepared on the connection once, then only run."""
    if not database_url.startswith("postgresql"):
        pytest.skip("psycopg's wire: runs in the PostgreSQL pass")
    app.config["TEST_BEARER"] = bearer(app, make_user("alice"))
    _quiet_token(app)
    client = app.test_client()
    auth = bearer_of(app)
    assert client.post(URL, json={}, headers=auth).status_code == 201  # creates the budget row
    with app.app_context():
        engine = db.engine
    with wire_traces(engine, tmp_path) as files:
        assert client.post(URL, json={}, headers=auth).status_code == 201
    traces = [path.read_text() for path in files]
    # The first create prepared the step's statements on the connection: this one only runs
    # them (its lock, the reservation, the budget's lock, the spend).
    steps = [t for t in traces if '"broker_step_' in t]
    assert len(steps) == 1, traces
    assert steps[0].count('Bind\t "" "broker_step_') == 4 and "COMMIT" in steps[0], steps
    assert "INSERT INTO upload_reservations" not in steps[0], steps  # not parsed again
    assert steps[0].count("\tReadyForQuery") == 1, steps[0]  # one wait for the server
    assert _bytes_sent(steps[0]) < 8192  # one write: libpq starts writing at 8 KiB
    # Past the bound of prepared statements a connection sends their SQL inline: one write still.
    monkeypatch.setattr(round_trips, "_MOST_PREPARED", 0)
    engine.dispose()  # new connections: none prepared
    (tmp_path / "inline").mkdir()
    with wire_traces(engine, tmp_path / "inline") as files:
        assert client.post(URL, json={}, headers=auth).status_code == 201
    inline = [path.read_text() for path in files if "upstream_budget_state" in path.read_text()]
    assert len(inline) == 1 and inline[0].count("\tReadyForQuery") == 1, inline
    assert "INSERT INTO upload_reservations" in inline[0] and _bytes_sent(inline[0]) < 8192
    with app.app_context():
        assert get_budget().status().used == 3
    assert len(upload_rows(app)) == 3


def _bytes_sent(trace: str) -> int:
    """The bytes of the messages libpq's `trace` shows it sending (each: its length field,
    which counts itself, and a type byte)."""
    sent = [line.split("\t") for line in trace.splitlines() if line.startswith("F\t")]
    return sum(int(fields[1]) + 1 for fields in sent)


def test_the_budgets_lock_is_free_until_the_whole_step_is_sent(
    app, make_user, bearer, database_url
) -> None:
    """One round trip is not enough: the step's statements must reach the server together,
    or the lock statement runs while this thread still has the spend and the COMMIT to send,
    which wait for the GIL behind the process's other threads (psycopg's pipeline mode sent
    each statement as it was queued). Probed when the listeners are told of the spend, which
    an implementation sending each statement as it is announced (psycopg's pipeline, one
    `execute` after the other) would have done with the budget's lock taken: another
    connection takes the budget's state row at once. (That the queued step then goes in one
    write is `test_the_reservation_step_is_one_round_trip_on_postgresql`'s bound.)"""
    if not database_url.startswith("postgresql"):
        pytest.skip("the one-round-trip step is PostgreSQL's")
    auth = bearer(app, make_user("probe"))
    client = app.test_client()
    assert client.post(URL, json={}, headers=auth).status_code == 201  # the budget's row
    with app.app_context():
        engine = db.engine
        scope = get_budget().scope
    other_engine = sa.create_engine(database_url)
    seen: list[str] = []

    def on_execute(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not statement.startswith("WITH budget_spend"):
            return
        with other_engine.connect() as other:
            other.execute(sa.text("SET lock_timeout = '300ms'"))
            try:
                other.execute(
                    sa.text("SELECT 1 FROM upstream_budget_state WHERE scope = :s FOR UPDATE"),
                    {"s": scope},
                )
                seen.append("free")
            except sa.exc.OperationalError as exc:
                seen.append(type(exc.orig).__name__)
            other.rollback()

    sa.event.listen(engine, "before_cursor_execute", on_execute)
    try:
        assert client.post(URL, json={}, headers=auth).status_code == 201
    finally:
        sa.event.remove(engine, "before_cursor_execute", on_execute)
        other_engine.dispose()
    assert seen == ["free"], seen


def test_a_create_on_the_batch_host_takes_no_shared_lock(make_app, make_user, bearer) -> None:
    """With the batch API on, a create never touches the global budget's state row, and the
    per-token rate is counted outside the reservation's transaction (no row every create of
    every process must lock in turn); the statements it runs are counted so that one more
    round trip on this hot path is a conscious change."""
    app = make_app(CLOUDFLARE_BATCH="auto")
    app.config["TEST_BEARER"] = bearer(app, make_user("alice"))
    _quiet_token(app)
    seen = _count_one_create(app)
    assert not [s for s in seen if "upstream_budget_state" in s[1]], seen
    reservation = seen[: seen.index(("a", "COMMIT")) + 1]
    assert [s for s in reservation if s[0] == "a"] == reservation, seen  # no rate inside it
    main = [w for e, w in seen if e == "a" and w not in ("COMMIT", "ROLLBACK")]
    rate = [w for e, w in seen if e == "b" and w not in ("COMMIT", "ROLLBACK")]
    # [the user's lock on PostgreSQL, sent with the reservation and the commit]; the
    # reservation, returning the usage (PostgreSQL: inserted only when there is room, the
    # user's usage changes folded into the counts by the same statement); then
    # the row in place of the reservation, one statement (PostgreSQL: the DELETE a CTE of the
    # INSERT; SQLite: the INSERT, whose trigger deletes the reservation).
    # No second load of the user for the answer, no stale-reservation sweep.
    if _dialect(app) == "postgresql":
        assert [w.split()[0] for w in main] == ["SELECT", "WITH", "WITH"], main
    else:
        assert [w.split()[0] for w in main] == ["INSERT", "INSERT"], main
    assert not [w for w in main if w.startswith("SELECT users.id, users.public_id")], main
    # The rate: one upsert that counts and reads the window (a slice's first call also drops
    # the old slices).
    assert 1 <= len(rate) <= 2 and rate[0].startswith("INSERT INTO upstream_budget_buckets"), rate
    assert [w for e, w in seen if w == "COMMIT" and e == "a"] == ["COMMIT", "COMMIT"], seen


def test_one_process_creates_in_few_statements_in_all(make_app, make_user, bearer) -> None:
    """With the per-token rate in the process's memory, a create is two statements of its own
    on SQLite (the reservation, the row), three on PostgreSQL (the user's lock first), and the
    authentication's version read: three or four in all, two commits."""
    app = make_app(CLOUDFLARE_BATCH="auto", CLOUDFLARE_BATCH_RATE_SCOPE="process")
    app.config["TEST_BEARER"] = bearer(app, make_user("alice"))
    _quiet_token(app)
    seen = _count_one_create(app)
    statements_run = [s for s in seen if s[1] not in ("COMMIT", "ROLLBACK")]
    # + the version read counted above
    assert len(statements_run) == (3 if _dialect(app) == "postgresql" else 2), seen
    assert [s for s in seen if s[0] == "b"] == [], seen  # nothing on the budget's engine
    assert [w for _, w in seen if w == "COMMIT"] == ["COMMIT", "COMMIT"], seen


def test_an_idempotency_key_adds_its_claim_and_its_answer(make_app, make_user, bearer) -> None:
    """An `Idempotency-Key` costs one statement to claim a new key (its own commit, before
    the upstream call) and one to store the answer with the row; the claim's commit does not
    make the request load its user again."""
    app = make_app(CLOUDFLARE_BATCH="auto", CLOUDFLARE_BATCH_RATE_SCOPE="process")
    app.config["TEST_BEARER"] = bearer(app, make_user("alice"))
    _quiet_token(app)
    seen = _count_one_create(app, {"Idempotency-Key": "one-key"})
    words = [w for _, w in seen]
    assert words[:2] == ["INSERT INTO idempotency_keys (user_id,", "COMMIT"], seen
    assert [w for w in words if w.startswith("UPDATE idempotency_keys")], seen
    assert not [w for w in words if w.startswith("SELECT users.id, users.public_id")], seen
    statements_run = [w for w in words if w not in ("COMMIT", "ROLLBACK")]
    assert len(statements_run) == (5 if _dialect(app) == "postgresql" else 4), seen
    assert words.count("COMMIT") == 3, seen


def test_a_create_holds_no_connection_while_cloudflare_answers_and_begins_no_orm_transaction(
    make_app, make_user, bearer, monkeypatch
) -> None:
    """The reservation's connection goes back to the pool before Cloudflare is asked (a slow
    answer must not starve the pool), and the row's one statement runs on a connection of the
    unit of work's own, without an ORM session transaction around it."""
    app = make_app(CLOUDFLARE_BATCH="auto", CLOUDFLARE_BATCH_RATE_SCOPE="process")
    auth = bearer(app, make_user("alice"))
    _quiet_token(app)
    client = app.test_client()
    assert client.post(URL, json={}, headers=auth).status_code == 201  # fetches the token
    with app.app_context():
        engine = db.engine
    pool: Any = engine.pool
    held: list[int] = []
    real = CloudflareImages.direct_upload

    def direct_upload(self: CloudflareImages, *args: Any, **kwargs: Any) -> Any:
        held.append(pool.checkedout())  # then the real call, to the emulator
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CloudflareImages, "direct_upload", direct_upload)
    begun: list[object] = []

    def on_begin(session: Any, _transaction: Any) -> None:
        begun.append(session)

    sa.event.listen(sa.orm.Session, "after_transaction_create", on_begin)
    try:
        assert client.post(URL, json={}, headers=auth).status_code == 201
    finally:
        sa.event.remove(sa.orm.Session, "after_transaction_create", on_begin)
    assert held == [0]
    assert begun == [], begun
    assert pool.checkedout() == 0
    assert len(upload_rows(app)) == 2


def bearer_of(app: Flask) -> dict[str, str]:
    """The bearer header the test stored on its app."""
    auth: dict[str, str] = app.config["TEST_BEARER"]
    return auth


def _dialect(app: Flask) -> str:
    with app.app_context():
        return db.engine.dialect.name

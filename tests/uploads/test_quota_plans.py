"""The counts behind a create's quota check read counts, not the user's history: however many
uploads a user has, they read two bounded ranges of one index of the uploads table (drafts
past their expiry the worker has not marked yet; the hour the last 24 start in), from the index
alone (SQLite: a covering index; PostgreSQL: an index-only scan, once the table is vacuumed as
autovacuum keeps it), and the counts the triggers on uploads keep."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_migrate import upgrade

from broker import create_app
from broker.platform.db import db, utcnow
from broker.uploads import quotas
from broker.uploads.lifecycle import PENDING, READY
from broker.uploads.models import Upload
from tests import factories
from tests.conftest import base_config
from tests.support import databases

# The scratch-database fixture (tests/support/databases.py) (a module attribute pytest collects).
new_database = databases.new_database

UPLOADS = 600
NO_LIMIT = quotas.Quotas(pending=100_000_000, daily=100_000_000, stored=100_000_000)


@contextmanager
def explained(engine: sa.Engine, prefix: str) -> Iterator[None]:
    """Run every statement on `engine` as `prefix` + the statement (its plan, not its rows)."""

    def on_execute(*args: Any) -> tuple[str, Any]:
        _conn, _cursor, statement, parameters, *_ = args
        return prefix + statement, parameters

    sa.event.listen(engine, "before_cursor_execute", on_execute, retval=True)
    try:
        yield
    finally:
        sa.event.remove(engine, "before_cursor_execute", on_execute)


def _uploads(now: datetime, *user_ids: int) -> list[dict[str, Any]]:
    """UPLOADS rows per user: two profiles, pending and ready, made over two days, expiring
    over the next and the last half hour."""
    return [
        {
            "id": f"{owner:02d}{n:030d}",
            "user_id": owner,
            "image_id": f"image-{owner}-{n}",
            "profile": ("default", "avatar")[n % 2],
            "status": (PENDING, READY)[n // 2 % 2],
            "created_at": now - timedelta(hours=n % 48, minutes=1),
            "expires_at": now + timedelta(minutes=30 - n % 60, seconds=1),
            "status_changed_at": now,
        }
        for owner in user_ids
        for n in range(UPLOADS)
    ]


@pytest.fixture
def own_app(
    database_url: str, new_database: Callable[[str], str], tmp_path: Path
) -> Iterator[Flask]:
    """The app on a migrated database of its own: VACUUM marks pages all-visible only when no
    other transaction of the database is open, as the suite's other connections may be."""
    app = create_app(base_config(new_database(database_url), str(tmp_path)))
    with app.app_context():
        upgrade()
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


def _store(app: Flask, rows: list[dict[str, Any]]) -> None:
    with app.app_context(), db.engine.begin() as conn:
        conn.execute(sa.insert(Upload.__table__), rows)


def _vacuum(app: Flask) -> None:
    """Vacuum and analyze uploads on PostgreSQL, leaving every page all-visible."""
    with app.app_context(), db.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # PostgreSQL plans an index-only scan only for pages its visibility map knows
            # all-visible, and needs statistics to prefer an index: what autovacuum keeps.
            autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
            autocommit.execute(sa.text("VACUUM ANALYZE uploads"))
            pages = autocommit.execute(
                sa.text("SELECT relpages, relallvisible FROM pg_class WHERE relname = 'uploads'")
            ).one()
            assert pages.relallvisible == pages.relpages > 0, "VACUUM left pages not all-visible"


def _uploads_scans(app: Flask, user_id: int, now: datetime) -> list[str]:
    """How the plan of the quota counts of `user_id` reads the uploads table: one entry per
    scan of it."""
    params = quotas._usage(NO_LIMIT, user_id, "not-a-reservation", now)
    with app.app_context(), db.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            with explained(db.engine, "EXPLAIN QUERY PLAN "):
                rows = conn.execute(quotas._usage_query(), params).all()
            return [row[-1] for row in rows if str(row[-1]).startswith("SEARCH uploads ")]
        # What a create runs there: the reservation with its counts and the fold (explained,
        # not run).
        limits = quotas._limits(NO_LIMIT)
        with explained(db.engine, "EXPLAIN (FORMAT JSON) "):
            plan = conn.execute(quotas._reserving_if_room(), {**params, **limits}).scalar()
    return [
        f"{node['Node Type']} {node.get('Index Name')} | {node.get('Index Cond')}"
        for node in _nodes(json.loads(plan) if isinstance(plan, str) else plan)
        if node.get("Relation Name") == "uploads"
    ]


def _nodes(plan: Any) -> Iterator[dict[str, Any]]:
    """Every node of a PostgreSQL JSON plan."""
    if isinstance(plan, list):
        for item in plan:
            yield from _nodes(item)
    elif isinstance(plan, dict):
        if "Node Type" in plan:
            yield plan
        for value in plan.values():
            yield from _nodes(value)


def test_the_quota_counts_read_two_bounded_ranges_of_uploads_from_an_index(own_app: Flask) -> None:
    now = utcnow()
    alice, bob, carol = (factories.create_user(own_app, n).id for n in ("alice", "bob", "carol"))
    _store(own_app, _uploads(now, alice, bob, carol))
    _vacuum(own_app)
    scans = _uploads_scans(own_app, alice, now)
    with own_app.app_context():
        sqlite = db.engine.dialect.name == "sqlite"
    # Drafts past their expiry (read for the drafts waiting and for the images kept), and the
    # uploads of the hour the last 24 hours start in: each range bounded by the index's
    # columns, never the user's whole history.
    if sqlite:
        assert set(scans) == {
            "SEARCH uploads USING COVERING INDEX ix_uploads_user_profile_status"
            " (user_id=? AND profile=? AND status=? AND expires_at<?)",
            "SEARCH uploads USING COVERING INDEX ix_uploads_user_created"
            " (user_id=? AND created_at>? AND created_at<?)",
        }, scans
    else:
        by_index = {scan.split(" | ")[0]: scan for scan in scans}
        assert set(by_index) == {
            "Index Only Scan ix_uploads_user_profile_status",
            "Index Only Scan ix_uploads_user_created",
        }, scans
        assert "expires_at <=" in by_index["Index Only Scan ix_uploads_user_profile_status"]
        assert "created_at <" in by_index["Index Only Scan ix_uploads_user_created"], scans
    assert len(scans) == 3, scans


def test_the_quota_counts_count_the_users_uploads_of_the_profile(app, make_user) -> None:
    now = utcnow()
    alice, bob = (make_user(name).id for name in ("alice", "bob"))
    rows = _uploads(now, alice, bob)
    # Exactly at the boundaries: a draft expiring now is no longer live; an upload made exactly
    # a day ago no longer counts in the last 24 hours.
    edge = {**rows[0], "profile": "default", "status": PENDING, "created_at": now - quotas.DAY}
    rows.append({**edge, "id": "edge-expired", "image_id": "edge-1", "expires_at": now})
    rows.append({**edge, "id": "edge-a-day-ago", "image_id": "edge-2"})
    _store(app, rows)
    mine = [r for r in rows if r["user_id"] == alice and r["profile"] == "default"]
    live = [r for r in mine if r["status"] == PENDING and r["expires_at"] > now]
    expected = (
        len(live),
        sum(r["created_at"] > now - quotas.DAY for r in mine),
        0,
        len(live) + sum(r["status"] == READY for r in mine),
    )
    params = quotas._usage(NO_LIMIT, alice, "not-a-reservation", now)
    with app.app_context(), db.engine.connect() as conn:
        postgres = conn.dialect.name == "postgresql"
        # PostgreSQL: the changes the triggers appended, not folded in yet, then folded in.
        assert tuple(conn.execute(quotas._usage_query(unfolded=postgres), params).one()) == expected
        assert quotas.fold_usage_changes(conn, now) == (len(rows) if postgres else 0)
        assert tuple(conn.execute(quotas._usage_query(), params).one()) == expected
        assert quotas.recorded_usage(conn, alice, "default", now) == (
            expected[0],
            expected[1],
            expected[3],
        )

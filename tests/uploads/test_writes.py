"""What one `POST /api/v1/uploads` costs the database: two write transactions (reserve and
pay for the upstream call, then store the row), and exactly one budget call per create."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from flask import Flask

from broker.auth.models import ApiToken
from broker.platform.db import db, utcnow
from broker.uploads.models import UploadReservation
from broker.upstream.budget import get_budget

URL = "/api/v1/uploads"
_WRITES = ("INSERT", "UPDATE", "DELETE")


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

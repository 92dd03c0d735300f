"""`new_database`: scratch databases made and dropped per test (upgrades, backup and restore).

A fixture module: tests/platform/conftest.py and tests/system/test_operations.py take it in.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa


def _server_engine(url: str) -> sa.Engine:
    """An autocommit engine on the server's `postgres` database (CREATE/DROP DATABASE)."""
    admin = sa.make_url(url).set(database="postgres")
    return sa.create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


@pytest.fixture
def new_database(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """`new_database(like_url)`: a new empty database on the same server as `like_url` (a new
    SQLite file for a SQLite URL); dropped at the end of the test."""
    made: list[sa.URL] = []

    def make(like_url: str) -> str:
        url = sa.make_url(like_url)
        if url.get_backend_name() == "sqlite":
            return f"sqlite:///{tmp_path}/scratch-{len(made)}.sqlite3"
        name = f"ops_scratch_{uuid.uuid4().hex[:12]}"
        engine = _server_engine(like_url)
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        made.append(url.set(database=name))
        return made[-1].render_as_string(hide_password=False)

    yield make
    for url in made:
        engine = _server_engine(url.render_as_string(hide_password=False))
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
        engine.dispose()

"""The database: migrations build exactly the models' schema; failing statements hide their
parameters."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from flask import Flask

from broker.platform.db import MIGRATIONS_DIR, db


def test_migrations_match_models(app):
    with app.app_context(), db.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "render_as_batch": True}
        )
        diff = compare_metadata(context, db.metadata)
    assert diff == []


def test_single_migration_head():
    heads = ScriptDirectory(MIGRATIONS_DIR).get_heads()
    assert len(heads) == 1, f"several migration heads: {heads}"


def test_database_errors_do_not_carry_bound_values(app: Flask) -> None:
    """A failing statement's message (logged with the traceback of a 500) hides its parameters,
    so a webhook secret or signing key being written never reaches the log."""
    secret = "whsec_c2VjcmV0LXRoYXQtbXVzdC1ub3QtbGVhaw=="
    with app.app_context():
        with pytest.raises(sa.exc.DBAPIError) as caught:
            db.session.execute(sa.text("INSERT INTO no_such_table VALUES (:v)"), {"v": secret})
        db.session.rollback()
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value)

"""encrypt webhook secrets and signing key values at rest

Encrypts the values already stored with the app's keyring (BROKER_ENCRYPTION_KEYS, or the
development key under instance/): `flask db upgrade` runs inside the app, so the migration uses
the same key the app will read with.

Revision ID: 01c1f0d03ad7
Revises: 64d9447d37fc
Create Date: 2026-11-29 17:39:36.246804

"""
from collections.abc import Callable

from alembic import op
import sqlalchemy as sa

import broker.platform.db  # noqa: F401  (custom column types)
from broker.platform.encryption import current_keyring


# revision identifiers, used by Alembic.
revision = '01c1f0d03ad7'
down_revision = '64d9447d37fc'
branch_labels = None
depends_on = None

# (table, column, length of the plain-text column before this revision)
COLUMNS = (
    ('signing_keys', 'value', 255),
    ('webhook_endpoints', 'secret', 128),
    ('webhook_endpoints', 'previous_secret', 128),
)


def _rewrite(convert: Callable[[str], str]) -> None:
    """Pass every stored value of COLUMNS through `convert`."""
    conn = op.get_bind()
    for table_name, column, _ in COLUMNS:
        table = sa.table(table_name, sa.column('id'), sa.column(column))
        rows = conn.execute(
            sa.select(table.c.id, table.c[column]).where(table.c[column].is_not(None))
        ).all()
        for ident, value in rows:
            conn.execute(
                sa.update(table).where(table.c.id == ident).values({column: convert(value)})
            )


def upgrade():
    for table_name, column, length in COLUMNS:
        with op.batch_alter_table(table_name, schema=None) as batch_op:
            batch_op.alter_column(column, existing_type=sa.VARCHAR(length=length), type_=sa.Text())
    _rewrite(current_keyring().encrypt)


def downgrade():
    _rewrite(current_keyring().decrypt)
    for table_name, column, length in COLUMNS:
        with op.batch_alter_table(table_name, schema=None) as batch_op:
            batch_op.alter_column(column, existing_type=sa.Text(), type_=sa.VARCHAR(length=length))

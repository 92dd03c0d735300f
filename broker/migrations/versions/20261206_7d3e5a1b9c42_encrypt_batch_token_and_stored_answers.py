"""encrypt the batch token and stored idempotent answers at rest

The batch API token (able to list, change and delete images for an hour) and the answers kept
for `Idempotency-Key` replays (a create's holds its one-time `upload_url`) join the webhook
secrets and signing keys under BROKER_ENCRYPTION_KEYS. Both columns are text already; the rows
stored before this revision are encrypted with the app's keyring (`flask db upgrade` runs inside
the app), and decrypted again on downgrade.

Revision ID: 7d3e5a1b9c42
Revises: 5e1f0c2a9b7d
Create Date: 2026-12-06 17:40:00.000000

"""
from collections.abc import Callable

from alembic import op
import sqlalchemy as sa

from broker.platform.encryption import current_keyring


# revision identifiers, used by Alembic.
revision = '7d3e5a1b9c42'
down_revision = '5e1f0c2a9b7d'
branch_labels = None
depends_on = None

# (table, its key column, the column now encrypted)
COLUMNS = (
    ('upstream_batch_tokens', 'scope', 'token'),
    ('idempotency_keys', 'id', 'response_body'),
)


def _rewrite(convert: Callable[[str], str]) -> None:
    """Pass every stored value of COLUMNS through `convert` (untyped columns: as stored)."""
    conn = op.get_bind()
    for table_name, key, column in COLUMNS:
        table = sa.table(table_name, sa.column(key), sa.column(column))
        rows = conn.execute(
            sa.select(table.c[key], table.c[column]).where(table.c[column].is_not(None))
        ).all()
        for ident, value in rows:
            conn.execute(
                sa.update(table).where(table.c[key] == ident).values({column: convert(value)})
            )


def upgrade():
    _rewrite(current_keyring().encrypt)


def downgrade():
    _rewrite(current_keyring().decrypt)

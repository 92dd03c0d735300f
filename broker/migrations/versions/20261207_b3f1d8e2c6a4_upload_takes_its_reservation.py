"""an upload row takes its reservation's slot by itself on SQLite

Revision ID: b3f1d8e2c6a4
Revises: b3f9d2e6a815
Create Date: 2026-12-07 02:20:00.000000

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = 'b3f1d8e2c6a4'
down_revision = 'b3f9d2e6a815'
branch_labels = None
depends_on = None

# SQLite only: there one statement cannot both insert and delete, and each statement of the
# create's second transaction holds the database's one write lock. PostgreSQL carries the
# DELETE as a CTE of the INSERT (broker.uploads.create), with no trigger function to keep.
# Named in TRIGGER for the drift check (tests/platform/test_db.py), which fails when a later
# revision loses it: a SQLite batch_alter_table('uploads') recreates the table without it.
TRIGGER = 'uploads_take_reservation'


def upgrade():
    if op.get_bind().dialect.name != 'sqlite':
        return
    op.execute(
        f'CREATE TRIGGER {TRIGGER} AFTER INSERT ON uploads '
        'BEGIN DELETE FROM upload_reservations WHERE id = NEW.id; END'
    )


def downgrade():
    if op.get_bind().dialect.name != 'sqlite':
        return
    op.execute(f'DROP TRIGGER IF EXISTS {TRIGGER}')

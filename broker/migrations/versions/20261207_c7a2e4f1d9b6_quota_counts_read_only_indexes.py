"""a create's quota counts read only indexes, not the uploads table

Revision ID: c7a2e4f1d9b6
Revises: b3f1d8e2c6a4
Create Date: 2026-12-07 09:50:00.000000

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = 'c7a2e4f1d9b6'
down_revision = 'b3f1d8e2c6a4'
branch_labels = None
depends_on = None

# Each index gains the column its count filters on last (expires_at: live drafts; profile:
# uploads of the last 24 hours), so the counts stop reading a table row per upload. Widened,
# not added: an insert still writes as many indexes as before. Plain op.create_index, not a
# batch: a SQLite batch_alter_table('uploads') would recreate the table and lose its trigger.
OLD = {
    'ix_uploads_user_profile_status': ['user_id', 'profile', 'status'],
    'ix_uploads_user_created': ['user_id', 'created_at', 'id'],
}
NEW = {
    'ix_uploads_user_profile_status': ['user_id', 'profile', 'status', 'expires_at'],
    'ix_uploads_user_created': ['user_id', 'created_at', 'id', 'profile'],
}


def _replace(indexes):
    if op.get_bind().dialect.name != 'postgresql':
        for name, columns in indexes.items():
            op.drop_index(name, table_name='uploads')
            op.create_index(name, 'uploads', columns, unique=False)
        return
    # The upgrade is one transaction: a DROP INDEX first would hold ACCESS EXCLUSIVE on uploads
    # (reads wait too) through both builds. Build under temporary names (SHARE: reads go on,
    # writes wait), and only then drop and rename. Waiting behind a long transaction for a lock
    # would queue every request behind this one: fail after 5 s instead, and run it again. A
    # shorter lock_timeout the connection already has (PGOPTIONS, the role's) is kept.
    op.execute(
        "SELECT set_config('lock_timeout', '5s', true)"
        " WHERE current_setting('lock_timeout')::interval NOT BETWEEN '1 ms' AND '5 s'"
    )
    for name, columns in indexes.items():
        op.create_index(f'{name}_build', 'uploads', columns, unique=False)
    for name in indexes:
        op.drop_index(name, table_name='uploads')
        op.execute(f'ALTER INDEX {name}_build RENAME TO {name}')
    op.execute('SET LOCAL lock_timeout TO DEFAULT')


def upgrade():
    _replace(NEW)


def downgrade():
    _replace(OLD)

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
    for name, columns in indexes.items():
        op.drop_index(name, table_name='uploads')
        op.create_index(name, 'uploads', columns, unique=False)


def upgrade():
    _replace(NEW)


def downgrade():
    _replace(OLD)

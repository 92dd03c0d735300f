"""upload profiles: each upload's profile, replace mode, custom ids reusable once gone

Revision ID: 5a1e9c0b7d21
Revises: 7a1e5c0d9b21
Create Date: 2026-12-06 17:45:00

"""
from alembic import op
import sqlalchemy as sa

import broker.platform.db  # noqa: F401  (custom column types)


# revision identifiers, used by Alembic.
revision = '5a1e9c0b7d21'
down_revision = '7a1e5c0d9b21'
branch_labels = None
depends_on = None

LIVE = "status IN ('pending', 'ready')"


def upgrade():
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.add_column(sa.Column('profile', sa.String(length=32), server_default='default', nullable=False))
        batch_op.add_column(sa.Column('replaced_by', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('replace_at', broker.platform.db.UTCDateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f('ix_uploads_replace_at'), ['replace_at'], unique=False)
        batch_op.create_index('ix_uploads_user_profile_status', ['user_id', 'profile', 'status'], unique=False)
        batch_op.drop_constraint(batch_op.f('uq_uploads_image_id'), type_='unique')
    # Outside the batch: a partial index, which SQLite's table copy would not carry over.
    op.create_index(
        'uq_uploads_live_image_id', 'uploads', ['image_id'], unique=True,
        sqlite_where=sa.text(LIVE), postgresql_where=sa.text(LIVE),
    )
    with op.batch_alter_table('upload_reservations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('profile', sa.String(length=32), server_default='default', nullable=False))


def downgrade():
    with op.batch_alter_table('upload_reservations', schema=None) as batch_op:
        batch_op.drop_column('profile')
    op.drop_index('uq_uploads_live_image_id', table_name='uploads')
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.create_unique_constraint(batch_op.f('uq_uploads_image_id'), ['image_id'])
        batch_op.drop_index('ix_uploads_user_profile_status')
        batch_op.drop_index(batch_op.f('ix_uploads_replace_at'))
        batch_op.drop_column('replace_at')
        batch_op.drop_column('replaced_by')
        batch_op.drop_column('profile')

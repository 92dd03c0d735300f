"""erasures

Revision ID: c4e8f1a2d6b3
Revises: a7d1e3c5b9f2
Create Date: 2026-12-06 18:00:00.000000

"""
from alembic import op
import sqlalchemy as sa

import broker.platform.db  # noqa: F401  (custom column types)


# revision identifiers, used by Alembic.
revision = 'c4e8f1a2d6b3'
down_revision = 'a7d1e3c5b9f2'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('erasures',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('public_id', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('requested_at', broker.platform.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('requested_by', sa.String(length=200), nullable=False),
    sa.Column('completed_at', broker.platform.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('images_deleted', sa.Integer(), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('next_at', broker.platform.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('lease_holder', sa.String(length=64), nullable=True),
    sa.Column('lease_until', broker.platform.db.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_erasures_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_erasures')),
    sa.UniqueConstraint('user_id', name=op.f('uq_erasures_user_id'))
    )
    op.create_index('ix_erasures_status_next', 'erasures', ['status', 'next_at'], unique=False)


def downgrade():
    op.drop_index('ix_erasures_status_next', table_name='erasures')
    op.drop_table('erasures')

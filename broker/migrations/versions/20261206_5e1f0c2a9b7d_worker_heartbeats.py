"""worker heartbeats: each running worker's last loop, for /metrics and its healthcheck

Revision ID: 5e1f0c2a9b7d
Revises: 33dacf6e6ba4
Create Date: 2026-12-06 17:45:00.000000

"""
from alembic import op
import sqlalchemy as sa

import broker.platform.db  # noqa: F401  (custom column types)


# revision identifiers, used by Alembic.
revision = '5e1f0c2a9b7d'
down_revision = '33dacf6e6ba4'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('worker_heartbeats',
    sa.Column('worker_id', sa.String(length=64), nullable=False),
    sa.Column('host', sa.String(length=64), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', broker.platform.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('beat_at', broker.platform.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('worker_id', name=op.f('pk_worker_heartbeats'))
    )
    with op.batch_alter_table('worker_heartbeats', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_worker_heartbeats_host'), ['host'], unique=False)


def downgrade():
    with op.batch_alter_table('worker_heartbeats', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_worker_heartbeats_host'))
    op.drop_table('worker_heartbeats')

"""reconcile reports and cloudflare usage

Revision ID: e2b7c9d4a1f6
Revises: c4e8f1a2d6b3
Create Date: 2026-12-06 18:20:00.000000

"""
from alembic import op
import sqlalchemy as sa

import broker.platform.db  # noqa: F401  (custom column types)


# revision identifiers, used by Alembic.
revision = 'e2b7c9d4a1f6'
down_revision = 'c4e8f1a2d6b3'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('reconcile_reports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('started_at', broker.platform.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('finished_at', broker.platform.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('dry_run', sa.Boolean(), nullable=False),
    sa.Column('complete', sa.Boolean(), nullable=False),
    sa.Column('listed', sa.Integer(), nullable=False),
    sa.Column('orphans', sa.Integer(), nullable=False),
    sa.Column('adopted', sa.Integer(), nullable=False),
    sa.Column('orphans_deleted', sa.Integer(), nullable=False),
    sa.Column('ready_gone', sa.Integer(), nullable=False),
    sa.Column('drafts_gone', sa.Integer(), nullable=False),
    sa.Column('too_recent', sa.Integer(), nullable=False),
    sa.Column('problem', sa.String(length=500), nullable=True),
    sa.Column('details', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reconcile_reports'))
    )
    op.create_index(op.f('ix_reconcile_reports_started_at'), 'reconcile_reports', ['started_at'], unique=False)
    op.create_table('cloudflare_usage',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('current', sa.Integer(), nullable=False),
    sa.Column('allowed', sa.Integer(), nullable=False),
    sa.Column('checked_at', broker.platform.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cloudflare_usage'))
    )


def downgrade():
    op.drop_table('cloudflare_usage')
    op.drop_index(op.f('ix_reconcile_reports_started_at'), table_name='reconcile_reports')
    op.drop_table('reconcile_reports')

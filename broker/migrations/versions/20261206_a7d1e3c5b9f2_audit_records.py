"""audit records

Revision ID: a7d1e3c5b9f2
Revises: 5a1e9c0b7d21
Create Date: 2026-12-06 17:50:00.000000

"""
from alembic import op
import sqlalchemy as sa

import broker.platform.db  # noqa: F401  (custom column types)


# revision identifiers, used by Alembic.
revision = 'a7d1e3c5b9f2'
down_revision = '5a1e9c0b7d21'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('audit_records',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', broker.platform.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('target', sa.String(length=255), nullable=True),
    sa.Column('request_id', sa.String(length=64), nullable=True),
    sa.Column('before', sa.JSON(), nullable=True),
    sa.Column('after', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_records'))
    )
    op.create_index('ix_audit_records_at', 'audit_records', ['at', 'id'], unique=False)
    op.create_index(op.f('ix_audit_records_action'), 'audit_records', ['action'], unique=False)


def downgrade():
    op.drop_index(op.f('ix_audit_records_action'), table_name='audit_records')
    op.drop_index('ix_audit_records_at', table_name='audit_records')
    op.drop_table('audit_records')

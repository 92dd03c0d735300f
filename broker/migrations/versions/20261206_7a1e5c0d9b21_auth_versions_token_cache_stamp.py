"""auth_versions: the stamp that tells every process to drop its cached tokens

Revision ID: 7a1e5c0d9b21
Revises: 5e1a2b3c4d5e
Create Date: 2026-12-06 17:40:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '7a1e5c0d9b21'
down_revision = '5e1a2b3c4d5e'
branch_labels = None
depends_on = None


def upgrade():
    # No row yet: the first change inserts it, and an absent row reads as version 0.
    op.create_table('auth_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_auth_versions'))
    )


def downgrade():
    op.drop_table('auth_versions')

"""uploads.upstream_refusal: why Cloudflare refused the last file sent to the upload URL

Revision ID: 5e1a2b3c4d5e
Revises: 7d3e5a1b9c42
Create Date: 2026-12-06 17:45:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '5e1a2b3c4d5e'
down_revision = '7d3e5a1b9c42'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.add_column(sa.Column('upstream_refusal', sa.JSON(), nullable=True))


def downgrade():
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.drop_column('upstream_refusal')

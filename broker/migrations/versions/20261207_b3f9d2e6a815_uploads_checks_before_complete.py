"""uploads.checks_before_complete: `/complete`'s Retry-After grows from the client's first call

Revision ID: b3f9d2e6a815
Revises: e2b7c9d4a1f6
Create Date: 2026-12-07 02:30:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'b3f9d2e6a815'
down_revision = 'e2b7c9d4a1f6'
branch_labels = None
depends_on = None


def upgrade():
    # NULL until the client's first `/complete`: existing uploads start counting at their next.
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.add_column(sa.Column('checks_before_complete', sa.Integer(), nullable=True))


def downgrade():
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.drop_column('checks_before_complete')

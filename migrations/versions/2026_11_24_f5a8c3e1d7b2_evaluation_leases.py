"""evaluation leases: claims used, lease token and expiry, last enqueue

Revision ID: f5a8c3e1d7b2
Revises: e4b7c1d8f2a6
Create Date: 2026-11-24 23:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'f5a8c3e1d7b2'
down_revision = 'e4b7c1d8f2a6'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('evaluation', schema=None) as batch_op:
        # Existing rows start with no claim counted; the model sets the value from then on.
        batch_op.add_column(sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('lease_token', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('evaluation', schema=None) as batch_op:
        batch_op.alter_column('attempts', server_default=None)


def downgrade() -> None:
    with op.batch_alter_table('evaluation', schema=None) as batch_op:
        batch_op.drop_column('enqueued_at')
        batch_op.drop_column('lease_expires_at')
        batch_op.drop_column('lease_token')
        batch_op.drop_column('attempts')

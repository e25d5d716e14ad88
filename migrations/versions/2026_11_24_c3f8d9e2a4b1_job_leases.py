"""job leases: lease token, lease expiry and the holder's pending stop request, last enqueue

Revision ID: c3f8d9e2a4b1
Revises: d2cfa10f9c08
Create Date: 2026-11-24 21:20:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = 'c3f8d9e2a4b1'
down_revision = 'd2cfa10f9c08'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('fine_tuning_job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_token', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('stop_request', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('fine_tuning_job', schema=None) as batch_op:
        batch_op.drop_column('enqueued_at')
        batch_op.drop_column('stop_request')
        batch_op.drop_column('lease_expires_at')
        batch_op.drop_column('lease_token')

"""file lifecycle: files' expires_at, jobs' result_files

Revision ID: b41e7d2c9a58
Revises: 7c2e9a4f1b60
Create Date: 2026-12-02 06:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'b41e7d2c9a58'
down_revision = '7c2e9a4f1b60'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Files uploaded before this revision keep NULL: they never expire.
    with op.batch_alter_table('file', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f('ix_file_expires_at'), ['expires_at'], unique=False)
    with op.batch_alter_table('fine_tuning_job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('result_files', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('fine_tuning_job', schema=None) as batch_op:
        batch_op.drop_column('result_files')
    with op.batch_alter_table('file', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_file_expires_at'))
        batch_op.drop_column('expires_at')

"""cost limits: per-team token and wall-time overrides, base models' context length, evaluation stop requests

Revision ID: 7c2e9a4f1b60
Revises: 365a013db8c0
Create Date: 2026-12-02 02:20:00
"""
from alembic import op
import sqlalchemy as sa


revision = '7c2e9a4f1b60'
down_revision = '365a013db8c0'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('team_quota', schema=None) as batch_op:
        batch_op.add_column(sa.Column('trained_tokens', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('job_wall_seconds', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('evaluation_wall_seconds', sa.Integer(), nullable=True))
    # Models registered before this revision keep NULL: their config.json is read when a job needs it.
    with op.batch_alter_table('base_model', schema=None) as batch_op:
        batch_op.add_column(sa.Column('context_length', sa.Integer(), nullable=True))
    with op.batch_alter_table('evaluation', schema=None) as batch_op:
        batch_op.add_column(sa.Column('stop_request', sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('evaluation', schema=None) as batch_op:
        batch_op.drop_column('stop_request')
    with op.batch_alter_table('base_model', schema=None) as batch_op:
        batch_op.drop_column('context_length')
    with op.batch_alter_table('team_quota', schema=None) as batch_op:
        batch_op.drop_column('evaluation_wall_seconds')
        batch_op.drop_column('job_wall_seconds')
        batch_op.drop_column('trained_tokens')

"""fine-tuning checkpoints: resumable training checkpoints of jobs in blob storage

Revision ID: a9d2e6f1c7b3
Revises: c3f8d9e2a4b1
Create Date: 2026-11-24 21:30:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = 'a9d2e6f1c7b3'
down_revision = 'c3f8d9e2a4b1'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('fine_tuning_checkpoint',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('team_id', sa.String(length=40), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('storage_prefix', sa.String(length=512), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['fine_tuning_job.id'], name=op.f('fk_fine_tuning_checkpoint_job_id_fine_tuning_job'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['team_id'], ['team.id'], name=op.f('fk_fine_tuning_checkpoint_team_id_team'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fine_tuning_checkpoint'))
    )
    with op.batch_alter_table('fine_tuning_checkpoint', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_fine_tuning_checkpoint_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_fine_tuning_checkpoint_team_id'), ['team_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('fine_tuning_checkpoint', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_fine_tuning_checkpoint_team_id'))
        batch_op.drop_index(batch_op.f('ix_fine_tuning_checkpoint_job_id'))
    op.drop_table('fine_tuning_checkpoint')

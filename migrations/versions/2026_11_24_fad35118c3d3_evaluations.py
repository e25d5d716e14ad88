"""evaluations

Revision ID: fad35118c3d3
Revises: 0b7f9301b471
Create Date: 2026-11-24 19:21:54.538928
"""
from alembic import op
import sqlalchemy as sa


revision = 'fad35118c3d3'
down_revision = '0b7f9301b471'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('evaluation',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('team_id', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=True),
    sa.Column('role', sa.String(length=16), nullable=True),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('model', sa.String(length=255), nullable=True),
    sa.Column('base_model', sa.String(length=128), nullable=True),
    sa.Column('adapter_id', sa.String(length=40), nullable=True),
    sa.Column('tasks', sa.String(length=64), nullable=False),
    sa.Column('completions_file', sa.String(length=40), nullable=True),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('results_key', sa.String(length=512), nullable=True),
    sa.Column('error', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapter.id'], name=op.f('fk_evaluation_adapter_id_adapter'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['base_model'], ['base_model.id'], name=op.f('fk_evaluation_base_model_base_model')),
    sa.ForeignKeyConstraint(['job_id'], ['fine_tuning_job.id'], name=op.f('fk_evaluation_job_id_fine_tuning_job'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['team_id'], ['team.id'], name=op.f('fk_evaluation_team_id_team'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_evaluation'))
    )
    with op.batch_alter_table('evaluation', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_evaluation_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluation_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluation_team_id'), ['team_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('evaluation', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_evaluation_team_id'))
        batch_op.drop_index(batch_op.f('ix_evaluation_status'))
        batch_op.drop_index(batch_op.f('ix_evaluation_job_id'))

    op.drop_table('evaluation')

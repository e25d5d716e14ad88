"""auto_iterate rounds

Revision ID: d2cfa10f9c08
Revises: fad35118c3d3
Create Date: 2026-11-24 19:32:13.866792
"""
from alembic import op
import sqlalchemy as sa


revision = 'd2cfa10f9c08'
down_revision = 'fad35118c3d3'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('fine_tuning_job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent_job_id', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('round', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_fine_tuning_job_parent_job_id'), ['parent_job_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_fine_tuning_job_parent_job_id_fine_tuning_job'), 'fine_tuning_job', ['parent_job_id'], ['id'], ondelete='SET NULL')



def downgrade() -> None:
    with op.batch_alter_table('fine_tuning_job', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_fine_tuning_job_parent_job_id_fine_tuning_job'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_fine_tuning_job_parent_job_id'))
        batch_op.drop_column('round')
        batch_op.drop_column('parent_job_id')


"""inference endpoints

Revision ID: e4b7c1d8f2a6
Revises: b7e41a2c9d01
Create Date: 2026-11-24 21:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'e4b7c1d8f2a6'
down_revision = 'b7e41a2c9d01'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'inference_endpoint',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('base_model', sa.String(length=128), nullable=False),
        sa.Column('url', sa.String(length=512), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['base_model'], ['base_model.id'],
                                name=op.f('fk_inference_endpoint_base_model_base_model'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_inference_endpoint')),
        sa.UniqueConstraint('url', name=op.f('uq_inference_endpoint_url')),
    )
    with op.batch_alter_table('inference_endpoint', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_inference_endpoint_base_model'), ['base_model'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('inference_endpoint', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inference_endpoint_base_model'))
    op.drop_table('inference_endpoint')

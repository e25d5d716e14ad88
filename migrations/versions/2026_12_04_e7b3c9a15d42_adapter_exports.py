"""adapter_export: adapters written out as merged safetensors or GGUF, by a worker under a lease

Revision ID: e7b3c9a15d42
Revises: 8a3f5c2e7d19
Create Date: 2026-12-04 09:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'e7b3c9a15d42'
down_revision = '8a3f5c2e7d19'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'adapter_export',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('team_id', sa.String(length=40), nullable=False),
        sa.Column('adapter_id', sa.String(length=40), nullable=False),
        sa.Column('format', sa.String(length=16), nullable=False),
        sa.Column('precision', sa.String(length=16), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('storage_key', sa.String(length=512), nullable=False),
        sa.Column('bytes', sa.BigInteger(), nullable=True),
        sa.Column('sha256', sa.String(length=64), nullable=True),
        sa.Column('error', sa.JSON(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('lease_token', sa.String(length=64), nullable=True),
        sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['adapter_id'], ['adapter.id'], name=op.f('fk_adapter_export_adapter_id_adapter'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['team_id'], ['team.id'], name=op.f('fk_adapter_export_team_id_team'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_adapter_export')),
    )
    with op.batch_alter_table('adapter_export', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapter_export_adapter_id'), ['adapter_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapter_export_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapter_export_team_id'), ['team_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('adapter_export', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapter_export_team_id'))
        batch_op.drop_index(batch_op.f('ix_adapter_export_status'))
        batch_op.drop_index(batch_op.f('ix_adapter_export_adapter_id'))
    op.drop_table('adapter_export')

"""initial schema

Revision ID: 0b7f9301b471
Revises: 
Create Date: 2026-11-24 18:46:16.552982
"""
from alembic import op
import sqlalchemy as sa


revision = '0b7f9301b471'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('base_model',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('path', sa.String(length=1024), nullable=False),
    sa.Column('architecture', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_base_model'))
    )
    op.create_table('team',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_team')),
    sa.UniqueConstraint('name', name=op.f('uq_team_name'))
    )
    op.create_table('api_key',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('team_id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=32), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['team_id'], ['team.id'], name=op.f('fk_api_key_team_id_team'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_key')),
    sa.UniqueConstraint('prefix', name=op.f('uq_api_key_prefix'))
    )
    with op.batch_alter_table('api_key', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_key_team_id'), ['team_id'], unique=False)

    op.create_table('file',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('team_id', sa.String(length=40), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('purpose', sa.String(length=32), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('format', sa.String(length=32), nullable=False),
    sa.Column('examples', sa.Integer(), nullable=False),
    sa.Column('storage_key', sa.String(length=512), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['team_id'], ['team.id'], name=op.f('fk_file_team_id_team'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_file'))
    )
    with op.batch_alter_table('file', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_file_team_id'), ['team_id'], unique=False)

    op.create_table('fine_tuning_job',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('team_id', sa.String(length=40), nullable=False),
    sa.Column('model', sa.String(length=128), nullable=False),
    sa.Column('training_file', sa.String(length=40), nullable=False),
    sa.Column('validation_file', sa.String(length=40), nullable=True),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('suffix', sa.String(length=64), nullable=True),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=True),
    sa.Column('fine_tuned_model', sa.String(length=255), nullable=True),
    sa.Column('trained_tokens', sa.BigInteger(), nullable=True),
    sa.Column('error', sa.JSON(), nullable=True),
    sa.Column('usage', sa.JSON(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('worker_id', sa.String(length=255), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('estimated_finish', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['model'], ['base_model.id'], name=op.f('fk_fine_tuning_job_model_base_model')),
    sa.ForeignKeyConstraint(['team_id'], ['team.id'], name=op.f('fk_fine_tuning_job_team_id_team'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fine_tuning_job'))
    )
    with op.batch_alter_table('fine_tuning_job', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_fine_tuning_job_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_fine_tuning_job_team_id'), ['team_id'], unique=False)

    op.create_table('idempotency_key',
    sa.Column('team_id', sa.String(length=40), nullable=False),
    sa.Column('endpoint', sa.String(length=64), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('object_id', sa.String(length=40), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['team_id'], ['team.id'], name=op.f('fk_idempotency_key_team_id_team'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('team_id', 'endpoint', 'key', name=op.f('pk_idempotency_key'))
    )
    op.create_table('adapter',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('team_id', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=True),
    sa.Column('base_model', sa.String(length=128), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('storage_prefix', sa.String(length=512), nullable=False),
    sa.Column('archive_key', sa.String(length=512), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['base_model'], ['base_model.id'], name=op.f('fk_adapter_base_model_base_model')),
    sa.ForeignKeyConstraint(['job_id'], ['fine_tuning_job.id'], name=op.f('fk_adapter_job_id_fine_tuning_job'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['team_id'], ['team.id'], name=op.f('fk_adapter_team_id_team'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_adapter')),
    sa.UniqueConstraint('job_id', name=op.f('uq_adapter_job_id')),
    sa.UniqueConstraint('name', name=op.f('uq_adapter_name'))
    )
    with op.batch_alter_table('adapter', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapter_team_id'), ['team_id'], unique=False)

    op.create_table('fine_tuning_job_event',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('level', sa.String(length=16), nullable=False),
    sa.Column('type', sa.String(length=16), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('data', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['fine_tuning_job.id'], name=op.f('fk_fine_tuning_job_event_job_id_fine_tuning_job'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fine_tuning_job_event'))
    )
    with op.batch_alter_table('fine_tuning_job_event', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_fine_tuning_job_event_job_id'), ['job_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('fine_tuning_job_event', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_fine_tuning_job_event_job_id'))

    op.drop_table('fine_tuning_job_event')
    with op.batch_alter_table('adapter', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapter_team_id'))

    op.drop_table('adapter')
    op.drop_table('idempotency_key')
    with op.batch_alter_table('fine_tuning_job', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_fine_tuning_job_team_id'))
        batch_op.drop_index(batch_op.f('ix_fine_tuning_job_status'))

    op.drop_table('fine_tuning_job')
    with op.batch_alter_table('file', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_file_team_id'))

    op.drop_table('file')
    with op.batch_alter_table('api_key', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_key_team_id'))

    op.drop_table('api_key')
    op.drop_table('team')
    op.drop_table('base_model')

"""uploads: files sent in parts (OpenAI's Uploads API)

Revision ID: 5d9e3a7c1f24
Revises: b41e7d2c9a58
Create Date: 2026-12-02 07:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '5d9e3a7c1f24'
down_revision = 'b41e7d2c9a58'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'upload',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('team_id', sa.String(length=40), nullable=False),
        sa.Column('filename', sa.String(length=255), nullable=False),
        sa.Column('purpose', sa.String(length=32), nullable=False),
        sa.Column('bytes', sa.BigInteger(), nullable=False),
        sa.Column('mime_type', sa.String(length=255), nullable=False),
        sa.Column('file_expires_after_seconds', sa.Integer(), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('file_id', sa.String(length=40), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['team_id'], ['team.id'], name=op.f('fk_upload_team_id_team'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['file_id'], ['file.id'], name=op.f('fk_upload_file_id_file'), ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_upload')),
    )
    with op.batch_alter_table('upload', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_upload_team_id'), ['team_id'], unique=False)
        batch_op.create_index('ix_upload_status_expires_at', ['status', 'expires_at'], unique=False)
    op.create_table(
        'upload_part',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('upload_id', sa.String(length=40), nullable=False),
        sa.Column('bytes', sa.BigInteger(), nullable=False),
        sa.Column('storage_key', sa.String(length=512), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['upload_id'], ['upload.id'], name=op.f('fk_upload_part_upload_id_upload'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_upload_part')),
    )
    with op.batch_alter_table('upload_part', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_upload_part_upload_id'), ['upload_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('upload_part', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_upload_part_upload_id'))
    op.drop_table('upload_part')
    with op.batch_alter_table('upload', schema=None) as batch_op:
        batch_op.drop_index('ix_upload_status_expires_at')
        batch_op.drop_index(batch_op.f('ix_upload_team_id'))
    op.drop_table('upload')

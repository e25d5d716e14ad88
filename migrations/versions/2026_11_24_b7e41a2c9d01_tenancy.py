"""tenancy: key roles, per-team quota overrides, append-only audit log

Revision ID: b7e41a2c9d01
Revises: a9d2e6f1c7b3
Create Date: 2026-11-24 21:30:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = 'b7e41a2c9d01'
down_revision = 'a9d2e6f1c7b3'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every key so far is a team's first key (made by create-team): those are the admin keys.
    with op.batch_alter_table('api_key', schema=None) as batch_op:
        batch_op.add_column(sa.Column('role', sa.String(length=16), nullable=False, server_default='admin'))
    with op.batch_alter_table('api_key', schema=None) as batch_op:
        batch_op.alter_column('role', server_default=None)

    op.create_table(
        'team_quota',
        sa.Column('team_id', sa.String(length=40), nullable=False),
        sa.Column('running_jobs', sa.Integer(), nullable=True),
        sa.Column('queued_jobs', sa.Integer(), nullable=True),
        sa.Column('storage_bytes', sa.BigInteger(), nullable=True),
        sa.Column('files', sa.Integer(), nullable=True),
        sa.Column('rate_per_second', sa.Float(), nullable=True),
        sa.Column('rate_burst', sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(['team_id'], ['team.id'], name=op.f('fk_team_quota_team_id_team'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('team_id', name=op.f('pk_team_quota')),
    )

    op.create_table(
        'audit_event',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('team_id', sa.String(length=40), nullable=True),
        sa.Column('key_id', sa.String(length=40), nullable=True),
        sa.Column('action', sa.String(length=255), nullable=False),
        sa.Column('object_id', sa.String(length=128), nullable=True),
        sa.Column('status_code', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_event')),
    )
    op.create_index(op.f('ix_audit_event_team_id'), 'audit_event', ['team_id'], unique=False)
    if op.get_bind().dialect.name == 'postgresql':
        # Append-only in fact, not only by convention: rows can be inserted, never changed or removed.
        op.execute("""
            CREATE FUNCTION audit_event_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'audit_event is append-only: % is not allowed', TG_OP;
            END $$
        """)
        op.execute("""
            CREATE TRIGGER audit_event_no_update_delete BEFORE UPDATE OR DELETE ON audit_event
            FOR EACH ROW EXECUTE FUNCTION audit_event_append_only()
        """)
        op.execute("""
            CREATE TRIGGER audit_event_no_truncate BEFORE TRUNCATE ON audit_event
            FOR EACH STATEMENT EXECUTE FUNCTION audit_event_append_only()
        """)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("DROP TRIGGER IF EXISTS audit_event_no_truncate ON audit_event")
        op.execute("DROP TRIGGER IF EXISTS audit_event_no_update_delete ON audit_event")
        op.execute("DROP FUNCTION IF EXISTS audit_event_append_only()")
    op.drop_index(op.f('ix_audit_event_team_id'), table_name='audit_event')
    op.drop_table('audit_event')
    op.drop_table('team_quota')
    with op.batch_alter_table('api_key', schema=None) as batch_op:
        batch_op.drop_column('role')

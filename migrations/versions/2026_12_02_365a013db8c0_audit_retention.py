"""audit retention: unauthenticated requests counted per minute, prunable audit rows

Revision ID: 365a013db8c0
Revises: f5a8c3e1d7b2
Create Date: 2026-12-02 02:20:00
"""
from alembic import op
import sqlalchemy as sa


revision = '365a013db8c0'
down_revision = 'f5a8c3e1d7b2'
branch_labels = None
depends_on = None

_APPEND_ONLY = """
    CREATE OR REPLACE FUNCTION audit_event_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit_event is append-only: % is not allowed', TG_OP;
    END $$
"""
# `tuneforge audit prune --before T` sets tuneforge.audit_prune_before for its own transaction only
# (set_config(..., true)); a DELETE of a row older than that cutoff is let through, nothing else.
_PRUNABLE = """
    CREATE OR REPLACE FUNCTION audit_event_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        cutoff text := current_setting('tuneforge.audit_prune_before', true);
    BEGIN
        IF TG_OP = 'DELETE' AND coalesce(cutoff, '') <> '' AND OLD.created_at < cutoff::timestamptz THEN
            RETURN OLD;
        END IF;
        RAISE EXCEPTION 'audit_event is append-only: % is not allowed', TG_OP;
    END $$
"""


def upgrade() -> None:
    op.create_table(
        'audit_unauthenticated',
        sa.Column('minute', sa.DateTime(timezone=True), nullable=False),
        sa.Column('method', sa.String(length=8), nullable=False),
        sa.Column('route', sa.String(length=255), nullable=False),
        sa.Column('status_code', sa.Integer(), nullable=False),
        sa.Column('client_prefix', sa.String(length=64), nullable=False),
        sa.Column('count', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('minute', 'method', 'route', 'status_code', 'client_prefix',
                                name=op.f('pk_audit_unauthenticated')),
    )
    op.create_index(op.f('ix_audit_event_created_at'), 'audit_event', ['created_at'], unique=False)
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(_PRUNABLE)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(_APPEND_ONLY)
    op.drop_index(op.f('ix_audit_event_created_at'), table_name='audit_event')
    op.drop_table('audit_unauthenticated')

"""Fencing and the outbox: a lease token per attempt on jobs; the dispatches table.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 20:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_token', sa.String(length=40), nullable=True))
    op.create_table('dispatches',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('queue', sa.String(length=32), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('tries', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_dispatches_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dispatches'))
    )
    with op.batch_alter_table('dispatches', schema=None) as batch_op:
        batch_op.create_index('ix_dispatches_unsent', ['sent_at', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_dispatches_job_id'), ['job_id'], unique=False)
    # Jobs queued before this revision get a dispatch, so the dispatcher sends them once.
    op.execute("INSERT INTO dispatches (kind, job_id, queue, reason, created_at, tries) "
               "SELECT 'run_job', id, queue, 'migrated', CURRENT_TIMESTAMP, 0 FROM jobs WHERE status = 'queued'")


def downgrade() -> None:
    op.drop_table('dispatches')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('lease_token')

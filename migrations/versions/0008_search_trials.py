"""Student search: a search job's trials are child jobs (``jobs.parent_id``, ``trial_number``, ``trial``), and
``jobs.role`` tells a search job (run by the leader's coordinator, never by a worker) from the others.

Revision ID: 0008_search_trials
Revises: 0007_job_tracking
Create Date: 2026-12-10 12:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0008_search_trials'
down_revision: str | None = '0007_job_tracking'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('role', sa.String(length=16), nullable=False, server_default='job'))
        batch_op.add_column(sa.Column('parent_id', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('trial_number', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('trial', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()),
                                                                      'postgresql'), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_jobs_parent_id_jobs'), 'jobs', ['parent_id'], ['id'],
                                    ondelete='CASCADE')
        batch_op.create_index(batch_op.f('ix_jobs_parent_id'), ['parent_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_role'), ['role'], unique=False)
        batch_op.create_unique_constraint(batch_op.f('uq_jobs_parent_id'), ['parent_id', 'trial_number'])


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_jobs_parent_id'), type_='unique')
        batch_op.drop_index(batch_op.f('ix_jobs_role'))
        batch_op.drop_index(batch_op.f('ix_jobs_parent_id'))
        batch_op.drop_constraint(batch_op.f('fk_jobs_parent_id_jobs'), type_='foreignkey')
        batch_op.drop_column('trial')
        batch_op.drop_column('trial_number')
        batch_op.drop_column('parent_id')
        batch_op.drop_column('role')

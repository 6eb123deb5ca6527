"""Job inputs: every model and dataset a job reads, for the in-use check on delete.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 03:58:50.015735
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('job_inputs',
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('resource_id', sa.String(length=40), nullable=False),
    sa.Column('role', sa.String(length=32), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_inputs_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'resource_id', name=op.f('pk_job_inputs'))
    )
    with op.batch_alter_table('job_inputs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_inputs_resource_id'), ['resource_id'], unique=False)
    # Backfill from the columns jobs already had.
    op.execute("INSERT INTO job_inputs (job_id, resource_id, role) "
               "SELECT id, teacher_model_id, 'teacher' FROM jobs WHERE teacher_model_id IS NOT NULL")
    op.execute("INSERT INTO job_inputs (job_id, resource_id, role) "
               "SELECT id, dataset_id, 'dataset' FROM jobs WHERE dataset_id IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table('job_inputs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_inputs_resource_id'))

    op.drop_table('job_inputs')

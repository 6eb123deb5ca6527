"""Every change of a job row is announced on the ``distillery_jobs`` channel (PostgreSQL only): the API's job
cache drops the body it rendered (app/api/job_cache.py).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 06:30:00
"""
from collections.abc import Sequence

from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite has no LISTEN/NOTIFY; the cache stays off there
    op.execute("""
        CREATE OR REPLACE FUNCTION distillery_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            -- delivered when the transaction commits; identical payloads in one transaction fold into one
            PERFORM pg_notify('distillery_jobs', CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END);
            RETURN NULL;
        END $$
    """)
    op.execute("CREATE TRIGGER jobs_changed AFTER UPDATE OR DELETE ON jobs "
               "FOR EACH ROW EXECUTE FUNCTION distillery_job_changed()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS jobs_changed ON jobs")
    op.execute("DROP FUNCTION IF EXISTS distillery_job_changed()")

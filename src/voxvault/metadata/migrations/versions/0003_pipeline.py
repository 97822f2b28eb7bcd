"""Pipeline results: one live job per recording and its stage, the error of a failed recording,
its playback rendition, and where each transcript came from (job, engine, model, timings).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

LIVE = sa.text("status IN ('queued', 'running')")

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("recordings") as batch:
        batch.add_column(sa.Column("error", sa.String(4000)))
        batch.add_column(sa.Column("playback_sha256", sa.String(64)))
    with op.batch_alter_table("transcripts") as batch:
        batch.add_column(sa.Column("job_id", sa.String(32)))
        batch.add_column(sa.Column("engine", sa.String(64)))
        batch.add_column(sa.Column("model", sa.String(200)))
        batch.add_column(sa.Column("timings", sa.JSON))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("stage", sa.String(32)))
    # At most one live run per recording, even when two API processes race to start one.
    op.create_index(
        "ux_jobs_live_recording",
        "jobs",
        ["recording_id"],
        unique=True,
        sqlite_where=LIVE,
        postgresql_where=LIVE,
    )
    # One transcript per job: a job that runs twice (after a crash) cannot add a second version.
    op.create_index("ux_transcripts_job", "transcripts", ["job_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_jobs_live_recording", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("stage")
    op.drop_index("ux_transcripts_job", "transcripts")
    with op.batch_alter_table("transcripts") as batch:
        for column in ("timings", "model", "engine", "job_id"):
            batch.drop_column(column)
    with op.batch_alter_table("recordings") as batch:
        batch.drop_column("playback_sha256")
        batch.drop_column("error")

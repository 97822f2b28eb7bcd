"""Initial schema: workspaces, recordings and their tags, transcripts, artifacts.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from voxvault.metadata.tables import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    workspaces = op.create_table(
        "workspaces",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.bulk_insert(
        workspaces, [{"id": "default", "name": "Default", "created_at": datetime.now(UTC)}]
    )
    op.create_table(
        "recordings",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("workspace_id", sa.String(64), sa.ForeignKey("workspaces.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("title", sa.String(500)),
        sa.Column("filename", sa.String(255)),
        sa.Column("content_type", sa.String(255), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("duration_s", sa.Float),
        sa.Column("sample_rate", sa.Integer),
        sa.Column("channels", sa.Integer),
        sa.Column("codec", sa.String(64)),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_index(
        "ix_recordings_workspace_created", "recordings", ["workspace_id", "created_at", "id"]
    )
    op.create_table(
        "recording_tags",
        sa.Column(
            "recording_id",
            sa.String(64),
            sa.ForeignKey("recordings.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("tag", sa.String(64), primary_key=True),
    )
    op.create_index("ix_recording_tags_tag", "recording_tags", ["tag"])
    op.create_table(
        "transcripts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "recording_id",
            sa.String(64),
            sa.ForeignKey("recordings.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("language", sa.String(32)),
        sa.Column("segment_count", sa.Integer, nullable=False),
        sa.Column("segments", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("recording_id", "version", name="uq_transcripts_recording_version"),
    )
    op.create_table(
        "artifacts",
        sa.Column(
            "recording_id",
            sa.String(64),
            sa.ForeignKey("recordings.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("content_type", sa.String(255), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    for table in ("artifacts", "transcripts", "recording_tags", "recordings", "workspaces"):
        op.drop_table(table)

"""SQLAlchemy Core tables: the schema that the Alembic migrations create."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as UTC and always returned timezone-aware, on every engine."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

workspaces = Table(
    "workspaces",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

recordings = Table(
    "recordings",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("workspace_id", String(64), ForeignKey("workspaces.id"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("title", String(500)),
    Column("filename", String(255)),
    Column("content_type", String(255), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("duration_s", Float),
    Column("sample_rate", Integer),
    Column("channels", Integer),
    Column("codec", String(64)),
    Column("tags", JSON, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("error", String(4000)),
    Column("playback_sha256", String(64)),
    Index("ix_recordings_workspace_created", "workspace_id", "created_at", "id"),
)

# Tags are kept twice: in order on the recording (what clients see) and here (what filters use).
recording_tags = Table(
    "recording_tags",
    metadata,
    Column(
        "recording_id",
        String(64),
        ForeignKey("recordings.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("tag", String(64), primary_key=True),
    Index("ix_recording_tags_tag", "tag"),
)

transcripts = Table(
    "transcripts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "recording_id",
        String(64),
        ForeignKey("recordings.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("version", Integer, nullable=False),
    Column("language", String(32)),
    Column("segment_count", Integer, nullable=False),
    Column("segments", JSON, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("job_id", String(32)),
    Column("engine", String(64)),
    Column("model", String(200)),
    Column("timings", JSON),
    Index("ux_transcripts_job", "job_id", unique=True),
    UniqueConstraint("recording_id", "version", name="uq_transcripts_recording_version"),
)

artifacts = Table(
    "artifacts",
    metadata,
    Column(
        "recording_id",
        String(64),
        ForeignKey("recordings.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("name", String(128), primary_key=True),
    Column("content_type", String(255), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("workspace_id", String(64), ForeignKey("workspaces.id"), nullable=False),
    Column(
        "recording_id",
        String(64),
        ForeignKey("recordings.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("kind", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("progress", Float, nullable=False),
    Column("error", String(4000)),
    Column("payload", JSON, nullable=False),
    Column("run_after", UTCDateTime(), nullable=False),
    Column("lease_owner", String(128)),
    Column("lease_expires_at", UTCDateTime()),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("started_at", UTCDateTime()),
    Column("finished_at", UTCDateTime()),
    Index("ix_jobs_status_run_after", "status", "run_after"),
    Index("ix_jobs_recording", "recording_id"),
    Column("stage", String(32)),
    Index(
        "ux_jobs_live_recording",
        "recording_id",
        unique=True,
        sqlite_where=text("status IN ('queued', 'running')"),
        postgresql_where=text("status IN ('queued', 'running')"),
    ),
)

# Resumable uploads (tus): the state any API process needs to continue one; the bytes are part
# blobs under ``uploads/{id}/``, or parts of the multipart upload ``multipart_id`` of the
# recording's own blob (S3), listed in ``parts`` in order once each is durable. Each attempt to
# store a chunk in the multipart upload takes the number ``next_part_number`` (migration 0006).
uploads = Table(
    "uploads",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("workspace_id", String(64), ForeignKey("workspaces.id"), nullable=False),
    Column("upload_length", BigInteger, nullable=False),
    Column("upload_offset", BigInteger, nullable=False),
    Column("parts", JSON, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("status", String(16), nullable=False),
    Column("recording_id", String(64), nullable=False),
    Column("error", String(4000)),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Index("ix_uploads_expires_at", "expires_at"),
    Column("multipart_id", String(1024)),
    Column("next_part_number", Integer, nullable=False, server_default=text("1")),
)

# The search index (voxvault.search): each recording's current transcript version, one row per
# segment. On SQLite an FTS5 table indexes ``text`` by rowid; on PostgreSQL the rows also carry
# the ``config`` they are parsed with and a generated ``tsv`` column (migration 0005).
search_documents = Table(
    "search_documents",
    metadata,
    Column(
        "recording_id",
        String(64),
        ForeignKey("recordings.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("version", Integer, nullable=False),
    Column("language", String(32)),
    Column("config", String(64), nullable=False),
    Column("segment_count", Integer, nullable=False),
    Column("first_segment_id", BigInteger),
    Column("last_segment_id", BigInteger),
    Column("indexed_at", UTCDateTime(), nullable=False),
)

search_segments = Table(
    "search_segments",
    metadata,
    # INTEGER on SQLite, so that it is the rowid the FTS table points at.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column(
        "recording_id",
        String(64),
        ForeignKey("recordings.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("position", Integer, nullable=False),
    Column("start", Float, nullable=False),
    Column("end", Float, nullable=False),
    Column("speaker", String(100)),
    Column("text", Text, nullable=False),
    Index("ix_search_segments_recording", "recording_id", "position"),
)

"""The MetadataStore port: records of recordings, transcripts and artifacts, per workspace.

Every method takes the workspace it acts in; no method can reach another workspace's rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from voxvault.models import (
    Artifact,
    Recording,
    RecordingPage,
    RecordingQuery,
    RecordingStatus,
    StorageUsage,
    Transcript,
    TranscriptInput,
    TranscriptVersion,
)
from voxvault.search.base import IndexPage, SearchFilters
from voxvault.search.query import SearchQuery

DEFAULT_WORKSPACE = "default"


@dataclass(frozen=True, slots=True)
class RecordingBlobs:
    """What one recording row says its blobs are: checksums of the original, of the playback
    rendition (``None`` while there is none) and of each artifact, by name."""

    workspace: str
    recording_id: str
    status: RecordingStatus
    sha256: str
    playback_sha256: str | None
    artifacts: dict[str, str] = field(default_factory=dict)


class MetadataStore(ABC):
    @abstractmethod
    async def migrate(self) -> None:
        """Bring the schema to the newest version; safe to run from several processes."""

    @abstractmethod
    async def check(self) -> None:
        """Raise ``BackendUnavailable`` unless the database answers now."""

    @abstractmethod
    def describe(self) -> dict[str, Any]: ...

    @abstractmethod
    async def close(self) -> None: ...

    # ---- recordings ---------------------------------------------------------------------------

    @abstractmethod
    async def insert_recording(self, workspace: str, recording: Recording) -> None: ...

    @abstractmethod
    async def get_recording(self, workspace: str, recording_id: str) -> Recording:
        """The recording, unless absent or being deleted (``NotFound``)."""

    @abstractmethod
    async def list_recordings(self, workspace: str, query: RecordingQuery) -> RecordingPage:
        """Newest first; ``next_cursor`` continues after the last item."""

    @abstractmethod
    async def update_recording(
        self,
        workspace: str,
        recording_id: str,
        *,
        title: str | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        status: RecordingStatus | None = None,
        error: str | None = None,
    ) -> Recording:
        """Change the given fields (``None`` leaves one as it is) and bump ``updated_at``.

        A new ``status`` always replaces ``error`` (with ``None`` unless one is given): the error
        describes the current failure only.
        """

    @abstractmethod
    async def set_playback(self, workspace: str, recording_id: str, sha256: str | None) -> None:
        """Record (or forget) the playback rendition's checksum; ``NotFound`` when gone."""

    @abstractmethod
    async def get_playback(self, workspace: str, recording_id: str) -> str | None:
        """The playback rendition's checksum, or ``None`` when there is none yet."""

    @abstractmethod
    async def list_tombstones(self, limit: int = 1000) -> list[tuple[str, str]]:
        """(workspace, recording id) of recordings whose deletion was begun but not finished."""

    @abstractmethod
    async def list_recording_blobs(
        self, *, after: str | None = None, limit: int = 500
    ) -> list[RecordingBlobs]:
        """Every recording row of every workspace, tombstones included, in id order after
        ``after``: for checks of the whole store (fsck, gc), never for clients."""

    @abstractmethod
    async def get_recording_blobs(self, recording_id: str) -> RecordingBlobs | None:
        """One recording row of any workspace, tombstone or not; ``None`` when there is none."""

    @abstractmethod
    async def purge_recording(self, workspace: str, recording_id: str) -> bool:
        """Remove the row and every transcript and artifact row of it; False when absent."""

    # ---- transcripts --------------------------------------------------------------------------

    @abstractmethod
    async def add_transcript(
        self,
        workspace: str,
        recording_id: str,
        transcript: TranscriptInput,
        *,
        job_id: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> Transcript:
        """Store the next version (1, 2, ...) atomically, even under concurrent writers.

        With ``job_id``, a job that already stored its transcript gets that one back instead of
        a new version: a job run twice yields one result.
        """

    @abstractmethod
    async def get_job_transcript(
        self, workspace: str, recording_id: str, job_id: str
    ) -> Transcript | None:
        """The transcript the job made, if it made one."""

    @abstractmethod
    async def get_transcript(
        self, workspace: str, recording_id: str, version: int | None = None
    ) -> Transcript:
        """The given version, or the newest; ``NotFound`` when there is none."""

    @abstractmethod
    async def list_transcript_versions(
        self, workspace: str, recording_id: str
    ) -> list[TranscriptVersion]: ...

    # ---- search (voxvault.search) -------------------------------------------------------------

    @abstractmethod
    async def search(
        self,
        workspace: str,
        query: SearchQuery,
        filters: SearchFilters,
        *,
        offset: int,
        limit: int,
        per_group: int | None = None,
    ) -> IndexPage:
        """Hits in the current transcripts of the workspace's recordings (``SearchIndex``)."""

    @abstractmethod
    async def reindex_recording(self, recording_id: str) -> bool:
        """Index the recording's newest transcript (or nothing, when it has none) in place of
        what is indexed for it; False when there is no such recording."""

    @abstractmethod
    async def unindexed_recordings(self, limit: int) -> list[str]:
        """Recordings whose newest transcript is not the version indexed (any workspace)."""

    @abstractmethod
    async def transcribed_recordings(self, after: str | None, limit: int) -> list[str]:
        """Ids of recordings with a transcript (any workspace), in id order after ``after``."""

    # ---- artifacts ----------------------------------------------------------------------------

    @abstractmethod
    async def upsert_artifact(self, workspace: str, recording_id: str, artifact: Artifact) -> None:
        """Insert or replace the artifact record of that name (``created_at`` kept on replace)."""

    @abstractmethod
    async def get_artifact(self, workspace: str, recording_id: str, name: str) -> Artifact: ...

    @abstractmethod
    async def list_artifacts(self, workspace: str, recording_id: str) -> list[Artifact]: ...

    @abstractmethod
    async def delete_artifact(self, workspace: str, recording_id: str, name: str) -> bool: ...

    # ---- accounting ---------------------------------------------------------------------------

    @abstractmethod
    async def usage(self, workspace: str) -> StorageUsage: ...

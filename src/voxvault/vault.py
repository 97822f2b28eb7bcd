"""``Vault``: the service layer every front-end calls (HTTP API, CLI, library).

Consistency rules (handbook §2): bytes are made durable before the row that points at them is
committed, so a recording is visible only once its bytes are complete and hashed; a delete first
tombstones the row, then removes the bytes, then purges the row. Any failure on the way removes
what the attempt wrote.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import anyio
import anyio.to_thread
from pydantic import TypeAdapter, ValidationError

from voxvault import exports
from voxvault.blobs import BlobStore, open_blob_store
from voxvault.blobs import keys as blob_keys
from voxvault.errors import InvalidRequest, NotFound, PayloadTooLarge, ValidationFailed
from voxvault.exports import ExportFormat
from voxvault.media.blobfile import BlobFile
from voxvault.media.probe import probe
from voxvault.metadata import DEFAULT_WORKSPACE, MetadataStore, open_metadata_store
from voxvault.models import (
    Artifact,
    PlaybackLink,
    Recording,
    RecordingPage,
    RecordingPatch,
    RecordingQuery,
    RecordingStatus,
    StorageInfo,
    Transcript,
    TranscriptInput,
    TranscriptVersion,
    validation_failed,
)
from voxvault.names import (
    check_artifact_name,
    check_filename,
    check_recording_id,
    new_recording_id,
)
from voxvault.settings import MAX_PLAYBACK_URL_TTL, Settings
from voxvault.signing import PlaybackSigner

FILE_CHUNK_BYTES = 1024 * 1024
_MEDIA_TYPE = re.compile(r"^[\w.+-]+/[\w.+-]+(\s*;.{0,200})?$")
_PATCH = TypeAdapter(RecordingPatch)


@dataclass(frozen=True, slots=True)
class Download:
    """Bytes ready to serve: what an HTTP range handler or a file writer needs."""

    key: str
    size: int
    sha256: str
    content_type: str
    filename: str
    modified_at: datetime
    _blobs: BlobStore

    @property
    def etag(self) -> str:
        return f'"{self.sha256}"'

    def stream(self, start: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        return self._blobs.stream_range(
            self.key, start, self.size - start if length is None else length
        )


async def _file_chunks(
    path: Path, on_progress: Callable[[int], None] | None
) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as handle:
        while chunk := await handle.read(FILE_CHUNK_BYTES):
            if on_progress is not None:
                on_progress(len(chunk))
            yield chunk


class Vault:
    """Recordings, transcripts and artifacts of one workspace, over pluggable stores."""

    def __init__(
        self,
        settings: Settings,
        metadata: MetadataStore,
        blobs: BlobStore,
        signer: PlaybackSigner,
        *,
        workspace: str = DEFAULT_WORKSPACE,
    ) -> None:
        self.settings = settings
        self.metadata = metadata
        self.blobs = blobs
        self.signer = signer
        self.workspace = workspace

    @classmethod
    async def open(cls, settings: Settings | None = None, *, migrate: bool = True) -> Vault:
        """Open the stores the settings name; by default bring the schema up to date first."""
        settings = settings or Settings()
        metadata = open_metadata_store(settings.database_url)
        try:
            if migrate:
                await metadata.migrate()
            blobs = open_blob_store(settings.blob_url)
            signer = PlaybackSigner(settings.load_secret_key())
        except BaseException:
            await metadata.close()
            raise
        return cls(settings, metadata, blobs, signer)

    def for_workspace(self, workspace: str) -> Vault:
        """The same stores, scoped to another workspace."""
        return Vault(self.settings, self.metadata, self.blobs, self.signer, workspace=workspace)

    async def close(self) -> None:
        await self.blobs.close()
        await self.metadata.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # ---- recordings ---------------------------------------------------------------------------

    async def create_recording(
        self,
        chunks: AsyncIterable[bytes],
        *,
        filename: str | None = None,
        content_type: str | None = None,
        title: str | None = None,
        tags: list[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        declared_size: int | None = None,
    ) -> Recording:
        """Store an upload, verify it is decodable audio, and record it as ``stored``.

        Refused uploads (too large, empty, not audio, invalid fields) leave no bytes and no row.
        """
        filename = check_filename(filename)
        fields = self._validate_patch(
            {"title": title, "tags": tags or [], "metadata": dict(metadata or {})}
        )
        limit = self.settings.max_upload_bytes
        if declared_size is not None and declared_size > limit:
            raise PayloadTooLarge(
                f"the upload of {declared_size} bytes exceeds the limit of {limit} bytes",
                detail={"max_bytes": limit},
            )
        recording_id = new_recording_id()
        key = blob_keys.recording_original(recording_id)
        stored = await self.blobs.put_stream(key, chunks, max_bytes=limit)
        try:
            source = BlobFile(self.blobs, key, stored.size)
            media = await anyio.to_thread.run_sync(probe, source)
            now = datetime.now(UTC)
            declared_type = (content_type or "").split(";")[0].strip().lower()
            recording = Recording(
                id=recording_id,
                status=RecordingStatus.STORED,
                title=fields.title,
                filename=filename,
                content_type=declared_type
                if declared_type.startswith(("audio/", "video/"))
                else media.content_type,
                size_bytes=stored.size,
                sha256=stored.sha256,
                duration_s=media.duration_s,
                sample_rate=media.sample_rate,
                channels=media.channels,
                codec=media.codec,
                tags=fields.tags or [],
                metadata=fields.metadata or {},
                created_at=now,
                updated_at=now,
            )
            await self.metadata.insert_recording(self.workspace, recording)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.blobs.delete(key)
            raise
        return recording

    async def add_file(
        self,
        path: str | Path,
        *,
        title: str | None = None,
        tags: list[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Recording:
        """Store a local file as a recording; ``on_progress`` is told each chunk's size."""
        path = Path(path)
        if not path.is_file():
            raise InvalidRequest(f"{path} is not a file")
        return await self.create_recording(
            _file_chunks(path, on_progress),
            filename=path.name,
            title=title,
            tags=tags,
            metadata=metadata,
            declared_size=path.stat().st_size,
        )

    async def get_recording(self, recording_id: str) -> Recording:
        return await self.metadata.get_recording(self.workspace, check_recording_id(recording_id))

    async def list_recordings(self, query: RecordingQuery | None = None) -> RecordingPage:
        return await self.metadata.list_recordings(self.workspace, query or RecordingQuery())

    async def iter_recordings(
        self, query: RecordingQuery | None = None
    ) -> AsyncIterator[Recording]:
        """Every recording matching ``query``, following cursors page after page."""
        query = query or RecordingQuery()
        while True:
            page = await self.list_recordings(query)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            query = query.model_copy(update={"cursor": page.next_cursor})

    @staticmethod
    def _validate_patch(values: Mapping[str, Any] | RecordingPatch) -> RecordingPatch:
        if isinstance(values, RecordingPatch):
            return values
        try:
            return _PATCH.validate_python({k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            raise validation_failed(exc) from None

    async def update_recording(
        self, recording_id: str, patch: RecordingPatch | Mapping[str, Any]
    ) -> Recording:
        fields = self._validate_patch(patch)
        return await self.metadata.update_recording(
            self.workspace,
            check_recording_id(recording_id),
            title=fields.title,
            tags=fields.tags,
            metadata=fields.metadata,
        )

    async def delete_recording(self, recording_id: str) -> None:
        """Remove the recording with every byte, transcript and artifact of it."""
        check_recording_id(recording_id)
        await self.metadata.update_recording(
            self.workspace, recording_id, status=RecordingStatus.DELETING
        )
        with anyio.CancelScope(shield=True):
            await self._erase(self.workspace, recording_id)

    async def _erase(self, workspace: str, recording_id: str) -> None:
        """Remove a tombstoned recording's bytes, then its rows."""
        await self.blobs.delete_prefix(blob_keys.recording_prefix(recording_id))
        await self.metadata.purge_recording(workspace, recording_id)

    async def finish_interrupted_deletes(self) -> int:
        """Complete the deletions a crash cut short (in every workspace); returns how many."""
        finished = 0
        while batch := await self.metadata.list_tombstones():
            for workspace, recording_id in batch:
                await self._erase(workspace, recording_id)
                finished += 1
        return finished

    # ---- audio --------------------------------------------------------------------------------

    async def open_audio(self, recording_id: str) -> Download:
        recording = await self.get_recording(recording_id)
        return await self._download(
            blob_keys.recording_original(recording.id),
            sha256=recording.sha256,
            content_type=recording.content_type,
            filename=recording.filename or recording.id,
            modified_at=recording.created_at,
        )

    async def _download(
        self, key: str, *, sha256: str, content_type: str, filename: str, modified_at: datetime
    ) -> Download:
        # The stat makes a blob missing behind its row a clean NotFound before any header is sent.
        info = await self.blobs.stat(key)
        return Download(
            key=key,
            size=info.size,
            sha256=sha256,
            content_type=content_type,
            filename=filename,
            modified_at=modified_at,
            _blobs=self.blobs,
        )

    async def playback_link(
        self, recording_id: str, *, base_url: str, ttl: int | None = None
    ) -> PlaybackLink:
        """A URL anyone holding it can play from (with ranges) until it expires."""
        ttl = ttl or self.settings.playback_url_ttl
        if not 0 < ttl <= MAX_PLAYBACK_URL_TTL:
            raise ValidationFailed(f"ttl must be between 1 and {MAX_PLAYBACK_URL_TTL} seconds")
        recording = await self.get_recording(recording_id)
        expires = int(time.time()) + ttl
        signature = self.signer.sign(self.workspace, recording.id, expires)
        base = (self.settings.public_url or base_url).rstrip("/")
        url = (
            f"{base}/v1/playback/{recording.id}"
            f"?ws={self.workspace}&expires={expires}&signature={signature}"
        )
        return PlaybackLink(url=url, expires_at=datetime.fromtimestamp(expires, tz=UTC))

    async def open_signed_audio(self, recording_id: str, expires: int, signature: str) -> Download:
        self.signer.verify(self.workspace, recording_id, expires, signature)
        return await self.open_audio(recording_id)

    # ---- transcripts --------------------------------------------------------------------------

    async def put_transcript(
        self, recording_id: str, transcript: TranscriptInput | Mapping[str, Any]
    ) -> Transcript:
        """Store a transcript from elsewhere as the recording's next version."""
        if not isinstance(transcript, TranscriptInput):
            try:
                transcript = TranscriptInput.model_validate(transcript)
            except ValidationError as exc:
                raise validation_failed(exc) from None
        return await self.metadata.add_transcript(
            self.workspace, check_recording_id(recording_id), transcript
        )

    async def get_transcript(self, recording_id: str, version: int | None = None) -> Transcript:
        return await self.metadata.get_transcript(
            self.workspace, check_recording_id(recording_id), version
        )

    async def list_transcript_versions(self, recording_id: str) -> list[TranscriptVersion]:
        return await self.metadata.list_transcript_versions(
            self.workspace, check_recording_id(recording_id)
        )

    async def export_transcript(
        self, recording_id: str, fmt: ExportFormat | str, version: int | None = None
    ) -> tuple[str, str, str]:
        """The transcript rendered as ``fmt``: (text, media type, suggested filename)."""
        try:
            fmt = ExportFormat(fmt)
        except ValueError:
            choices = ", ".join(f.value for f in ExportFormat)
            raise InvalidRequest(f"unknown export format {fmt!r}; use one of {choices}") from None
        recording = await self.get_recording(recording_id)
        transcript = await self.get_transcript(recording.id, version)
        stem = Path(recording.filename).stem if recording.filename else recording.id
        text = exports.render(transcript, recording, fmt)
        return text, exports.MEDIA_TYPES[fmt], f"{stem}.{fmt.value}"

    # ---- artifacts ----------------------------------------------------------------------------

    async def put_artifact(
        self,
        recording_id: str,
        name: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str | None = None,
        declared_size: int | None = None,
    ) -> Artifact:
        """Store (or replace) a named artifact of a recording: any bytes, its type kept."""
        check_artifact_name(name)
        content_type = (content_type or "application/octet-stream").strip()
        if not _MEDIA_TYPE.fullmatch(content_type):
            raise InvalidRequest(f"invalid Content-Type {content_type[:100]!r}")
        recording = await self.get_recording(recording_id)
        limit = self.settings.max_upload_bytes
        if declared_size is not None and declared_size > limit:
            raise PayloadTooLarge(
                f"the artifact of {declared_size} bytes exceeds the limit of {limit} bytes",
                detail={"max_bytes": limit},
            )
        key = blob_keys.recording_artifact(recording.id, name)
        stored = await self.blobs.put_stream(key, chunks, max_bytes=limit, allow_empty=True)
        artifact = Artifact(
            name=name,
            content_type=content_type,
            size_bytes=stored.size,
            sha256=stored.sha256,
            created_at=datetime.now(UTC),
        )
        # Shielded: once the bytes are in place, a cancelled request must still record them.
        with anyio.CancelScope(shield=True):
            try:
                await self.metadata.upsert_artifact(self.workspace, recording.id, artifact)
            except NotFound:
                # The recording was deleted while the bytes were arriving: they belong to no one.
                await self.blobs.delete(key)
                raise
        return await self.metadata.get_artifact(self.workspace, recording.id, name)

    async def list_artifacts(self, recording_id: str) -> list[Artifact]:
        return await self.metadata.list_artifacts(self.workspace, check_recording_id(recording_id))

    async def open_artifact(self, recording_id: str, name: str) -> Download:
        check_artifact_name(name)
        artifact = await self.metadata.get_artifact(
            self.workspace, check_recording_id(recording_id), name
        )
        return await self._download(
            blob_keys.recording_artifact(recording_id, name),
            sha256=artifact.sha256,
            content_type=artifact.content_type,
            filename=name,
            modified_at=artifact.created_at,
        )

    async def delete_artifact(self, recording_id: str, name: str) -> None:
        check_artifact_name(name)
        if not await self.metadata.delete_artifact(
            self.workspace, check_recording_id(recording_id), name
        ):
            raise NotFound(f"recording {recording_id!r} has no artifact {name!r}")
        await self.blobs.delete(blob_keys.recording_artifact(recording_id, name))

    # ---- the service itself -------------------------------------------------------------------

    async def storage_info(self) -> StorageInfo:
        return StorageInfo(
            database=self.metadata.describe(),
            blobs=await anyio.to_thread.run_sync(self.blobs.describe),
            usage=await self.metadata.usage(self.workspace),
        )

    async def check_ready(self) -> None:
        """Raise ``BackendUnavailable`` unless every store answers now."""
        await self.metadata.check()
        await self.blobs.check()

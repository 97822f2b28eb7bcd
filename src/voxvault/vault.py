"""``Vault``: the service layer every front-end calls (HTTP API, CLI, library).

Consistency rules (handbook §2): bytes are made durable before the row that points at them is
committed, so a recording is visible only once its bytes are complete and hashed; a delete first
tombstones the row, then removes the bytes, then purges the row. Any failure on the way removes
what the attempt wrote.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import anyio
import anyio.to_thread
from pydantic import TypeAdapter, ValidationError

from voxvault import exports
from voxvault.blobs import BlobStore, StoredBlob, open_blob_store
from voxvault.blobs import keys as blob_keys
from voxvault.coalesce import Coalescer
from voxvault.errors import (
    BackendUnavailable,
    Conflict,
    InvalidRequest,
    MediaLimitExceeded,
    NotFound,
    PayloadTooLarge,
    ValidationFailed,
)
from voxvault.events import EventBus, EventBusClosed, ProgressEvent, Subscription, open_event_bus
from voxvault.exports import ExportFormat
from voxvault.jobs import FINISHED, Job, JobQueue, JobStatus, open_job_queue
from voxvault.maintenance import FsckReport, GcReport, collect_garbage, fsck
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
    SearchGroupPage,
    SearchPage,
    SearchRequest,
    StorageInfo,
    TranscribeRequest,
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

if TYPE_CHECKING:
    from voxvault.uploads import ResumableUploads

FILE_CHUNK_BYTES = 1024 * 1024
TRANSCRIBE_JOB = "transcribe"
# Statuses after which a recording's event stream has nothing more to say.
SETTLED = frozenset({RecordingStatus.READY, RecordingStatus.FAILED, RecordingStatus.STORED})
STATE_POLL_SECONDS = 1.0
PLAYBACK_CONTENT_TYPE = "audio/ogg; codecs=opus"
_MEDIA_TYPE = re.compile(r"^[\w.+-]+/[\w.+-]+(\s*;.{0,200})?$")
_PATCH = TypeAdapter(RecordingPatch)
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")

log = logging.getLogger(__name__)


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


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _file_chunks(
    path: Path, on_progress: Callable[[int], None] | None
) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as handle:
        while chunk := await handle.read(FILE_CHUNK_BYTES):
            if on_progress is not None:
                on_progress(len(chunk))
            yield chunk


def _check_job_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise NotFound(f"no job {job_id[:64]!r}", detail={"job_id": job_id[:64]})
    return job_id


class _NoEvents(Subscription):
    """What a follower gets while the event bus cannot be reached: nothing, at no cost."""

    async def next(self, timeout: float) -> None:  # noqa: ASYNC109 - the port's signature
        await anyio.sleep(timeout)

    @property
    def resumed(self) -> bool:
        return False

    @property
    def dropped(self) -> int:
        return 0


def _snapshot_progress(status: RecordingStatus, latest: Job | None) -> float:
    """1 once ready and 0 once failed, as the worker's own last event says; otherwise the job's
    own figure even once it finished: a snapshot read between the job's end and the recording's
    status change must not show progress going back."""
    if status is RecordingStatus.READY:
        return 1.0
    if status is RecordingStatus.FAILED or latest is None:
        return 0.0
    return latest.progress


def _changed(before: ProgressEvent, after: ProgressEvent) -> bool:
    return (after.status, after.stage, after.job_id, after.error) != (
        before.status,
        before.stage,
        before.job_id,
        before.error,
    ) or abs(after.progress - before.progress) >= 0.01


class Vault:
    """Recordings, transcripts and artifacts of one workspace, over pluggable stores."""

    def __init__(
        self,
        settings: Settings,
        metadata: MetadataStore,
        blobs: BlobStore,
        signer: PlaybackSigner,
        jobs: JobQueue,
        events: EventBus,
        *,
        workspace: str = DEFAULT_WORKSPACE,
        job_added: Callable[[], None] | None = None,
        snapshots: Coalescer[ProgressEvent] | None = None,
    ) -> None:
        self.settings = settings
        self.metadata = metadata
        self.blobs = blobs
        self.signer = signer
        self.jobs = jobs
        self.events = events
        self.workspace = workspace
        self._job_waiters: list[anyio.Event] = []
        self._job_added = job_added or self._wake_job_waiters
        # Every stream following a recording shares one re-read of it per poll, per process.
        self._snapshots = snapshots or Coalescer[ProgressEvent](STATE_POLL_SECONDS)

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
            jobs = open_job_queue(
                settings.queue_url,
                metadata,
                lease_seconds=settings.job_lease_s,
                sweep_every_s=settings.sweep_interval_s or None,
            )
            await jobs.open(migrate=migrate)
            try:
                events = open_event_bus(settings.events_url)
            except BaseException:
                await jobs.close()
                raise
        except BaseException:
            await metadata.close()
            raise
        return cls(settings, metadata, blobs, signer, jobs, events)

    def for_workspace(self, workspace: str) -> Vault:
        """The same stores, scoped to another workspace."""
        return Vault(
            self.settings,
            self.metadata,
            self.blobs,
            self.signer,
            self.jobs,
            self.events,
            workspace=workspace,
            job_added=self._job_added,
            snapshots=self._snapshots,
        )

    async def close(self) -> None:
        await self.events.close()
        await self.jobs.close()
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
        transcribe: bool = True,
        recording_id: str | None = None,
    ) -> Recording:
        """Store an upload, verify it is decodable audio, and record it.

        With ``transcribe`` (the default) a pipeline job is queued and the recording starts
        ``queued``; without, it stays ``stored`` (for apps that bring their own transcript).
        Refused uploads (too large, empty, not audio, too long, invalid fields) leave no bytes
        and no row, and so does a failure to queue the job. ``recording_id`` is for a caller
        that chose the id beforehand so that a retry after a crash finds its recording (a
        completed resumable upload); it must not run twice at once for one id.
        """
        return await self.create_recording_stored_by(
            lambda key, limit: self.blobs.put_stream(key, chunks, max_bytes=limit),
            filename=filename,
            content_type=content_type,
            title=title,
            tags=tags,
            metadata=metadata,
            declared_size=declared_size,
            transcribe=transcribe,
            recording_id=recording_id,
        )

    async def create_recording_from_blobs(
        self,
        parts: Sequence[str],
        *,
        sha256: str | None = None,
        part_sizes: Sequence[int] | None = None,
        filename: str | None = None,
        content_type: str | None = None,
        title: str | None = None,
        tags: list[str] | None = None,
        declared_size: int | None = None,
        transcribe: bool = True,
        recording_id: str | None = None,
    ) -> Recording:
        """``create_recording`` of the stored blobs ``parts``, one after the other (the chunks
        of a resumable upload), under the same rules; the parts stay.

        The store joins them itself where it can (``BlobStore.compose``), and ``sha256``, taken
        as the bytes arrived, spares reading them back to hash them; ``part_sizes``, just
        checked by the caller, spares asking the store for them again.
        """
        return await self.create_recording_stored_by(
            lambda key, limit: self.blobs.compose(
                key, parts, sha256=sha256, max_bytes=limit, sizes=part_sizes
            ),
            filename=filename,
            content_type=content_type,
            title=title,
            tags=tags,
            declared_size=declared_size,
            transcribe=transcribe,
            recording_id=recording_id,
        )

    async def create_recording_stored_by(
        self,
        store: Callable[[str, int], Awaitable[StoredBlob]],
        *,
        filename: str | None,
        content_type: str | None,
        title: str | None,
        tags: list[str] | None,
        metadata: Mapping[str, Any] | None = None,
        declared_size: int | None,
        transcribe: bool,
        recording_id: str | None,
    ) -> Recording:
        """Check the fields, ``store`` the bytes under the original's key (within the upload
        limit), probe them and record them: the rules every new recording goes through.

        For callers whose bytes reach the store their own way (a resumable upload's multipart
        upload completed into the original's key); refused, the blob ``store`` made is
        removed like any other."""
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
        recording_id = check_recording_id(recording_id) if recording_id else new_recording_id()
        key = blob_keys.recording_original(recording_id)
        stored = await store(key, limit)
        inserted = False
        try:
            source = BlobFile(self.blobs, key, stored.size)
            media = await anyio.to_thread.run_sync(probe, source)
            self._check_duration(media.duration_s)
            now = datetime.now(UTC)
            declared_type = (content_type or "").split(";")[0].strip().lower()
            recording = Recording(
                id=recording_id,
                status=RecordingStatus.QUEUED if transcribe else RecordingStatus.STORED,
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
            inserted = True
            if transcribe:
                await self._enqueue(recording_id, TranscribeRequest())
        except BaseException:
            with anyio.CancelScope(shield=True):
                if inserted:
                    await self.metadata.purge_recording(self.workspace, recording_id)
                await self.blobs.delete(key)
            raise
        return recording

    def _check_duration(self, duration_s: float | None) -> None:
        limit = self.settings.max_duration_s
        if duration_s is not None and duration_s > limit:
            raise MediaLimitExceeded(
                f"the recording lasts {duration_s:.0f} s, longer than the limit of {limit:.0f} s",
                detail={"duration_s": duration_s, "max_duration_s": limit},
            )

    async def add_file(
        self,
        path: str | Path,
        *,
        title: str | None = None,
        tags: list[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        on_progress: Callable[[int], None] | None = None,
        transcribe: bool = True,
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
            transcribe=transcribe,
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
        has_rendition = await self.metadata.get_playback(self.workspace, recording.id)
        return await self.sign_playback(
            recording.id, has_rendition=has_rendition is not None, base_url=base_url, ttl=ttl
        )

    async def sign_playback(
        self, recording_id: str, *, has_rendition: bool, base_url: str, ttl: int | None = None
    ) -> PlaybackLink:
        """``playback_link`` for a recording the caller has just read (no lookup of its own)."""
        urls, expires_at = await self.playback_urls(
            [(recording_id, has_rendition)], base_url=base_url, ttl=ttl
        )
        return PlaybackLink(url=urls[recording_id, has_rendition], expires_at=expires_at)

    async def playback_urls(
        self, recordings: Sequence[tuple[str, bool]], *, base_url: str, ttl: int | None = None
    ) -> tuple[dict[tuple[str, bool], str], datetime]:
        """Playback URLs for each ``(recording id, has rendition)``, signed once per pair and
        with one expiry for all, and that expiry: a page of search hits often names a
        recording more than once."""
        ttl = ttl or self.settings.playback_url_ttl
        expires = int(time.time()) + ttl
        base = (self.settings.public_url or base_url).rstrip("/")
        urls: dict[tuple[str, bool], str] = {}
        for recording_id, has_rendition in recordings:
            if (recording_id, has_rendition) in urls:
                continue
            # An object store serves the bytes itself: the Opus rendition when there is one.
            key = (blob_keys.recording_playback if has_rendition else blob_keys.recording_original)(
                recording_id
            )
            url = await self.blobs.presigned_url(
                key, ttl, public_endpoint=self.settings.blob_public_url
            )
            if url is None:
                signature = self.signer.sign(self.workspace, recording_id, expires)
                url = (
                    f"{base}/v1/playback/{recording_id}"
                    f"?ws={self.workspace}&expires={expires}&signature={signature}"
                )
            urls[recording_id, has_rendition] = url
        return urls, datetime.fromtimestamp(expires, tz=UTC)

    async def open_signed_audio(self, recording_id: str, expires: int, signature: str) -> Download:
        self.signer.verify(self.workspace, recording_id, expires, signature)
        return await self.open_playback(recording_id)

    async def open_playback(self, recording_id: str) -> Download:
        """The browser-friendly Opus rendition when the pipeline made one, else the original."""
        recording = await self.get_recording(recording_id)
        sha256 = await self.metadata.get_playback(self.workspace, recording.id)
        if sha256 is None:
            return await self.open_audio(recording.id)
        stem = Path(recording.filename).stem if recording.filename else recording.id
        try:
            return await self._download(
                blob_keys.recording_playback(recording.id),
                sha256=sha256,
                content_type=PLAYBACK_CONTENT_TYPE,
                filename=f"{stem}.opus",
                modified_at=recording.updated_at,
            )
        except NotFound:
            return await self.open_audio(recording.id)

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
        stored = await self.metadata.add_transcript(
            self.workspace, check_recording_id(recording_id), transcript
        )
        await self.write_transcript_files(stored.recording_id)
        recording = await self.get_recording(stored.recording_id)
        if recording.status in (RecordingStatus.STORED, RecordingStatus.FAILED):
            await self.settle_status(recording.id)  # it has a transcript now: ready
        return stored

    async def write_transcript_files(self, recording_id: str) -> list[Artifact]:
        """(Re)write the ``transcript.{json,srt,vtt,txt,md}`` artifacts from the current version.

        A writer that rendered a version and finds a newer one once its files are written
        renders again: one that read the newest version before another writer added its own
        may finish last, and so the files follow the newest version whichever writer finishes
        last. Running it twice writes the same bytes.
        """
        recording = await self.get_recording(recording_id)
        transcript = await self.get_transcript(recording.id)
        while True:
            written = []
            for fmt in ExportFormat:
                data = exports.render(transcript, recording, fmt).encode()
                written.append(
                    await self.put_artifact(
                        recording.id,
                        f"transcript.{fmt.value}",
                        _once(data),
                        content_type=exports.MEDIA_TYPES[fmt],
                    )
                )
            newest = await self.get_transcript(recording.id)
            if newest.version == transcript.version:
                return written
            transcript = newest

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

    # ---- jobs and progress --------------------------------------------------------------------

    def _wake_job_waiters(self) -> None:
        waiters, self._job_waiters = self._job_waiters, []
        for waiter in waiters:
            waiter.set()

    async def wait_for_jobs(self) -> None:
        """Return when this process queues a job (workers also poll, for other processes)."""
        waiter = anyio.Event()
        self._job_waiters.append(waiter)
        await waiter.wait()

    def channel(self, recording_id: str) -> str:
        """The event-bus channel of a recording's progress."""
        return f"{self.workspace}:{recording_id}"

    async def publish(self, recording_id: str, event: ProgressEvent) -> None:
        """Tell the recording's followers, best effort: an event reports a write already made
        and followers re-read the stores anyway, so a bus that cannot be reached costs them
        this event, never the caller its work (an upload, a cancel, a finished job)."""
        try:
            await self.events.publish(self.channel(recording_id), event)
        except BackendUnavailable as exc:
            log.warning("progress of %s not published: %s", recording_id, exc.message)

    async def _enqueue(self, recording_id: str, request: TranscribeRequest) -> Job:
        try:
            job = await self.jobs.enqueue(
                self.workspace,
                recording_id,
                TRANSCRIBE_JOB,
                request.model_dump(exclude_none=True),
                max_attempts=self.settings.job_max_attempts,
            )
        except Conflict:
            raise Conflict(
                "a transcription of this recording is already queued or running",
                detail={"recording_id": recording_id},
            ) from None
        self._job_added()
        await self.publish(
            recording_id,
            ProgressEvent(type="status", status=RecordingStatus.QUEUED.value, job_id=job.id),
        )
        return job

    async def transcribe(
        self, recording_id: str, request: TranscribeRequest | Mapping[str, Any] | None = None
    ) -> Job:
        """Queue the pipeline for a recording; it makes a new transcript version, and the
        earlier versions stay. ``Conflict`` while a run is already queued or running."""
        if not isinstance(request, TranscribeRequest):
            try:
                request = TranscribeRequest.model_validate(request or {})
            except ValidationError as exc:
                raise validation_failed(exc) from None
        recording = await self.get_recording(recording_id)
        latest = await self.jobs.latest(self.workspace, recording.id)
        if latest is not None and latest.status not in FINISHED:
            raise Conflict(
                "a transcription of this recording is already queued or running",
                detail={"recording_id": recording.id, "job_id": latest.id},
            )
        await self.metadata.update_recording(
            self.workspace, recording.id, status=RecordingStatus.QUEUED
        )
        try:
            return await self._enqueue(recording.id, request)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.settle_status(recording.id)
            raise

    async def get_job(self, job_id: str) -> Job:
        return await self.jobs.get(self.workspace, _check_job_id(job_id))

    async def list_jobs(self, recording_id: str) -> list[Job]:
        recording = await self.get_recording(recording_id)
        return await self.jobs.list_for_recording(self.workspace, recording.id)

    async def cancel_job(self, job_id: str) -> Job:
        """Cancel a queued or running job; a finished one is returned as it is.

        A running job stops at its worker's next heartbeat and leaves its recording as it was
        before the run (``ready`` with its earlier transcript, else ``stored``).
        """
        job = await self.jobs.cancel(self.workspace, _check_job_id(job_id))
        if job.status is JobStatus.CANCELLED:
            with contextlib.suppress(NotFound):
                await self.settle_status(job.recording_id)
        return job

    async def settle_status(self, recording_id: str) -> Recording:
        """Give a recording the status its jobs and transcripts say it has, when no job is
        queued or running: after a cancel, and after a crash between two writes."""
        latest = await self.jobs.latest(self.workspace, recording_id)
        if latest is not None and latest.status not in FINISHED:
            return await self.get_recording(recording_id)
        error = None
        if latest is not None and latest.status is JobStatus.FAILED:
            status, error = RecordingStatus.FAILED, latest.error
        elif await self._has_transcript(recording_id):
            status = RecordingStatus.READY
        else:
            status = RecordingStatus.STORED
        recording = await self.metadata.update_recording(
            self.workspace, recording_id, status=status, error=error
        )
        await self.publish(
            recording_id,
            ProgressEvent(
                type="status",
                status=status.value,
                job_id=latest.id if latest else None,
                progress=1.0 if status is RecordingStatus.READY else 0.0,
                error=error,
            ),
        )
        return recording

    async def _has_transcript(self, recording_id: str) -> bool:
        try:
            await self.get_transcript(recording_id)
        except NotFound:
            return False
        return True

    async def repair_statuses(self) -> int:
        """Settle every ``queued``/``processing`` recording that has no live job (a crash
        between two writes left it so); returns how many changed."""
        repaired = 0
        for status in (RecordingStatus.QUEUED, RecordingStatus.PROCESSING):
            async for recording in self.iter_recordings(RecordingQuery(status=status, limit=500)):
                latest = await self.jobs.latest(self.workspace, recording.id)
                if latest is None or latest.status in FINISHED:
                    await self.settle_status(recording.id)
                    repaired += 1
        return repaired

    async def recover(self) -> None:
        """Finish what a crash interrupted: deletions first, then recording statuses."""
        await self.finish_interrupted_deletes()
        await self.repair_statuses()

    async def snapshot(self, recording_id: str) -> ProgressEvent:
        """The recording's progress as it stands, from the stores (any process's work)."""
        recording = await self.get_recording(recording_id)
        latest = await self.jobs.latest(self.workspace, recording.id)
        running = latest is not None and latest.status not in FINISHED
        return ProgressEvent(
            type="snapshot",
            status=recording.status.value,
            stage=latest.stage if latest and running else None,
            progress=_snapshot_progress(recording.status, latest),
            job_id=latest.id if latest else None,
            error=recording.error,
        )

    @contextlib.asynccontextmanager
    async def _follow(
        self, recording_id: str, last_event_id: str | None
    ) -> AsyncIterator[Subscription]:
        """The recording's events; none while the bus cannot be reached, since ``watch``
        re-reads the stores anyway (the bus is the fast path, the stores the record)."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                subscription: Subscription = await stack.enter_async_context(
                    self.events.subscribe(self.channel(recording_id), last_event_id=last_event_id)
                )
            except EventBusClosed:
                raise
            except BackendUnavailable as exc:
                log.warning("following %s from the stores alone: %s", recording_id, exc.message)
                subscription = _NoEvents()
            yield subscription

    async def watch(
        self, recording_id: str, *, last_event_id: str | None = None
    ) -> AsyncIterator[tuple[str | None, ProgressEvent]]:
        """A recording's progress: its current state at once, then each event, ending once the
        recording is settled (``ready``, ``failed``, ``stored``) or deleted.

        The stores are re-read every second too, so that progress made by a worker in another
        process shows even with the in-process event bus, and nothing waits on a lost event.
        Either may be away for a while: the stream goes on with the other, and stays open.
        """
        check_recording_id(recording_id)
        async with self._follow(recording_id, last_event_id) as subscription:
            try:
                current = await self.snapshot(recording_id)
            except NotFound:
                yield None, ProgressEvent(type="deleted", status=RecordingStatus.DELETING.value)
                return
            if subscription.resumed:  # replay what the client missed, then go on live
                replayed = None
                while (missed := await subscription.next(timeout=0)) is not None:
                    replayed = missed[1]
                    yield missed
                if replayed is None or replayed.status != current.status:
                    yield None, current  # the stores are ahead of what was replayed
            else:
                yield None, current
            while RecordingStatus(current.status) not in SETTLED:
                received = await subscription.next(timeout=STATE_POLL_SECONDS)
                if received is not None:
                    current = received[1]
                    yield received
                    continue
                try:
                    fresh = await self._snapshots.get(
                        (self.workspace, recording_id),
                        functools.partial(self.snapshot, recording_id),
                    )
                except NotFound:
                    yield None, ProgressEvent(type="deleted", status=RecordingStatus.DELETING.value)
                    return
                except BackendUnavailable:
                    continue  # the stores are away for now: keep the stream, ask them again
                if _changed(current, fresh):
                    current = fresh
                    yield None, fresh

    # ---- search -------------------------------------------------------------------------------

    async def search(
        self, request: SearchRequest | Mapping[str, Any], *, base_url: str
    ) -> SearchPage | SearchGroupPage:
        """Hits in the current transcripts of this workspace (``voxvault.search``)."""
        from voxvault.search.library import search_library

        if not isinstance(request, SearchRequest):
            try:
                request = SearchRequest.model_validate(request)
            except ValidationError as exc:
                raise validation_failed(exc) from None
        return await search_library(self, request, base_url=base_url)

    async def reindex(self, *, batch: int = 500) -> int:
        """Index every recording's newest transcript anew (any workspace); how many."""
        done = 0
        after: str | None = None
        while ids := await self.metadata.transcribed_recordings(after, batch):
            for recording_id in ids:
                done += await self.metadata.reindex_recording(recording_id)
            after = ids[-1]
        return done

    async def catch_up_index(self, *, batch: int = 500) -> int:
        """Index the recordings whose newest transcript is not yet (the index started empty,
        or was restored from an older backup); how many."""
        done = 0
        seen: set[str] = set()
        while ids := [r for r in await self.metadata.unindexed_recordings(batch) if r not in seen]:
            seen.update(ids)  # each once per call: one rewritten meanwhile waits for the next
            for recording_id in ids:
                done += await self.metadata.reindex_recording(recording_id)
        return done

    # ---- resumable uploads --------------------------------------------------------------------

    @functools.cached_property
    def uploads(self) -> ResumableUploads:
        """Resumable (tus) uploads of this workspace; each becomes a recording once complete."""
        from voxvault.uploads import ResumableUploads

        return ResumableUploads(self)

    # ---- maintenance (every workspace; voxvault.maintenance) ---------------------------------

    async def fsck(self, *, grace_s: float | None = None) -> FsckReport:
        """Re-hash every blob against its recorded sha256; report missing blobs and orphans."""
        return await fsck(self, grace_s=grace_s)

    async def collect_garbage(self, *, grace_s: float | None = None) -> GcReport:
        """Remove orphans, staging leftovers, stale scratch directories, expired uploads."""
        return await collect_garbage(self, grace_s=grace_s)

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

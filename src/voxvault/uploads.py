"""Resumable uploads (tus 1.0 semantics, no HTTP here): chunks in, one recording out.

Each chunk is stored through the BlobStore port: appended to the upload's one growing blob where
the store appends in place (local files), else as a part of the multipart upload of the
recording's own blob where the store assembles blobs from parts (S3), else as a part blob of its
own. Only once the chunk is durable does a conditional update move the upload's offset past it,
so the offset a client is told is always backed by bytes, whichever process it asks, and after a
crash or restart an upload resumes at the last durable offset.

A chunk goes to the multipart upload when the store takes it as a part (S3: at least 5 MiB, by
its Content-Length, or the upload's last chunk) and every chunk before it went there too; the
rest of an upload whose chunk could not (too small, of unknown size, past 10,000 numbers) are
part blobs. Each attempt takes a part number from the row first, so that racing attempts never
overwrite each other's bytes; the loser's part is left out when the upload is completed.

The chunk that fills the upload completes it: the parts, in order, are one byte stream into
``Vault.create_recording`` — the same size, probe, duration and transcription rules as a plain
upload — under a recording id chosen when the upload was created. Chunks in the multipart upload
need no copying: completing that upload makes the recording's blob (joined with the part blobs
that followed, if any). The completing process holds a lease it renews; a completion whose
process died is taken over (by the client's next HEAD or PATCH) and finishes exactly once,
since its recording id is known beforehand. Refused media (not audio, too long) terminates the
upload and removes its parts.

Abandoned uploads expire ``upload_ttl`` seconds after their last chunk; ``expire_uploads``
removes them with their parts and aborts their multipart upload (``voxvault gc`` and the
periodic sweeper call it), as termination does at once.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import secrets
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final, NoReturn, TypedDict

import anyio
import anyio.abc
from pydantic import ValidationError

from voxvault import checksums
from voxvault.blobs import BlobInfo, BlobStore, StoredBlob
from voxvault.blobs import keys as blob_keys
from voxvault.blobs.base import AppendTarget, ByteCheck, Digest
from voxvault.errors import (
    BackendUnavailable,
    ChecksumMismatch,
    Conflict,
    EmptyUpload,
    Gone,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    VoxVaultError,
)
from voxvault.metadata.uploads import Upload, UploadPart, UploadStatus, open_upload_store
from voxvault.models import RecordingPatch, validation_failed
from voxvault.names import check_filename, new_recording_id

if TYPE_CHECKING:
    from voxvault.vault import Vault

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "BodyCut",
    "Checksum",
    "ResumableUploads",
    "Upload",
    "UploadStatus",
]

log = logging.getLogger(__name__)

CHECKSUM_ALGORITHMS: Final = checksums.ALGORITHMS
METADATA_KEYS: Final = ("filename", "title", "content_type", "tags", "transcribe")
MAX_METADATA_VALUE_BYTES = 16 * 1024
COMPLETION_LEASE_S = 60.0
SETTLED = frozenset({UploadStatus.COMPLETED, UploadStatus.TERMINATED})
"""A completing upload whose process gave no sign of life for this long is taken over."""
RECENT_UPLOADS = 1024
"""How many uploads' rows and running sha256 one process keeps (about a kilobyte each)."""
GROWN_PART: Final = "grown"
"""The one part of an upload whose chunks are appended in place (where the blob store can)."""
_UPLOAD_ID_LENGTH = 32
_HEX = frozenset("0123456789abcdef")


class _RecordingFields(TypedDict):
    """What an upload's metadata says of the recording it becomes."""

    recording_id: str
    filename: str | None
    content_type: str | None
    title: str | None
    tags: list[str]
    declared_size: int
    transcribe: bool


class _Moved(Exception):
    """The upload's row moved on (or ended) while a chunk was being stored."""


class BodyCut(Exception):
    """The sender went away in the middle of a chunk (raised by the front-end's body stream)."""


@dataclass(frozen=True, slots=True)
class Checksum:
    algorithm: str
    digest: bytes

    @classmethod
    def parse(cls, value: str) -> Checksum:
        """``<algorithm> <base64 digest>``, as in tus's ``Upload-Checksum``."""
        algorithm, _, encoded = value.strip().partition(" ")
        algorithm = algorithm.lower()
        if algorithm not in CHECKSUM_ALGORITHMS:
            raise InvalidRequest(
                f"unsupported checksum algorithm {algorithm[:20]!r}",
                detail={"supported": list(CHECKSUM_ALGORITHMS)},
            )
        try:
            digest = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("the checksum is not valid base64") from None
        size = checksums.digest_size(algorithm)
        if len(digest) != size:
            raise InvalidRequest(f"a {algorithm} checksum is {size} bytes")
        return cls(algorithm, digest)


class _ChecksumCheck:
    """Verifies a chunk against its ``Upload-Checksum`` as the put stores it."""

    def __init__(self, checksum: Checksum) -> None:
        self._checksum = checksum
        self._digest = checksums.new_digest(checksum.algorithm)

    def update(self, data: bytes, /) -> None:
        self._digest.update(data)

    def verify(self) -> None:
        if self._digest.digest() != self._checksum.digest:
            raise ChecksumMismatch(
                f"the chunk does not match its {self._checksum.algorithm} checksum",
                detail={"algorithm": self._checksum.algorithm},
            )


class _RecentUploads:
    """What this process knows of the uploads whose chunks came through it last (bounded, least
    recently used): the row as it wrote it, and the sha256 of the upload's bytes so far, so that
    completion need not read them back to hash them.

    An entry is trusted only at the offset it was made for: parts are never rewritten, so an
    upload at that offset holds exactly the bytes hashed. A chunk stored by another process
    moves the upload past the entry, which then no chunk matches; completion hashes the parts.
    The row saves reading it for the next chunk; the conditional update that records that chunk
    is what decides (another process may have terminated or moved the upload meanwhile).
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[str, tuple[Upload, Digest | None]] = OrderedDict()

    def row(self, workspace: str, upload_id: str, offset: int) -> Upload | None:
        """The upload as this process last wrote it, if that was at ``offset`` and it could
        take a chunk then (active, unexpired)."""
        entry = self._entries.get(upload_id)
        if entry is None:
            return None
        upload = entry[0]
        if (upload.workspace, upload.offset) != (workspace, offset):
            return None
        if upload.status is not UploadStatus.ACTIVE:
            return None
        return upload if upload.expires_at > _now() else None

    def resume(self, upload_id: str, offset: int) -> Digest | None:
        """A copy of the hash of the upload's first ``offset`` bytes, to continue with the chunk
        at ``offset``; None when this process has not seen them all."""
        if offset == 0:
            return hashlib.sha256()
        entry = self._entries.get(upload_id)
        if entry is None or entry[0].offset != offset or entry[1] is None:
            return None
        return entry[1].copy()

    def advance(self, upload: Upload, digest: Digest | None) -> None:
        """This process wrote ``upload``; ``digest`` hashes its bytes so far (or None)."""
        self._entries[upload.id] = (upload, digest)
        self._entries.move_to_end(upload.id)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def sha256(self, upload_id: str, offset: int) -> str | None:
        entry = self._entries.get(upload_id)
        if entry is None or entry[0].offset != offset or entry[1] is None:
            return None
        return entry[1].hexdigest()

    def forget(self, upload_id: str) -> None:
        self._entries.pop(upload_id, None)


_recent = _RecentUploads(RECENT_UPLOADS)


def check_upload_id(upload_id: str) -> str:
    if len(upload_id) != _UPLOAD_ID_LENGTH or not set(upload_id) <= _HEX:
        raise NotFound(f"no upload {upload_id[:64]!r}", detail={"upload_id": upload_id[:64]})
    return upload_id


def _flag(value: str | None) -> bool:
    if value is None:
        return True
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise InvalidRequest("the transcribe metadata must be true or false")


def _tags(value: str | None) -> list[str]:
    return [t.strip() for t in (value or "").split(",") if t.strip()]


def check_upload_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Refuse at creation what completion would refuse anyway: a bad filename, title or tags."""
    for key, value in metadata.items():
        if len(value.encode()) > MAX_METADATA_VALUE_BYTES:
            raise InvalidRequest(f"the metadata value of {key[:40]!r} is too long")
    check_filename(metadata.get("filename"))
    _flag(metadata.get("transcribe"))
    try:
        RecordingPatch.model_validate(
            {
                k: v
                for k, v in {
                    "title": metadata.get("title"),
                    "tags": _tags(metadata.get("tags")),
                }.items()
                if v is not None
            }
        )
    except ValidationError as exc:
        raise validation_failed(exc) from None
    return dict(metadata)


class _Lease:
    """Renews a completion claim while the completion runs."""

    def __init__(self, uploads: ResumableUploads, upload: Upload) -> None:
        self._uploads = uploads
        self._upload = upload

    async def keep(self) -> None:
        while True:
            await anyio.sleep(COMPLETION_LEASE_S / 4)
            try:
                await self._uploads.store.renew_claim(
                    self._upload.workspace, self._upload.id, _now()
                )
            except BackendUnavailable as exc:
                log.warning("completion lease of upload %s not renewed: %s", self._upload.id, exc)


def _now() -> datetime:
    return datetime.now(UTC)


class ResumableUploads:
    """The resumable uploads of one workspace (``Vault.uploads``)."""

    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self.store = open_upload_store(vault.metadata)

    @property
    def max_size(self) -> int:
        return self.vault.settings.max_upload_bytes

    def _ttl(self) -> timedelta:
        return timedelta(seconds=self.vault.settings.upload_ttl)

    # ---- creation ----------------------------------------------------------------------------

    async def create(self, length: int, metadata: Mapping[str, str] | None = None) -> Upload:
        """A new, empty upload of ``length`` bytes (``PayloadTooLarge`` past the limit)."""
        if length <= 0:
            raise EmptyUpload("the upload is empty: Upload-Length must be at least 1")
        if length > self.max_size:
            raise PayloadTooLarge(
                f"the upload of {length} bytes exceeds the limit of {self.max_size} bytes",
                detail={"max_bytes": self.max_size},
            )
        checked = check_upload_metadata(metadata or {})
        now = _now()
        upload = Upload(
            id=uuid.uuid4().hex,
            workspace=self.vault.workspace,
            length=length,
            offset=0,
            metadata=checked,
            status=UploadStatus.ACTIVE,
            recording_id=new_recording_id(),
            created_at=now,
            updated_at=now,
            expires_at=now + self._ttl(),
        )
        await self.store.create_upload(upload)
        return upload

    # ---- reading -----------------------------------------------------------------------------

    async def get(self, upload_id: str) -> Upload:
        """The upload's state; ``Gone`` once terminated or expired.

        A full upload whose completion was cut short (its process died) is completed here, so
        that a client asking after a lost response learns the recording it became.
        """
        upload = await self._get_live(upload_id)
        if upload.status is UploadStatus.COMPLETING:
            upload = await self._take_over(upload)
        return upload

    async def _get_live(self, upload_id: str) -> Upload:
        upload = await self.store.get_upload(self.vault.workspace, check_upload_id(upload_id))
        if upload.status is UploadStatus.TERMINATED:
            raise Gone(
                f"upload {upload_id!r} was terminated"
                + (f": {upload.error}" if upload.error else ""),
                detail={"upload_id": upload_id},
            )
        if upload.status is UploadStatus.ACTIVE and upload.expires_at <= _now():
            raise Gone(f"upload {upload_id!r} has expired", detail={"upload_id": upload_id})
        return upload

    # ---- writing -----------------------------------------------------------------------------

    async def append(
        self,
        upload_id: str,
        chunks: AsyncIterable[bytes],
        *,
        offset: int,
        checksum: Checksum | None = None,
        declared_size: int | None = None,
    ) -> Upload:
        """Store one chunk at ``offset``, which must be the upload's offset (else ``Conflict``).

        With a ``checksum`` the chunk is kept only if it matches (else ``ChecksumMismatch``,
        nothing kept); without one, a chunk cut short by the client going away (``BodyCut``)
        keeps the bytes that arrived. The chunk that fills the upload completes it.
        """
        recent = _recent.row(self.vault.workspace, upload_id, offset)
        upload = recent or await self._get_live(upload_id)
        upload = self._appendable(upload, offset, declared_size)
        if upload.complete:
            # A retry of the final chunk whose response was lost: nothing more to store.
            return await self.get(upload_id) if upload.status is UploadStatus.COMPLETING else upload
        if not self.vault.blobs.appends_in_place:
            return await self._store_chunk(upload, chunks, checksum, None, declared_size)
        key = blob_keys.upload_part(upload.id, GROWN_PART)
        async with self.vault.blobs.appending(key) as grown:
            if grown.size != upload.offset:
                # Bytes past the offset read (a chunk nobody recorded, or another request's
                # since): what the row says now, under the lock, decides.
                upload = self._appendable(await self._get_live(upload_id), offset, declared_size)
                if upload.complete:
                    return await self.get(upload_id)
                if grown.size < upload.offset:
                    raise BackendUnavailable(
                        f"upload {upload.id} holds {grown.size} bytes, not {upload.offset}"
                    )
            return await self._store_chunk(upload, chunks, checksum, grown)

    @staticmethod
    def _appendable(upload: Upload, offset: int, declared_size: int | None) -> Upload:
        """``upload``, if a chunk of ``declared_size`` bytes at ``offset`` may go on it."""
        if offset != upload.offset:
            raise Conflict(
                f"the upload is at offset {upload.offset}, not {offset}",
                detail={"upload_offset": upload.offset},
            )
        remaining = upload.length - upload.offset
        if declared_size is not None and declared_size > remaining:
            raise PayloadTooLarge(
                f"the chunk of {declared_size} bytes passes the upload's length of "
                f"{upload.length} bytes",
                detail={"upload_length": upload.length, "upload_offset": upload.offset},
            )
        return upload

    async def _store_chunk(
        self,
        upload: Upload,
        chunks: AsyncIterable[bytes],
        checksum: Checksum | None,
        grown: AppendTarget | None,
        declared_size: int | None = None,
    ) -> Upload:
        """Store the chunk at the upload's offset: appended to ``grown``, the upload's blob grown
        in place (held by this request), or else as a part of the upload's multipart upload
        where it can be one, or else as a part blob of its own."""
        running = _recent.resume(upload.id, upload.offset)
        body = _verified(chunks, checksum)
        checks = [_ChecksumCheck(checksum)] if checksum else []
        try:
            numbered = None if grown is not None else await self._number(upload, declared_size)
            appended: Upload | None
            if numbered is not None:
                upload, number = numbered
                assert declared_size is not None
                appended = await self._store_in_multipart(
                    upload, number, body, declared_size, running, checks
                )
            else:
                appended = await self._store_as_blob(upload, body, running, checks, grown)
        except _Moved:
            current = await self._get_live(upload.id)  # Gone when terminated meanwhile
            raise Conflict(
                f"another request moved the upload to offset {current.offset} meanwhile",
                detail={"upload_offset": current.offset},
            ) from None
        if appended is None:
            return upload  # an empty chunk
        _recent.advance(appended, running)
        if appended.status is UploadStatus.COMPLETING:
            return await self._complete(appended)
        return appended

    async def _store_as_blob(
        self,
        upload: Upload,
        body: AsyncIterable[bytes],
        running: Digest | None,
        checks: Sequence[ByteCheck],
        grown: AppendTarget | None,
    ) -> Upload | None:
        """The chunk appended to ``grown`` or as a part blob; the upload as recorded with it
        (None for an empty chunk), ``_Moved`` if the row moved meanwhile."""
        offset, blobs = upload.offset, self.vault.blobs
        name = (
            GROWN_PART if grown is not None else f"{len(upload.parts):08d}-{secrets.token_hex(4)}"
        )
        recorded: list[Upload] = []

        async def record(size: int) -> None:
            """Move the row past the durable chunk; ``_Moved`` if it moved meanwhile."""
            if size == 0:
                return
            now = _now()
            appended = await self.store.append_part(
                upload, UploadPart(name=name, size=size), now=now, expires_at=now + self._ttl()
            )
            if appended is None:
                raise _Moved
            recorded.append(appended)

        if grown is not None:
            # Recorded as soon as the bytes are durable, while their hash catches up; a failure
            # to record cuts them back off the file.
            await grown.append(
                offset,
                body,
                max_bytes=upload.length - offset,
                sha256=running,
                checks=checks,
                then=record,
            )
        else:
            key = blob_keys.upload_part(upload.id, name)
            stored = await blobs.put_stream(
                key,
                body,
                max_bytes=upload.length - offset,
                allow_empty=True,
                sha256=running,
                checks=checks,
            )
            # Shielded: once the part is durable, the row must learn of it or it must go.
            with anyio.CancelScope(shield=True):
                try:
                    await record(stored.size)
                finally:
                    if not recorded:
                        await blobs.delete(key)
        return recorded[0] if recorded else None

    # ---- the multipart upload of the recording's blob ------------------------------------------

    async def _number(self, upload: Upload, declared_size: int | None) -> tuple[Upload, int] | None:
        """The upload (with its multipart id) and the part number for a chunk of
        ``declared_size`` bytes at its offset, if the chunk goes to the multipart upload; None
        if it is to be a part blob. ``_Moved`` if the row moved on meanwhile.

        The multipart upload is started by the first chunk that goes there; of processes
        starting one at once, the first to claim a number makes its own the upload's, and the
        others abort theirs."""
        blobs = self.vault.blobs
        limits = blobs.part_limits
        if limits is None or declared_size is None or not 0 < declared_size <= limits.max_bytes:
            return None
        final = upload.offset + declared_size == upload.length
        if declared_size < limits.min_bytes and not final:
            return None
        if not all(part.in_multipart for part in upload.parts):
            return None  # the parts of the multipart upload come first, in one run
        key = blob_keys.recording_original(upload.recording_id)
        multipart_id, started = upload.multipart_id, None
        if multipart_id is None:
            multipart_id = started = await blobs.start_multipart(key)
        claimed = None
        try:
            claimed = await self.store.claim_part_number(
                upload, multipart_id=multipart_id, now=_now()
            )
        finally:
            if started is not None and (claimed is None or claimed[0] != started):
                with anyio.CancelScope(shield=True):
                    await self._abort_multipart(key, started)
        if claimed is None:
            raise _Moved
        multipart_id, number = claimed
        if number > limits.max_number:
            return None
        return replace(upload, multipart_id=multipart_id), number

    async def _store_in_multipart(
        self,
        upload: Upload,
        number: int,
        body: AsyncIterable[bytes],
        size: int,
        running: Digest | None,
        checks: Sequence[ByteCheck],
    ) -> Upload:
        """The chunk, ``size`` bytes, as part ``number`` of the upload's multipart upload; the
        upload as recorded with it, ``_Moved`` if the row moved meanwhile.

        Only the whole chunk can be a part (S3 is told its size first): one cut short keeps
        nothing, and the client sends it again from the offset it asks for."""
        assert upload.multipart_id is not None
        key = blob_keys.recording_original(upload.recording_id)
        try:
            stored = await self.vault.blobs.put_part(
                key, upload.multipart_id, number, body, size=size, sha256=running, checks=checks
            )
        except (BackendUnavailable, NotFound) as exc:
            # The multipart upload ends with the upload (terminated, or completed by the chunk
            # that won a race): that, not the store's refusal of the part, is the answer.
            current = await self._get_live(upload.id)
            if (current.status, current.offset) != (UploadStatus.ACTIVE, upload.offset):
                raise _Moved from None
            if isinstance(exc, NotFound):
                await self._lost(current)
            raise
        part = UploadPart(
            name=f"multipart-{number:05d}", size=size, part_number=number, etag=stored.etag
        )
        now = _now()
        with anyio.CancelScope(shield=True):
            appended = await self.store.append_part(
                upload, part, now=now, expires_at=now + self._ttl()
            )
        if appended is None:
            # The part is left out when the upload completes. If the upload was terminated
            # meanwhile, its abort may have come before the part was stored: abort again.
            current = await self.store.get_upload(upload.workspace, upload.id)
            if current.status is UploadStatus.TERMINATED:
                with anyio.CancelScope(shield=True):
                    await self._abort_multipart(key, upload.multipart_id)
            raise _Moved
        return appended

    async def _lost(self, upload: Upload) -> NoReturn:
        """End an upload whose multipart upload the store no longer has (a bucket lifecycle rule
        aborted it), with the chunks it held: no chunk can complete it any more."""
        error = "the store removed the chunks stored so far (its multipart upload was aborted)"
        if not await self._end_active(upload, error, abort=False):
            raise _Moved
        raise Gone(
            f"upload {upload.id} is lost: the store removed the chunks stored so far; "
            "upload the file again",
            detail={"upload_id": upload.id},
        )

    async def _abort_multipart(self, key: str, multipart_id: str) -> None:
        """Abort a multipart upload nobody will complete, as far as the store is reachable: what
        a failure here leaves, the bucket's lifecycle rule removes."""
        try:
            await self.vault.blobs.abort_multipart(key, multipart_id)
        except Exception:
            log.warning("multipart upload %s of %s left behind", multipart_id, key, exc_info=True)

    # ---- completion --------------------------------------------------------------------------

    async def _take_over(self, upload: Upload) -> Upload:
        """Complete a full upload whose completion is not running anywhere (any more)."""
        now = _now()
        claimed = await self.store.claim_completion(
            upload.workspace,
            upload.id,
            now=now,
            stale_before=now - timedelta(seconds=COMPLETION_LEASE_S),
        )
        if claimed is None:
            return upload  # another process is completing it now
        return await self._complete(claimed)

    async def _complete(self, upload: Upload) -> Upload:
        """Turn a claimed, full upload into its recording, once; shielded from cancellation,
        since the client may give up waiting while the bytes are probed."""
        made: list[Upload] = []
        failed: list[Exception] = []

        async def make(group: anyio.abc.TaskGroup) -> None:
            try:
                made.append(await self._make_recording(upload))
            except Exception as exc:  # re-raised below, outside the task group's wrapping
                failed.append(exc)
            finally:
                group.cancel_scope.cancel()  # ends the lease renewal

        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as group:
                group.start_soon(_Lease(self, upload).keep)
                group.start_soon(make, group)
        if failed:
            raise failed[0]
        return made[0]

    async def _make_recording(self, upload: Upload) -> Upload:
        vault = self.vault
        try:
            await vault.get_recording(upload.recording_id)
        except NotFound:
            meta = upload.metadata
            fields = _RecordingFields(
                recording_id=upload.recording_id,
                filename=meta.get("filename"),
                content_type=meta.get("content_type"),
                title=meta.get("title"),
                tags=_tags(meta.get("tags")),
                declared_size=upload.length,
                transcribe=_flag(meta.get("transcribe")),
            )
            try:
                if _assembled(upload):
                    # Stored by completing the multipart upload; then the same rules as any
                    # recording (which remove the blob if they refuse it).
                    await vault.create_recording_stored_by(
                        lambda key, limit: self._assemble(upload, key, limit), **fields
                    )
                else:
                    await vault.create_recording_from_blobs(
                        await self._part_keys_checked(upload),
                        # Known when every chunk came through this process: no need to read them.
                        sha256=_recent.sha256(upload.id, upload.length),
                        part_sizes=[part.size for part in upload.parts],
                        **fields,
                    )
            except BackendUnavailable:
                raise  # a store is away: the parts stay, and the next HEAD or PATCH retries
            except VoxVaultError as exc:
                # Refused (not audio, too long, ...): nothing of the upload is kept, the blob
                # its multipart upload became included.
                if _assembled(upload):
                    await vault.blobs.delete(blob_keys.recording_original(upload.recording_id))
                await self._settle(upload, UploadStatus.TERMINATED, error=exc.message)
                raise
        return await self._settle(upload, UploadStatus.COMPLETED)

    async def _assemble(self, upload: Upload, key: str, limit: int) -> StoredBlob:
        """The recording's blob at ``key``: the upload's multipart upload completed, and joined
        with the part blobs that followed it, if any.

        Safe to run again after a crash at any point: a multipart upload completed before is
        gone from the store, and the blob it became is told by its size (the multipart run's,
        else the whole upload's once joined)."""
        blobs = self.vault.blobs
        assert upload.multipart_id is not None
        run = [part for part in upload.parts if part.in_multipart]
        rest = upload.parts[len(run) :]
        run_size = sum(part.size for part in run)
        numbered = [(part.part_number or 0, part.etag or "") for part in run]
        # NotFound: completed before, by a process that died since or whose answer was lost.
        with contextlib.suppress(NotFound):
            await blobs.complete_multipart(key, upload.multipart_id, numbered)
        try:
            size = (await blobs.stat(key)).size
        except NotFound:
            raise NotFound(
                f"the bytes of upload {upload.id} are gone (its multipart upload was aborted)"
            ) from None
        # Known when every chunk came through this process: no need to read them.
        sha256 = _recent.sha256(upload.id, upload.length)
        if rest and size == run_size:
            keys = await self._part_keys_checked(replace(upload, parts=rest))
            return await blobs.compose(
                key,
                [key, *keys],
                sha256=sha256,
                max_bytes=limit,
                sizes=[run_size, *(part.size for part in rest)],
            )
        if size != upload.length:
            raise BackendUnavailable(
                f"the blob of upload {upload.id} holds {size} bytes, not {upload.length}"
            )
        return StoredBlob(key=key, size=size, sha256=sha256 or await _sha256_of(blobs, key, size))

    async def _settle(
        self, upload: Upload, status: UploadStatus, *, error: str | None = None
    ) -> Upload:
        now = _now()
        # Kept for a while (HEAD answers with the recording, or 410), then swept.
        expires_at = now + self._ttl()
        settled = await self.store.settle_upload(
            upload.workspace,
            upload.id,
            status,
            from_statuses=[UploadStatus.COMPLETING],
            now=now,
            expires_at=expires_at,
            error=error,
        )
        _recent.forget(upload.id)
        completed = status is UploadStatus.COMPLETED and _assembled(upload)
        await self._remove_parts(settled or upload, abort=not completed)
        return Upload(
            id=upload.id,
            workspace=upload.workspace,
            length=upload.length,
            offset=upload.offset,
            metadata=upload.metadata,
            status=status,
            recording_id=upload.recording_id,
            created_at=upload.created_at,
            updated_at=now,
            expires_at=expires_at,
            error=error,
        )

    async def _part_keys_checked(self, upload: Upload) -> list[str]:
        """The keys of the upload's parts, in order, each checked to hold the bytes recorded."""
        keys: list[str] = []
        for part in upload.parts:
            key = blob_keys.upload_part(upload.id, part.name)
            info = await self.vault.blobs.stat(key)
            if info.size != part.size:
                raise BackendUnavailable(
                    f"part {part.name} of upload {upload.id} holds {info.size} bytes, "
                    f"not {part.size}"
                )
            keys.append(key)
        return keys

    # ---- termination and expiry --------------------------------------------------------------

    async def terminate(self, upload_id: str) -> None:
        """End an unfinished upload and remove its bytes; later requests get ``Gone``."""
        upload = await self._get_live(upload_id)
        if upload.status is not UploadStatus.ACTIVE:
            raise Conflict(
                "the upload is complete; delete the recording it became instead",
                detail={"recording_id": upload.recording_id},
            )
        if not await self._end_active(upload, "terminated by the client", abort=True):
            await self.terminate(upload_id)  # it moved meanwhile: answer for its new state

    async def _end_active(self, upload: Upload, error: str, *, abort: bool) -> bool:
        """Terminate ``upload`` if it is still active, and remove its parts (and with ``abort``
        its multipart upload); False if it had moved on meanwhile."""
        now = _now()
        settled = await self.store.settle_upload(
            upload.workspace,
            upload.id,
            UploadStatus.TERMINATED,
            from_statuses=[UploadStatus.ACTIVE],
            now=now,
            expires_at=now + self._ttl(),
            error=error,
        )
        if settled is None:
            return False
        _recent.forget(upload.id)
        with anyio.CancelScope(shield=True):
            await self._remove_parts(settled, abort=abort)
        return True

    async def _remove_parts(self, upload: Upload, *, abort: bool) -> None:
        """Remove a settled upload's parts, and with ``abort`` its multipart upload (as the row
        has it once settled: no chunk can start one any more). The upload is settled either way:
        what a failure here leaves, the next sweep (``sweep_parts``) or the upload's expiry
        removes, so the request still succeeds."""
        try:
            await self.vault.blobs.delete_prefix(blob_keys.upload_prefix(upload.id))
        except Exception:
            log.warning("upload %s: its parts wait for the next sweep", upload.id, exc_info=True)
        if abort and upload.multipart_id is not None:
            key = blob_keys.recording_original(upload.recording_id)
            await self._abort_multipart(key, upload.multipart_id)

    async def sweep_parts(self, older_than: datetime) -> list[str]:
        """Remove the part blobs no upload needs; returns their keys.

        Every part of a settled (completed or terminated) upload: a process that died between
        settling it and removing its parts left them. Parts that a live upload's row does not
        list (a chunk whose process died before recording it), and parts whose upload has no
        row, once older than ``older_than``: a younger one may be a chunk landing now.
        """
        staged: dict[str, list[BlobInfo]] = {}
        async for info in self.vault.blobs.list(blob_keys.UPLOADS_PREFIX):
            upload_id = info.key.removeprefix(blob_keys.UPLOADS_PREFIX).split("/", 1)[0]
            staged.setdefault(upload_id, []).append(info)
        rows = await self.store.find_uploads(list(staged))
        removed: list[str] = []
        for upload_id, infos in staged.items():
            row = rows.get(upload_id)
            settled = row is not None and row.status in SETTLED
            listed = set() if row is None or settled else _part_keys(row)
            for info in infos:
                if info.key in listed or (not settled and info.modified_at >= older_than):
                    continue
                if await self.vault.blobs.delete(info.key):
                    removed.append(info.key)
        return removed

    async def finish_stalled_completions(self) -> list[str]:
        """Complete every full upload whose completing process died and whose client has not
        come back to finish it (a HEAD or PATCH would); returns the recordings' ids."""
        stale_before = _now() - timedelta(seconds=COMPLETION_LEASE_S)
        finished: list[str] = []
        for upload in await self.store.list_stalled_completions(stale_before):
            uploads = self.vault.for_workspace(upload.workspace).uploads
            try:
                done = await uploads._take_over(upload)
            except VoxVaultError as exc:  # refused media: the upload is terminated by now
                log.info("upload %s could not be completed: %s", upload.id, exc.message)
                continue
            if done.status is UploadStatus.COMPLETED:
                finished.append(done.recording_id)
        return finished

    async def expire_uploads(self, now: datetime | None = None) -> int:
        """Remove every upload (of every workspace) whose time ran out by ``now``, with its
        bytes: abandoned unfinished ones, and the records of finished or terminated ones.
        Returns how many uploads were removed. Safe to run from several processes at once."""
        now = now or _now()
        removed = 0
        while batch := await self.store.list_expired_uploads(now):
            progressed = False
            for upload in batch:
                # Tombstone first, so that no chunk lands after the bytes are gone; a chunk that
                # extended the upload meanwhile keeps it alive.
                if upload.status in (UploadStatus.ACTIVE, UploadStatus.COMPLETING):
                    settled = await self.store.settle_upload(
                        upload.workspace,
                        upload.id,
                        UploadStatus.TERMINATED,
                        from_statuses=[upload.status],
                        now=now,
                        expires_at=upload.expires_at,
                        error="expired",
                        expired_before=now,
                    )
                    if settled is None:
                        continue
                    upload = settled
                await self.vault.blobs.delete_prefix(blob_keys.upload_prefix(upload.id))
                if (
                    upload.multipart_id is not None
                    and upload.status is UploadStatus.TERMINATED
                    and self.vault.blobs.part_limits is not None
                ):
                    # Aborted at termination already, unless that failed; a completed upload's
                    # became the recording's blob.
                    await self.vault.blobs.abort_multipart(
                        blob_keys.recording_original(upload.recording_id), upload.multipart_id
                    )
                if await self.store.delete_upload(upload.workspace, upload.id):
                    removed += 1
                progressed = True
            if not progressed:
                break
        return removed


def _part_keys(upload: Upload) -> set[str]:
    return {blob_keys.upload_part(upload.id, part.name) for part in upload.parts}


def _assembled(upload: Upload) -> bool:
    """Whether the upload's bytes begin with parts of its multipart upload."""
    return upload.multipart_id is not None and bool(upload.parts) and upload.parts[0].in_multipart


async def _sha256_of(blobs: BlobStore, key: str, size: int) -> str:
    """The blob's sha256, read back (hashed off the event loop)."""
    digest = hashlib.sha256()
    async for chunk in blobs.stream_range(key, 0, size):
        await anyio.to_thread.run_sync(digest.update, chunk)
    return digest.hexdigest()


async def _verified(
    chunks: AsyncIterable[bytes], checksum: Checksum | None
) -> AsyncIterator[bytes]:
    """The chunk's bytes (the put verifies them against ``checksum`` before committing them).
    A cut-short body ends the stream, keeping what came, unless a checksum was sent."""
    try:
        async for chunk in chunks:
            yield chunk
    except BodyCut:
        if checksum is not None:
            raise InvalidRequest("the chunk was cut short; its checksum cannot match") from None
        return

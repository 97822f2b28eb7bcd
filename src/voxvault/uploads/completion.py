"""Completing a full upload: its parts, in order, become the recording whose id was chosen when
the upload was created, exactly once, while the completing process holds a lease it renews."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, TypedDict

import anyio
import anyio.abc

from voxvault.blobs import BlobStore, StoredBlob
from voxvault.blobs import keys as blob_keys
from voxvault.errors import BackendUnavailable, NotFound, VoxVaultError
from voxvault.metadata.uploads import Upload, UploadStatus
from voxvault.uploads.checks import _flag, _tags
from voxvault.uploads.common import _now
from voxvault.uploads.recent import _recent

if TYPE_CHECKING:
    from voxvault.uploads.resumable import ResumableUploads


log = logging.getLogger("voxvault.uploads")


COMPLETION_LEASE_S = 60.0
"""A completing upload whose process gave no sign of life for this long is taken over."""


class _RecordingFields(TypedDict):
    """What an upload's metadata says of the recording it becomes."""

    recording_id: str
    filename: str | None
    content_type: str | None
    title: str | None
    tags: list[str]
    declared_size: int
    transcribe: bool


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


async def take_over(uploads: ResumableUploads, upload: Upload) -> Upload:
    """Complete a full upload whose completion is not running anywhere (any more)."""
    now = _now()
    claimed = await uploads.store.claim_completion(
        upload.workspace,
        upload.id,
        now=now,
        stale_before=now - timedelta(seconds=COMPLETION_LEASE_S),
    )
    if claimed is None:
        return upload  # another process is completing it now
    return await complete(uploads, claimed)


async def complete(uploads: ResumableUploads, upload: Upload) -> Upload:
    """Turn a claimed, full upload into its recording, once; shielded from cancellation,
    since the client may give up waiting while the bytes are probed."""
    made: list[Upload] = []
    failed: list[Exception] = []

    async def make(group: anyio.abc.TaskGroup) -> None:
        try:
            made.append(await _make_recording(uploads, upload))
        except Exception as exc:  # re-raised below, outside the task group's wrapping
            failed.append(exc)
        finally:
            group.cancel_scope.cancel()  # ends the lease renewal

    with anyio.CancelScope(shield=True):
        async with anyio.create_task_group() as group:
            group.start_soon(_Lease(uploads, upload).keep)
            group.start_soon(make, group)
    if failed:
        raise failed[0]
    return made[0]


async def _make_recording(uploads: ResumableUploads, upload: Upload) -> Upload:
    vault = uploads.vault
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
                    lambda key, limit: _assemble(uploads, upload, key, limit), **fields
                )
            else:
                await vault.create_recording_from_blobs(
                    await _part_keys_checked(uploads, upload),
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
            await _settle(uploads, upload, UploadStatus.TERMINATED, error=exc.message)
            raise
    return await _settle(uploads, upload, UploadStatus.COMPLETED)


async def _assemble(uploads: ResumableUploads, upload: Upload, key: str, limit: int) -> StoredBlob:
    """The recording's blob at ``key``: the upload's multipart upload completed, and joined
    with the part blobs that followed it, if any.

    Safe to run again after a crash at any point: a multipart upload completed before is
    gone from the store, and the blob it became is told by its size (the multipart run's,
    else the whole upload's once joined)."""
    blobs = uploads.vault.blobs
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
        keys = await _part_keys_checked(uploads, replace(upload, parts=rest))
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
    uploads: ResumableUploads, upload: Upload, status: UploadStatus, *, error: str | None = None
) -> Upload:
    now = _now()
    # Kept for a while (HEAD answers with the recording, or 410), then swept.
    expires_at = now + uploads._ttl()
    settled = await uploads.store.settle_upload(
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
    await uploads._remove_parts(settled or upload, abort=not completed)
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


async def _part_keys_checked(uploads: ResumableUploads, upload: Upload) -> list[str]:
    """The keys of the upload's parts, in order, each checked to hold the bytes recorded."""
    keys: list[str] = []
    for part in upload.parts:
        key = blob_keys.upload_part(upload.id, part.name)
        info = await uploads.vault.blobs.stat(key)
        if info.size != part.size:
            raise BackendUnavailable(
                f"part {part.name} of upload {upload.id} holds {info.size} bytes, not {part.size}"
            )
        keys.append(key)
    return keys


def _assembled(upload: Upload) -> bool:
    """Whether the upload's bytes begin with parts of its multipart upload."""
    return upload.multipart_id is not None and bool(upload.parts) and upload.parts[0].in_multipart


async def _sha256_of(blobs: BlobStore, key: str, size: int) -> str:
    """The blob's sha256, read back (hashed off the event loop)."""
    digest = hashlib.sha256()
    async for chunk in blobs.stream_range(key, 0, size):
        await anyio.to_thread.run_sync(digest.update, chunk)
    return digest.hexdigest()

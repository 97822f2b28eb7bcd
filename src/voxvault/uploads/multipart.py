"""The multipart upload of the recording's blob, where the blob store assembles blobs from parts
(S3): which chunks go there and under which part numbers, storing them, and ending it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, NoReturn

import anyio

from voxvault.blobs import keys as blob_keys
from voxvault.blobs.base import ByteCheck, Digest
from voxvault.errors import BackendUnavailable, Gone, NotFound
from voxvault.metadata.uploads import Upload, UploadPart, UploadStatus
from voxvault.uploads.common import _Moved, _now

if TYPE_CHECKING:
    from voxvault.uploads.resumable import ResumableUploads


log = logging.getLogger("voxvault.uploads")


async def claim_part(
    uploads: ResumableUploads, upload: Upload, declared_size: int | None
) -> tuple[Upload, int] | None:
    """The upload (with its multipart id) and the part number for a chunk of
    ``declared_size`` bytes at its offset, if the chunk goes to the multipart upload; None
    if it is to be a part blob. ``_Moved`` if the row moved on meanwhile.

    The multipart upload is started by the first chunk that goes there; of processes
    starting one at once, the first to claim a number makes its own the upload's, and the
    others abort theirs."""
    blobs = uploads.vault.blobs
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
        claimed = await uploads.store.claim_part_number(
            upload, multipart_id=multipart_id, now=_now()
        )
    finally:
        if started is not None and (claimed is None or claimed[0] != started):
            with anyio.CancelScope(shield=True):
                await abort_multipart(uploads, key, started)
    if claimed is None:
        raise _Moved
    multipart_id, number = claimed
    if number > limits.max_number:
        return None
    return replace(upload, multipart_id=multipart_id), number


async def store_in_multipart(
    uploads: ResumableUploads,
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
        stored = await uploads.vault.blobs.put_part(
            key, upload.multipart_id, number, body, size=size, sha256=running, checks=checks
        )
    except (BackendUnavailable, NotFound) as exc:
        # The multipart upload ends with the upload (terminated, or completed by the chunk
        # that won a race): that, not the store's refusal of the part, is the answer.
        current = await uploads._get_live(upload.id)
        if (current.status, current.offset) != (UploadStatus.ACTIVE, upload.offset):
            raise _Moved from None
        if isinstance(exc, NotFound):
            await _lost(uploads, current)
        raise
    part = UploadPart(
        name=f"multipart-{number:05d}", size=size, part_number=number, etag=stored.etag
    )
    now = _now()
    with anyio.CancelScope(shield=True):
        appended = await uploads.store.append_part(
            upload, part, now=now, expires_at=now + uploads._ttl()
        )
    if appended is None:
        # The part is left out when the upload completes. If the upload was terminated
        # meanwhile, its abort may have come before the part was stored: abort again.
        current = await uploads.store.get_upload(upload.workspace, upload.id)
        if current.status is UploadStatus.TERMINATED:
            with anyio.CancelScope(shield=True):
                await abort_multipart(uploads, key, upload.multipart_id)
        raise _Moved
    return appended


async def _lost(uploads: ResumableUploads, upload: Upload) -> NoReturn:
    """End an upload whose multipart upload the store no longer has (a bucket lifecycle rule
    aborted it), with the chunks it held: no chunk can complete it any more."""
    error = "the store removed the chunks stored so far (its multipart upload was aborted)"
    if not await uploads._end_active(upload, error, abort=False):
        raise _Moved
    raise Gone(
        f"upload {upload.id} is lost: the store removed the chunks stored so far; "
        "upload the file again",
        detail={"upload_id": upload.id},
    )


async def abort_multipart(uploads: ResumableUploads, key: str, multipart_id: str) -> None:
    """Abort a multipart upload nobody will complete, as far as the store is reachable: what
    a failure here leaves, the bucket's lifecycle rule removes."""
    try:
        await uploads.vault.blobs.abort_multipart(key, multipart_id)
    except Exception:
        log.warning("multipart upload %s of %s left behind", multipart_id, key, exc_info=True)

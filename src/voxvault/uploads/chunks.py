"""Storing one chunk of an upload at its offset: appended in place to the upload's one growing
blob, as a part of the multipart upload of the recording's blob, or as a part blob of its own;
then recorded on the upload's row, and the upload completed if the chunk filled it."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import TYPE_CHECKING, Final

import anyio

from voxvault.blobs import keys as blob_keys
from voxvault.blobs.base import AppendTarget, ByteCheck, Digest
from voxvault.errors import Conflict, InvalidRequest
from voxvault.metadata.uploads import Upload, UploadPart, UploadStatus
from voxvault.uploads import completion, multipart
from voxvault.uploads.checks import Checksum, _ChecksumCheck
from voxvault.uploads.common import _Moved, _now
from voxvault.uploads.recent import _recent

if TYPE_CHECKING:
    from voxvault.uploads.resumable import ResumableUploads


GROWN_PART: Final = "grown"
"""The one part of an upload whose chunks are appended in place (where the blob store can)."""


class BodyCut(Exception):
    """The sender went away in the middle of a chunk (raised by the front-end's body stream)."""


async def store_chunk(
    uploads: ResumableUploads,
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
        numbered = (
            None
            if grown is not None
            else await multipart.claim_part(uploads, upload, declared_size)
        )
        appended: Upload | None
        if numbered is not None:
            upload, number = numbered
            assert declared_size is not None
            appended = await multipart.store_in_multipart(
                uploads, upload, number, body, declared_size, running, checks
            )
        else:
            appended = await _store_as_blob(uploads, upload, body, running, checks, grown)
    except _Moved:
        current = await uploads._get_live(upload.id)  # Gone when terminated meanwhile
        raise Conflict(
            f"another request moved the upload to offset {current.offset} meanwhile",
            detail={"upload_offset": current.offset},
        ) from None
    if appended is None:
        return upload  # an empty chunk
    _recent.advance(appended, running)
    if appended.status is UploadStatus.COMPLETING:
        return await completion.complete(uploads, appended)
    return appended


async def _store_as_blob(
    uploads: ResumableUploads,
    upload: Upload,
    body: AsyncIterable[bytes],
    running: Digest | None,
    checks: Sequence[ByteCheck],
    grown: AppendTarget | None,
) -> Upload | None:
    """The chunk appended to ``grown`` or as a part blob; the upload as recorded with it
    (None for an empty chunk), ``_Moved`` if the row moved meanwhile."""
    offset, blobs = upload.offset, uploads.vault.blobs
    name = GROWN_PART if grown is not None else f"{len(upload.parts):08d}-{secrets.token_hex(4)}"
    recorded: list[Upload] = []

    async def record(size: int) -> None:
        """Move the row past the durable chunk; ``_Moved`` if it moved meanwhile."""
        if size == 0:
            return
        now = _now()
        appended = await uploads.store.append_part(
            upload, UploadPart(name=name, size=size), now=now, expires_at=now + uploads._ttl()
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

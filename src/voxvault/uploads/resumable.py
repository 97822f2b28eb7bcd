"""``ResumableUploads``, what the front-end and the maintenance sweeps call: creating an upload,
reading its state, appending a chunk, terminating it, and the sweeps of what uploads leave."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import anyio

from voxvault.blobs import BlobInfo
from voxvault.blobs import keys as blob_keys
from voxvault.errors import (
    BackendUnavailable,
    Conflict,
    EmptyUpload,
    Gone,
    PayloadTooLarge,
    VoxVaultError,
)
from voxvault.metadata.uploads import Upload, UploadStatus, open_upload_store
from voxvault.names import new_recording_id
from voxvault.uploads import completion, multipart
from voxvault.uploads.checks import Checksum, check_upload_id, check_upload_metadata
from voxvault.uploads.chunks import GROWN_PART, store_chunk
from voxvault.uploads.common import _now
from voxvault.uploads.completion import COMPLETION_LEASE_S
from voxvault.uploads.recent import _recent

if TYPE_CHECKING:
    from voxvault.vault import Vault


log = logging.getLogger("voxvault.uploads")


SETTLED = frozenset({UploadStatus.COMPLETED, UploadStatus.TERMINATED})


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
            upload = await completion.take_over(self, upload)
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
            return await store_chunk(self, upload, chunks, checksum, None, declared_size)
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
            return await store_chunk(self, upload, chunks, checksum, grown)

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
            await multipart.abort_multipart(self, key, upload.multipart_id)

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
                done = await completion.take_over(uploads, upload)
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

"""The uploads whose chunks came through this process last: their rows as it wrote them, and the
sha256 of their bytes so far."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from voxvault.blobs.base import Digest
from voxvault.metadata.uploads import Upload, UploadStatus
from voxvault.uploads.common import _now

RECENT_UPLOADS = 1024
"""How many uploads' rows and running sha256 one process keeps (about a kilobyte each)."""


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

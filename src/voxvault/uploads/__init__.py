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

The modules: ``checks`` (the upload id, metadata and chunk checksums a request brings),
``resumable`` (``ResumableUploads``: creating, reading, appending, terminating, the sweeps),
``chunks`` (storing one chunk), ``multipart`` (the multipart upload of the recording's blob),
``completion`` (the recording the full upload becomes), ``recent`` (what this process knows of
the uploads it saw last) and ``common`` (what they share).
"""

# Besides ``__all__``, the names imported ``as`` themselves stay importable from here, as
# when it was one module.
from voxvault.metadata.uploads import Upload, UploadStatus
from voxvault.uploads.checks import CHECKSUM_ALGORITHMS, Checksum
from voxvault.uploads.checks import MAX_METADATA_VALUE_BYTES as MAX_METADATA_VALUE_BYTES
from voxvault.uploads.checks import check_upload_id as check_upload_id
from voxvault.uploads.checks import check_upload_metadata as check_upload_metadata
from voxvault.uploads.chunks import GROWN_PART as GROWN_PART
from voxvault.uploads.chunks import BodyCut
from voxvault.uploads.completion import COMPLETION_LEASE_S as COMPLETION_LEASE_S
from voxvault.uploads.recent import RECENT_UPLOADS as RECENT_UPLOADS
from voxvault.uploads.recent import _recent as _recent
from voxvault.uploads.recent import _RecentUploads as _RecentUploads
from voxvault.uploads.resumable import SETTLED as SETTLED
from voxvault.uploads.resumable import ResumableUploads

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "BodyCut",
    "Checksum",
    "ResumableUploads",
    "Upload",
    "UploadStatus",
]

"""VoxVault: storage for audio recordings and everything derived from them.

Use ``Vault`` from a script or another app::

    from voxvault import Vault

    async with await Vault.open() as vault:
        recording = await vault.add_file("meeting.wav", title="Weekly sync")
"""

from voxvault.errors import (
    BackendUnavailable,
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    UnsupportedMedia,
    ValidationFailed,
    VoxVaultError,
)
from voxvault.exports import ExportFormat
from voxvault.models import (
    Artifact,
    PlaybackLink,
    Recording,
    RecordingPage,
    RecordingPatch,
    RecordingQuery,
    RecordingStatus,
    Segment,
    StorageInfo,
    Transcript,
    TranscriptInput,
    TranscriptVersion,
    Word,
)
from voxvault.settings import Settings
from voxvault.vault import Download, Vault

__version__ = "0.1.0"

__all__ = [
    "Artifact",
    "BackendUnavailable",
    "Conflict",
    "Download",
    "ExportFormat",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "PlaybackLink",
    "Recording",
    "RecordingPage",
    "RecordingPatch",
    "RecordingQuery",
    "RecordingStatus",
    "Segment",
    "Settings",
    "StorageInfo",
    "Transcript",
    "TranscriptInput",
    "TranscriptVersion",
    "UnsupportedMedia",
    "ValidationFailed",
    "Vault",
    "VoxVaultError",
    "Word",
    "__version__",
]

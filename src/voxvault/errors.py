"""The one exception tree of VoxVault.

Every error the service layer raises on purpose is a ``VoxVaultError``. Backend errors are
translated into this tree at the adapter boundary; the HTTP status of each class is decided in
one place, ``voxvault.api.errors``.

::

    VoxVaultError                      (500 internal: a bug, never a client's fault)
    ├── InvalidRequest                 (400 bad_request: malformed input)
    │   └── EmptyUpload                (400 empty_upload)
    ├── SignatureInvalid               (403 signature_invalid: tampered or expired URL)
    ├── NotFound                       (404 not_found)
    │   └── Gone                       (410 gone: it existed, and was ended or expired)
    ├── Conflict                       (409 conflict)
    ├── PreconditionFailed             (412 precondition_failed: e.g. an unsupported tus version)
    ├── PayloadTooLarge                (413 too_large)
    ├── UnsupportedMedia               (415 unsupported_media: not audio we can decode)
    ├── RangeNotSatisfiable            (416 range_not_satisfiable)
    ├── ValidationFailed               (422 validation_failed: well-formed but invalid fields)
    │   └── MediaLimitExceeded         (422 media_limit_exceeded: too long, slow or big to decode)
    ├── ChecksumMismatch               (460 checksum_mismatch: a chunk does not match its checksum)
    ├── BackendUnavailable             (503 backend_unavailable: a store cannot be reached)
    └── ConfigurationError             (raised at start-up; never reaches a client)
"""

from __future__ import annotations

from typing import Any


class VoxVaultError(Exception):
    """Root of every error VoxVault raises on purpose."""

    code = "internal"

    def __init__(self, message: str, *, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class InvalidRequest(VoxVaultError):
    code = "bad_request"


class EmptyUpload(InvalidRequest):
    code = "empty_upload"


class SignatureInvalid(VoxVaultError):
    code = "signature_invalid"


class NotFound(VoxVaultError):
    code = "not_found"


class Gone(NotFound):
    code = "gone"


class Conflict(VoxVaultError):
    code = "conflict"


class PreconditionFailed(VoxVaultError):
    code = "precondition_failed"


class PayloadTooLarge(VoxVaultError):
    code = "too_large"


class UnsupportedMedia(VoxVaultError):
    code = "unsupported_media"


class RangeNotSatisfiable(VoxVaultError):
    code = "range_not_satisfiable"

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(message, detail={"size_bytes": size})
        self.size = size


class ValidationFailed(VoxVaultError):
    code = "validation_failed"


class MediaLimitExceeded(ValidationFailed):
    code = "media_limit_exceeded"


class ChecksumMismatch(VoxVaultError):
    code = "checksum_mismatch"


class BackendUnavailable(VoxVaultError):
    code = "backend_unavailable"


class ConfigurationError(VoxVaultError):
    code = "configuration_error"

"""Checks of what an upload request brings: the upload's id, its metadata, a chunk's checksum."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from pydantic import ValidationError

from voxvault import checksums
from voxvault.errors import ChecksumMismatch, InvalidRequest, NotFound
from voxvault.models import RecordingPatch, validation_failed
from voxvault.names import check_filename

CHECKSUM_ALGORITHMS: Final = checksums.ALGORITHMS
MAX_METADATA_VALUE_BYTES = 16 * 1024
_UPLOAD_ID_LENGTH = 32
_HEX = frozenset("0123456789abcdef")


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

"""The checksums a resumable upload's chunks may carry (tus ``Upload-Checksum``), for the server
that verifies them and the client that sends them.

``crc32c`` (CRC-32C, 4 bytes big-endian, as S3 takes it) is what VoxVault's own client sends:
it catches the corruption a chunk meets in transit as well as a cryptographic hash does, at a
fifth of sha1's cost on the CPU (the CPU's CRC instruction, through ``google-crc32c``). The
recording's sha256, which the server takes as the chunks arrive, covers the whole upload.
``sha1`` (which tus requires), ``sha256`` and ``md5`` are there for other clients.
"""

from __future__ import annotations

import hashlib
from typing import Final, Protocol

import google_crc32c

__all__ = ["ALGORITHMS", "ChunkDigest", "digest_size", "new_digest"]

ALGORITHMS: Final = ("sha1", "sha256", "md5", "crc32c")


class ChunkDigest(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


class _Crc32c:
    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: bytes, /) -> None:
        self._crc = int(google_crc32c.extend(self._crc, data))

    def digest(self) -> bytes:
        return self._crc.to_bytes(4, "big")


def new_digest(algorithm: str) -> ChunkDigest:
    """A running checksum by one of ``ALGORITHMS``."""
    if algorithm == "crc32c":
        return _Crc32c()
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unsupported checksum algorithm {algorithm!r}")
    return hashlib.new(algorithm, usedforsecurity=False)


def digest_size(algorithm: str) -> int:
    return 4 if algorithm == "crc32c" else hashlib.new(algorithm).digest_size

"""Chunk checksums: each algorithm gives its published check value, however the bytes come."""

from __future__ import annotations

import pytest

from voxvault.checksums import ALGORITHMS, digest_size, new_digest

# The digest of b"123456789" in each algorithm: CRC-32C's check value from RFC 3720 (iSCSI),
# the others as published for that string.
CHECK_VALUES = {
    "crc32c": "e3069283",
    "md5": "25f9e794323b453885f5181f1b624d0b",
    "sha1": "f7c3bc1d808e04732adf679965ccc34ca7ae3441",
    "sha256": "15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225",
}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_gives_its_check_value_in_one_piece_or_many(algorithm: str) -> None:
    whole, pieces = new_digest(algorithm), new_digest(algorithm)
    whole.update(b"123456789")
    for piece in (b"1", b"", b"2345", b"6789"):
        pieces.update(piece)
    assert whole.digest().hex() == pieces.digest().hex() == CHECK_VALUES[algorithm]
    assert len(whole.digest()) == digest_size(algorithm)


def test_an_unknown_algorithm_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        new_digest("crc32")

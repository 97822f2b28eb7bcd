"""Rules for names that clients supply: upload filenames and artifact names.

A filename is kept only as a label (for downloads and display); it never becomes a path. Names
that could mislead a person or a program — path parts, control characters, bidirectional
overrides — are refused rather than silently rewritten, so a client learns what happened.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from urllib.parse import quote

from voxvault.errors import InvalidRequest, NotFound

MAX_FILENAME_BYTES = 255
ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
RECORDING_ID = re.compile(r"^[0-9a-f]{32}$")
# Bidirectional marks, embeddings, overrides and isolates: they make a name read differently
# from what it is (the "exe.mp3" spoofing trick).
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def new_recording_id() -> str:
    return uuid.uuid4().hex


def check_recording_id(recording_id: str) -> str:
    """Ids are server-made; anything else cannot name a recording (404, not a lookup)."""
    if not RECORDING_ID.fullmatch(recording_id):
        raise NotFound(
            f"no recording {recording_id[:64]!r}", detail={"recording_id": recording_id[:64]}
        )
    return recording_id


def check_filename(filename: str | None) -> str | None:
    if filename is None or filename == "":
        return None
    problem = None
    if len(filename.encode("utf-8", "surrogatepass")) > MAX_FILENAME_BYTES:
        problem = f"longer than {MAX_FILENAME_BYTES} bytes"
    elif any(unicodedata.category(ch) in ("Cc", "Cs") for ch in filename):
        problem = "contains control characters"
    elif any(ch in _BIDI_CONTROLS for ch in filename):
        problem = "contains bidirectional control characters"
    elif "/" in filename or "\\" in filename or filename.strip() in (".", ".."):
        problem = "contains a path; send the file's name only"
    elif not filename.strip():
        problem = "is blank"
    if problem:
        raise InvalidRequest(f"the filename {problem}", detail={"field": "filename"})
    return unicodedata.normalize("NFC", filename)


def check_artifact_name(name: str) -> str:
    if not ARTIFACT_NAME.fullmatch(name) or ".." in name:
        raise InvalidRequest(
            "an artifact name is 1-128 characters of letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, without '..'",
            detail={"field": "name", "pattern": ARTIFACT_NAME.pattern},
        )
    return name


def content_disposition(filename: str | None, fallback: str, *, inline: bool = True) -> str:
    """A header value that is safe whatever the stored name holds (RFC 6266 + RFC 5987)."""
    name = filename or fallback
    ascii_name = (
        "".join(ch if 0x20 <= ord(ch) < 0x7F and ch not in '"\\;' else "_" for ch in name).strip()
        or fallback
    )
    disposition = "inline" if inline else "attachment"
    value = f'{disposition}; filename="{ascii_name}"'
    if ascii_name != name:
        value += f"; filename*=UTF-8''{quote(name, safe='')}"
    return value

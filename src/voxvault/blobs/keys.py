"""Blob key layout, one for every backend (handbook §2).

Keys are built only from server-generated ids and validated names; a user-supplied filename
never becomes part of a key.
"""

from __future__ import annotations

import re

from voxvault.errors import InvalidRequest

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def validate_key(key: str) -> str:
    """Refuse any key that could name something outside the store (``..``, absolute, empty)."""
    segments = key.split("/")
    if not key or len(key) > 1024 or not all(_SEGMENT.fullmatch(s) for s in segments):
        raise InvalidRequest(f"invalid blob key {key!r}")
    return key


def recording_prefix(recording_id: str) -> str:
    return f"recordings/{recording_id}/"


def recording_original(recording_id: str) -> str:
    return f"recordings/{recording_id}/original"


def recording_artifact(recording_id: str, name: str) -> str:
    return f"recordings/{recording_id}/artifacts/{name}"


def recording_playback(recording_id: str) -> str:
    return f"recordings/{recording_id}/playback.opus"


UPLOADS_PREFIX = "uploads/"


def upload_prefix(upload_id: str) -> str:
    """Everything a resumable upload has staged (handbook §2: ``uploads/{upload_id}``)."""
    return f"{UPLOADS_PREFIX}{upload_id}/"


def upload_part(upload_id: str, name: str) -> str:
    return f"uploads/{upload_id}/parts/{name}"

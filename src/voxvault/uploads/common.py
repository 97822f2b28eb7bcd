"""What the modules of the resumable upload share: the clock, and the sign that an upload's row
moved on under a chunk."""

from __future__ import annotations

from datetime import UTC, datetime


class _Moved(Exception):
    """The upload's row moved on (or ended) while a chunk was being stored."""


def _now() -> datetime:
    return datetime.now(UTC)

"""The SearchIndex port: the segments of each recording's current transcript, searchable.

The index lives in the metadata database, beside the rows it indexes, and is written in the
same transaction as them: a transcript version and its index entries commit together, and so
does a recording's purge with the removal of its entries. Queries also join the recording row,
so a recording being deleted (a tombstone) has no hits from the moment it is one.

Ranking must not cost in proportion to how common a word is: each query ranks at most
``window`` candidates, the most recently indexed segments that match and pass the filters, and
says when more matched than it ranked (``IndexPage.truncated``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from voxvault.errors import BackendUnavailable
from voxvault.models import Segment
from voxvault.search.query import SearchQuery

DEFAULT_WINDOW = 1_000
HIGHLIGHT_START = "\x02"
HIGHLIGHT_END = "\x03"
"""What an adapter's snippets put around each matched word (never in indexed text)."""
SNIPPET_WORDS = 24


@dataclass(frozen=True, slots=True)
class SearchFilters:
    tag: str | None = None
    speaker: str | None = None
    language: str | None = None
    """A language tag; ``en`` also matches transcripts in ``en-US``."""
    recording_id: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


@dataclass(frozen=True, slots=True)
class IndexHit:
    recording_id: str
    recording_title: str | None
    has_playback: bool
    """Whether the recording has its Opus playback rendition."""
    start: float
    end: float
    speaker: str | None
    text: str
    snippet: str
    """The text around the match, matched words between HIGHLIGHT_START and HIGHLIGHT_END."""
    group: int = 0
    """The 1-based rank of the hit's recording, when hits are grouped per recording."""


@dataclass(frozen=True, slots=True)
class IndexPage:
    hits: list[IndexHit]
    total: int
    """How many segments were ranked (all that matched, unless this is the window)."""
    groups: int = 0
    """How many recordings those were, when grouped."""
    truncated: bool = False
    """More segments matched than the window ranked."""


class ConnectionLost(BackendUnavailable):
    """The connection a search ran on is gone (the database restarted, or a network path
    reset it): the search may run again on another."""


def clean_text(text: str) -> str:
    """Indexed text without the highlight markers (or any other C0 control but tab/newline)."""
    return "".join(c if c >= " " or c in "\t\n" else " " for c in text)


class SearchIndex(ABC):
    """Adapters implement the engine's own statements; every write runs on the caller's
    connection, inside the transaction that changes what is indexed."""

    def __init__(self, *, window: int = DEFAULT_WINDOW) -> None:
        self.window = window

    @abstractmethod
    async def replace(
        self,
        conn: AsyncConnection,
        recording_id: str,
        version: int,
        language: str | None,
        segments: Sequence[Segment],
    ) -> None:
        """Make this version the one indexed for the recording (its earlier entries go)."""

    @abstractmethod
    async def remove(self, conn: AsyncConnection, recording_id: str) -> None:
        """Forget the recording's entries."""

    @abstractmethod
    async def search(
        self,
        driver: Any,
        workspace: str,
        query: SearchQuery,
        filters: SearchFilters,
        *,
        offset: int,
        limit: int,
        per_group: int | None = None,
    ) -> IndexPage:
        """Ranked hits ``offset .. offset + limit`` (relevance, then newer recordings first),
        read on ``driver``, a pooled connection's own driver connection (aiosqlite's or
        psycopg's), outside any transaction. A database that cannot answer now raises
        ``BackendUnavailable``; ``ConnectionLost`` when another connection may.

        With ``per_group``, the page holds recordings ``offset .. offset + limit`` instead,
        ranked by their best hit, with up to ``per_group`` hits each.
        """

    @abstractmethod
    def describe(self) -> dict[str, Any]: ...

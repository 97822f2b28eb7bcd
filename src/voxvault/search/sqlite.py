"""SearchIndex on SQLite FTS5: an external-content full-text table over ``search_segments``.

Triggers keep the FTS table in step with the segment rows (migration 0005). The tokenizer is
``porter unicode61 remove_diacritics 2``: case- and accent-insensitive words, English stems.

FTS5 walks its matches in rowid order without sorting, so the candidate SELECT reads the newest
``window`` matches and stops; ``bm25`` is computed for those alone. A recording's segments get
consecutive ids when indexed, so the recording filter is a rowid range FTS5 seeks to directly,
not a scan of every match.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from voxvault.search.base import HIGHLIGHT_END, HIGHLIGHT_START, SNIPPET_WORDS, SearchFilters
from voxvault.search.query import SearchQuery, to_fts5
from voxvault.search.sql import SqlSearchIndex

_CANDIDATES = """
SELECT s.id, s.recording_id, s.start, s."end", s.speaker, s.text,
    bm25(search_fts) AS score, r.title, r.created_at,
    r.playback_sha256 IS NOT NULL AS has_playback
FROM search_fts
JOIN search_segments s ON s.id = search_fts.rowid
JOIN recordings r ON r.id = s.recording_id
WHERE search_fts MATCH :match {rowids} AND {where}
ORDER BY search_fts.rowid DESC
LIMIT :window
"""

_RECORDING_ROWIDS = """
AND search_fts.rowid >= (SELECT first_segment_id FROM search_documents WHERE recording_id = :recording_id)
AND search_fts.rowid <= (SELECT last_segment_id FROM search_documents WHERE recording_id = :recording_id)
"""  # noqa: E501

# Constants only (no input reaches this text); the match itself is the bound :match.
_SNIPPET = (
    "(SELECT snippet(search_fts, 0, "  # noqa: S608
    f"char({ord(HIGHLIGHT_START)}), char({ord(HIGHLIGHT_END)}), '…', {SNIPPET_WORDS})"
    " FROM search_fts WHERE search_fts MATCH :match AND search_fts.rowid = page.id)"
)


class SqliteSearchIndex(SqlSearchIndex):
    async def _candidates(
        self, conn: AsyncConnection, query: SearchQuery, filters: SearchFilters, where: str
    ) -> tuple[str, dict[str, Any]]:
        rowids = _RECORDING_ROWIDS if filters.recording_id is not None else ""
        return _CANDIDATES.format(rowids=rowids, where=where), {"match": to_fts5(query)}

    def _snippet(self) -> str:
        return _SNIPPET

    def describe(self) -> dict[str, Any]:
        return {"engine": "sqlite-fts5", "window": self.window}

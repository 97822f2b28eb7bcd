"""SearchIndex on SQLite FTS5: an external-content full-text table over ``search_segments``.

Triggers keep the FTS table in step with the segment rows (migration 0005). The tokenizer is
``porter unicode61 remove_diacritics 2``: case- and accent-insensitive words, English stems.

FTS5 walks its matches in rowid order without sorting, so the candidate SELECT reads the newest
``window`` matches and stops; ``bm25`` is computed for those alone. A recording's segments get
consecutive ids when indexed, so the recording filter is a rowid range FTS5 seeks to directly,
not a scan of every match.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from voxvault.errors import BackendUnavailable
from voxvault.search.base import HIGHLIGHT_END, HIGHLIGHT_START, SNIPPET_WORDS, SearchFilters
from voxvault.search.query import SearchQuery, to_fts5
from voxvault.search.sql import SqlSearchIndex

_CANDIDATES = """
SELECT s.id, s.recording_id, s.start, s."end", s.speaker, s.text,
    bm25(search_fts) AS score, {snippet} AS candidate_snippet, r.title, r.created_at,
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
_SNIPPET_FUNCTION = (
    "snippet(search_fts, 0, "
    f"char({ord(HIGHLIGHT_START)}), char({ord(HIGHLIGHT_END)}), '…', {SNIPPET_WORDS})"
)
_SNIPPET = (
    f"(SELECT {_SNIPPET_FUNCTION} FROM search_fts"  # noqa: S608
    " WHERE search_fts MATCH :match AND search_fts.rowid = page.id)"
)


class SqliteSearchIndex(SqlSearchIndex):
    async def _candidates(
        self, driver: Any, query: SearchQuery, filters: SearchFilters, where: str
    ) -> tuple[str, dict[str, Any]]:
        rowids = _RECORDING_ROWIDS if filters.recording_id is not None else ""
        # A page's snippets are each looked up by rowid, which costs FTS5 the set-up of the
        # whole query every time; with a prefix that set-up merges many words' lists, so the
        # snippets are made on the one pass over the candidates instead.
        snippet = _SNIPPET_FUNCTION if self._prefixed(query) else "NULL"
        candidates = _CANDIDATES.format(rowids=rowids, where=where, snippet=snippet)
        return candidates, {"match": to_fts5(query)}

    @staticmethod
    def _prefixed(query: SearchQuery) -> bool:
        return any(term.prefix for group in query.groups for term in group)

    async def _run(
        self, driver: Any, sql: str, parameters: list[Any] | dict[str, Any] | None = None
    ) -> Sequence[Sequence[Any]]:
        # One round trip to aiosqlite's thread, where SQLAlchemy takes five (cursor, statement,
        # rows, cursor close, and the rollback when the connection closes). sqlite3 begins no
        # transaction for a SELECT, so the connection goes back to the pool with none open.
        try:
            rows: Sequence[Sequence[Any]] = await driver.execute_fetchall(sql, parameters or ())
        except sqlite3.OperationalError as exc:
            # Busy past the busy timeout, or the disk failing; a plain SQLITE_ERROR is a
            # statement this code got wrong, which no retry would mend.
            if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_ERROR:
                raise
            raise BackendUnavailable(f"the database could not be searched: {exc}") from exc
        return rows

    def _snippet(self) -> str:
        return f"coalesce(page.candidate_snippet, {_SNIPPET})"

    def describe(self) -> dict[str, Any]:
        return {"engine": "sqlite-fts5", "window": self.window}

"""SearchIndex on PostgreSQL: a ``tsvector`` per segment with a GIN index.

Each segment is parsed with its transcript's language where PostgreSQL stems that language,
``voxvault_simple`` otherwise. The ``voxvault_*`` text search configurations (migration 0005)
are PostgreSQL's own with two changes that make them read text as the SQLite index does:
accents are folded (``unaccent``) and no word is a stop word. The ``tsv`` column is generated
from the row's ``config`` and text.

A query is parsed once per configuration in use and the OR of those matched through the GIN
index: a row matches when its words match the query as any of those languages reads it, which
differs from its own language's reading at most in how words are stemmed. A query with excluded
words is checked against each row's own reading too, or an excluded word would not exclude a
row of another language (``-drafts`` is ``'drafts'`` to ``voxvault_simple`` but ``'draft'`` to
an English row). The candidate SELECT
asks for the newest ``window`` matches by id; for a common word PostgreSQL walks the id index
backwards and stops at the window, for a rare one it reads the GIN index: either way
``ts_rank`` runs on at most ``window`` rows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from voxvault.search.base import (
    DEFAULT_WINDOW,
    HIGHLIGHT_END,
    HIGHLIGHT_START,
    SNIPPET_WORDS,
    ConnectionLost,
    SearchFilters,
)
from voxvault.search.query import SearchQuery, to_tsquery_text
from voxvault.search.sql import SqlSearchIndex, language_prefix

PREFIX = "voxvault_"
SIMPLE = PREFIX + "simple"
CONFIG_CACHE_S = 5.0
# Whisper's language codes and PostgreSQL's configurations (and Snowball stemmers) for them;
# migration 0005 makes a ``voxvault_`` configuration of each that the server has.
LANGUAGE_CONFIGS = {
    "ar": "arabic",
    "ca": "catalan",
    "da": "danish",
    "de": "german",
    "el": "greek",
    "en": "english",
    "es": "spanish",
    "eu": "basque",
    "fi": "finnish",
    "fr": "french",
    "ga": "irish",
    "hi": "hindi",
    "hu": "hungarian",
    "hy": "armenian",
    "id": "indonesian",
    "it": "italian",
    "lt": "lithuanian",
    "nb": "norwegian",
    "ne": "nepali",
    "nl": "dutch",
    "no": "norwegian",
    "pt": "portuguese",
    "ro": "romanian",
    "ru": "russian",
    "sr": "serbian",
    "sv": "swedish",
    "ta": "tamil",
    "tr": "turkish",
    "yi": "yiddish",
}

_ANGLES_AWAY = "chr(1) || chr(4)"
"""What ``<`` and ``>`` stand in for while ts_headline reads a segment's text."""

_CANDIDATES = """
SELECT s.id, s.recording_id, s.start, s."end", s.speaker, s.text, s.config,
    -ts_rank(s.tsv, {tsquery}) AS score, r.title, r.created_at,
    r.playback_sha256 IS NOT NULL AS has_playback
FROM search_segments s
JOIN recordings r ON r.id = s.recording_id
WHERE s.tsv @@ {tsquery} {own_reading} AND {where}
ORDER BY s.id DESC
LIMIT :window
"""


def _literal(config: str) -> str:
    # Only names from LANGUAGE_CONFIGS (or the server's own list) get here, never user text;
    # as literals they let the planner see the query and estimate how common its words are.
    assert config.isidentifier(), config
    return f"'{config}'::regconfig"


_AVAILABLE = "SELECT cfgname FROM pg_ts_config WHERE cfgname LIKE 'voxvault\\_%'"
_IN_USE = "SELECT DISTINCT config FROM search_documents"


class PostgresSearchIndex(SqlSearchIndex):
    def __init__(self, dialect: sa.Dialect, *, window: int = DEFAULT_WINDOW) -> None:
        super().__init__(dialect, window=window)
        self._available: frozenset[str] | None = None
        self._in_use: tuple[float, frozenset[str]] | None = None

    def describe(self) -> dict[str, Any]:
        return {"engine": "postgresql-tsvector", "window": self.window}

    def _config(self, language: str | None) -> str:
        stock = LANGUAGE_CONFIGS.get(language_prefix(language)) if language else None
        config = PREFIX + stock if stock else SIMPLE
        if self._available is not None and config not in self._available:
            return SIMPLE
        return config

    def _segment_extras(self, language: str | None) -> dict[str, Any]:
        return {"config": self._config(language)}

    def _insert_segments(self) -> sa.Executable:
        # ``config`` and the generated ``tsv`` exist on PostgreSQL only (migration 0005).
        return sa.text(
            'INSERT INTO search_segments (recording_id, position, start, "end", speaker, text,'
            " config) VALUES (:recording_id, :position, :start, :end, :speaker, :text,"
            " CAST(:config AS regconfig))"
        )

    async def replace(self, conn: AsyncConnection, *args: Any, **kwargs: Any) -> None:
        if self._available is None:
            await self._load_available((await conn.get_raw_connection()).driver_connection)
        await super().replace(conn, *args, **kwargs)
        self._in_use = None  # a new language may have come in

    async def _load_available(self, driver: Any) -> frozenset[str]:
        if self._available is None:
            self._available = frozenset(row[0] for row in await self._run(driver, _AVAILABLE))
        return self._available

    async def _configs(self, driver: Any, filters: SearchFilters) -> list[str]:
        """The configurations the query must be parsed with: those the indexed rows use."""
        if filters.language is not None:
            await self._load_available(driver)
            return [self._config(filters.language)]
        now = time.monotonic()
        if self._in_use is None or now - self._in_use[0] > CONFIG_CACHE_S:
            self._in_use = (now, frozenset(row[0] for row in await self._run(driver, _IN_USE)))
        return sorted(self._in_use[1]) or [SIMPLE]

    async def _candidates(
        self, driver: Any, query: SearchQuery, filters: SearchFilters, where: str
    ) -> tuple[str, dict[str, Any]]:
        configs = await self._configs(driver, filters)
        parsed = {c: f"to_tsquery({_literal(c)}, :tq)" for c in configs}
        any_config = "(" + " || ".join(parsed.values()) + ")"
        own_reading = ""
        if query.excluded and len(configs) > 1:
            # Each row's own reading, without parsing the query once per row. Only here: the
            # planner cannot tell how many rows this keeps, and would then pick a plan that
            # reads every match of a common word instead of stopping at the window.
            cases = " ".join(f"WHEN {_literal(c)} THEN {q}" for c, q in parsed.items())
            own_reading = f"AND s.tsv @@ (CASE s.config {cases} ELSE to_tsquery(s.config, :tq) END)"
        return (
            _CANDIDATES.format(tsquery=any_config, own_reading=own_reading, where=where),
            {"tq": to_tsquery_text(query)},
        )

    async def _run(
        self, driver: Any, sql: str, parameters: list[Any] | dict[str, Any] | None = None
    ) -> Sequence[Sequence[Any]]:
        # psycopg's own coroutines, awaited here: no greenlet switches and no result processing.
        try:
            cursor = await driver.execute(sql, parameters)
            rows: Sequence[Sequence[Any]] = await cursor.fetchall()
        except psycopg.Error as exc:
            if not (driver.broken or driver.closed):
                raise  # a failing statement on a live connection stays what it is
            reason = str(exc).strip().split("\n", 1)[0]
            raise ConnectionLost(f"the database is unreachable: {reason}") from exc
        return rows

    def _snippet(self) -> str:
        options = (
            f"StartSel={HIGHLIGHT_START}, StopSel={HIGHLIGHT_END}, "
            f"MaxWords={SNIPPET_WORDS}, MinWords={SNIPPET_WORDS // 3}, HighlightAll=false"
        )
        # The headline parser takes anything between < and > for an HTML tag and leaves it
        # out; transcripts have tags of their own (WebVTT voices, sound labels), so the angle
        # brackets go in as control characters indexed text never holds (``clean_text``).
        text = f"translate(page.text, '<>', {_ANGLES_AWAY})"
        headline = f"ts_headline(page.config, {text}, to_tsquery(page.config, :tq), '{options}')"
        return f"translate({headline}, {_ANGLES_AWAY}, '<>')"

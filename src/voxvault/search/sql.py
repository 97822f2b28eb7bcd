"""What both SQL adapters of the SearchIndex share: the tables they write, the filters, and the
ranking, paging and grouping around each engine's own match.

An adapter supplies ``_candidates``: a SELECT of the segments that match, pass the filters and
belong to the workspace's live recordings, newest first and at most ``:window`` of them, with
the columns ``id, recording_id, start, "end", speaker, text, score, title, created_at,
has_playback`` (and any the snippet needs), where a lower score ranks higher. This module
ranks and pages those in SQL and asks ``_snippet`` for the page's snippets only.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from voxvault.metadata.tables import UTCDateTime, search_documents, search_segments
from voxvault.models import Segment
from voxvault.search.base import (
    DEFAULT_WINDOW,
    IndexHit,
    IndexPage,
    SearchFilters,
    SearchIndex,
    clean_text,
)
from voxvault.search.query import SearchQuery

# What both statements answer, one row per hit: IndexHit's fields in order, then the count of
# ranked segments and of their recordings. Rows are read by position: a driver's rows carry no
# names, and looking a column up by name costs more than making the hit.
_HITS = """page.recording_id, page.title, page.has_playback, page.start, page."end",
    page.speaker, page.text, {snippet} AS snippet, page.grp, page.total, page.groups"""

_PAGE = """
WITH candidates AS ({candidates}),
ranked AS (SELECT c.*, count(*) OVER () AS total FROM candidates c),
page AS (
    SELECT *, 0 AS grp, 0 AS groups FROM ranked
    ORDER BY score, created_at DESC, recording_id, start, id
    LIMIT :limit OFFSET :offset
)
SELECT {hits} FROM page
ORDER BY page.score, page.created_at DESC, page.recording_id, page.start, page.id
"""

_GROUPED_PAGE = """
WITH candidates AS ({candidates}),
best AS (
    SELECT c.*, count(*) OVER () AS total,
        min(score) OVER (PARTITION BY recording_id) AS best_score,
        row_number() OVER (PARTITION BY recording_id ORDER BY score, start, id) AS nth
    FROM candidates c
),
grouped AS (
    SELECT b.*, dense_rank() OVER (ORDER BY best_score, created_at DESC, recording_id) AS grp
    FROM best b
),
counted AS (SELECT g.*, max(grp) OVER () AS groups FROM grouped g),
page AS (
    SELECT * FROM counted
    WHERE nth <= :per_group AND grp > :offset AND grp <= :offset + :limit
)
SELECT {hits} FROM page ORDER BY page.grp, page.nth
"""

_TIMES = {"created_after", "created_before"}


def language_prefix(language: str) -> str:
    """``en`` for ``en``, ``en-US`` and ``EN-gb``: what the language filter compares."""
    return language.split("-", 1)[0].lower()


@lru_cache(maxsize=256)
def _text_statement(sql: str, times: frozenset[str]) -> sa.TextClause:
    """The statement for ``sql``, made once per text, so that its driver's form
    (``driver_statement``) is compiled once too; the times are bound as the columns they are
    compared with."""
    bound = (sa.bindparam(name, type_=UTCDateTime()) for name in sorted(times))
    return sa.text(sql).bindparams(*bound)


@dataclass(frozen=True, slots=True)
class DriverStatement:
    """A statement as its driver takes it: the SQL in the driver's own placeholders, and what
    turns the statement's values into the driver's parameters, encoded as SQLAlchemy would
    encode them (a datetime as SQLite's text, for one)."""

    sql: str
    positions: tuple[str, ...] | None
    """The value of each ``?`` in turn (sqlite3); ``None`` for named placeholders (psycopg)."""
    encoders: tuple[tuple[str, Callable[[Any], Any]], ...]

    def parameters(self, values: dict[str, Any]) -> list[Any] | dict[str, Any]:
        if self.encoders:
            values = values | {name: encode(values[name]) for name, encode in self.encoders}
        if self.positions is None:
            return values
        return [values[name] for name in self.positions]


@lru_cache(maxsize=256)
def driver_statement(statement: sa.TextClause, dialect: sa.Dialect) -> DriverStatement:
    """``statement`` for ``dialect``'s driver, compiled once per statement object."""
    compiled = statement.compile(dialect=dialect)
    encoders = []
    for name, bind in compiled.binds.items():
        encode = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if encode is not None:
            encoders.append((name, encode))
    positions = None if compiled.positiontup is None else tuple(compiled.positiontup)
    return DriverStatement(str(compiled), positions, tuple(encoders))


class SqlSearchIndex(SearchIndex):
    def __init__(self, dialect: sa.Dialect, *, window: int = DEFAULT_WINDOW) -> None:
        super().__init__(window=window)
        self.dialect = dialect
        """The dialect of the engine searches run on: their statements are compiled for it."""

    # ---- writes -------------------------------------------------------------------------------

    async def replace(
        self,
        conn: AsyncConnection,
        recording_id: str,
        version: int,
        language: str | None,
        segments: Sequence[Segment],
    ) -> None:
        await self.remove(conn, recording_id)
        rows = [
            {
                "recording_id": recording_id,
                "position": position,
                "start": segment.start,
                "end": segment.end,
                "speaker": segment.speaker,
                "text": clean_text(segment.text),
                **self._segment_extras(language),
            }
            for position, segment in enumerate(segments)
            if segment.text.strip()
        ]
        if rows:
            await conn.execute(self._insert_segments(), rows)
        # Ids grow with position within one insert. Read through (recording_id, position):
        # PostgreSQL would answer min(id) / max(id) by walking the whole id index instead.
        mine = sa.select(search_segments.c.id).where(search_segments.c.recording_id == recording_id)
        position = search_segments.c.position
        first, last = (
            await conn.execute(
                sa.select(
                    mine.order_by(position).limit(1).scalar_subquery(),
                    mine.order_by(position.desc()).limit(1).scalar_subquery(),
                )
            )
        ).one()
        await conn.execute(
            search_documents.insert().values(
                recording_id=recording_id,
                version=version,
                language=language_prefix(language) if language else None,
                config=self._config(language),
                segment_count=len(rows),
                first_segment_id=first,
                last_segment_id=last,
                indexed_at=datetime.now(UTC),
            )
        )

    async def remove(self, conn: AsyncConnection, recording_id: str) -> None:
        await conn.execute(
            search_segments.delete().where(search_segments.c.recording_id == recording_id)
        )
        await conn.execute(
            search_documents.delete().where(search_documents.c.recording_id == recording_id)
        )

    def _insert_segments(self) -> sa.Executable:
        return search_segments.insert()

    def _segment_extras(self, language: str | None) -> dict[str, Any]:
        return {}

    def _config(self, language: str | None) -> str:
        return "default"

    # ---- queries ------------------------------------------------------------------------------

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
        statement, values = await self.statement(
            driver, workspace, query, filters, offset=offset, limit=limit, per_group=per_group
        )
        # On the driver: no SQLAlchemy execute, so no result processing and no transaction
        # begun on the connection, whose end would cost one more round trip.
        bare = driver_statement(statement, self.dialect)
        rows = await self._run(driver, bare.sql, bare.parameters(values))
        hits = [
            IndexHit(rid, title, bool(playback), start, end, who, text, snippet or text, grp)
            for rid, title, playback, start, end, who, text, snippet, grp, _, _ in rows
        ]
        total, groups = (rows[0][-2], rows[0][-1]) if rows else (0, 0)
        return IndexPage(
            hits=hits, total=min(total, self.window), groups=groups, truncated=total > self.window
        )

    @abstractmethod
    async def _run(
        self, driver: Any, sql: str, parameters: list[Any] | dict[str, Any] | None = None
    ) -> Sequence[Sequence[Any]]:
        """The rows of ``sql`` run on ``driver``, each its columns in order. A database that
        cannot answer now (SQLite busy past its timeout, the disk failing) raises
        ``BackendUnavailable``, as SQLAlchemy's errors for it do
        (``_unreachable_is_unavailable``); a lost connection ``ConnectionLost``."""

    async def statement(
        self,
        driver: Any,
        workspace: str,
        query: SearchQuery,
        filters: SearchFilters,
        *,
        offset: int,
        limit: int,
        per_group: int | None = None,
    ) -> tuple[sa.TextClause, dict[str, Any]]:
        """The one SQL statement ``search`` runs, and its values (benchmarks run it bare);
        ``driver`` answers what the statement depends on, if anything."""
        where, params = self._filters(filters)
        candidates, match_params = await self._candidates(driver, query, filters, where)
        template = _PAGE if per_group is None else _GROUPED_PAGE
        statement = _text_statement(
            template.format(candidates=candidates, hits=_HITS.format(snippet=self._snippet())),
            frozenset(_TIMES & params.keys()),
        )
        values: dict[str, Any] = {
            "workspace": workspace,
            # One more than is ranked, to tell "exactly the window" from "more than it".
            "window": self.window + 1,
            "offset": offset,
            "limit": limit,
            **({"per_group": per_group} if per_group is not None else {}),
            **params,
            **match_params,
        }
        return statement, values

    @staticmethod
    def _filters(filters: SearchFilters) -> tuple[str, dict[str, Any]]:
        """SQL conditions on ``s`` (segments) and ``r`` (recordings); values are bound."""
        clauses = ["r.workspace_id = :workspace", "r.status <> 'deleting'"]
        params: dict[str, Any] = {}
        if filters.tag is not None:
            clauses.append(
                "EXISTS (SELECT 1 FROM recording_tags t"
                " WHERE t.recording_id = s.recording_id AND t.tag = :tag)"
            )
            params["tag"] = filters.tag
        if filters.speaker is not None:
            clauses.append("s.speaker = :speaker")
            params["speaker"] = filters.speaker
        if filters.language is not None:
            clauses.append(
                "EXISTS (SELECT 1 FROM search_documents d"
                " WHERE d.recording_id = s.recording_id AND d.language = :language)"
            )
            params["language"] = language_prefix(filters.language)
        if filters.recording_id is not None:
            clauses.append("s.recording_id = :recording_id")
            params["recording_id"] = filters.recording_id
        if filters.created_after is not None:
            clauses.append("r.created_at > :created_after")
            params["created_after"] = filters.created_after
        if filters.created_before is not None:
            clauses.append("r.created_at < :created_before")
            params["created_before"] = filters.created_before
        return " AND ".join(clauses), params

    @abstractmethod
    async def _candidates(
        self, driver: Any, query: SearchQuery, filters: SearchFilters, where: str
    ) -> tuple[str, dict[str, Any]]:
        """The engine's candidate SELECT (see the module docstring) and its parameters."""

    @abstractmethod
    def _snippet(self) -> str:
        """An SQL expression on ``page`` rows: the highlighted snippet of the segment."""

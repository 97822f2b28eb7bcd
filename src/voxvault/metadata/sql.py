"""MetadataStore on SQLAlchemy 2 (async): SQLite embedded, PostgreSQL for scale-out.

SQLite runs in WAL mode with ``synchronous=FULL`` so that a committed row survives power loss,
and a busy timeout so that the CLI and a running server can share one database file.

A database that cannot be reached (refused, dropped, gone mid-query) raises ``BackendUnavailable``
from every statement on the engine, the job queue's included; the pool pings a connection before
handing it out, so once the server is back the next statement reconnects by itself. On PostgreSQL,
searches run on an engine of their own, alike but for connections that stay in autocommit.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import InterfaceError as SAInterfaceError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, PoolResetState

from voxvault.errors import (
    BackendUnavailable,
    ConfigurationError,
    Conflict,
    InvalidRequest,
    NotFound,
)
from voxvault.metadata.base import MetadataStore, RecordingBlobs
from voxvault.metadata.sqlite_autocommit import SqliteAutocommit
from voxvault.metadata.tables import (
    artifacts,
    jobs,
    recording_tags,
    recordings,
    search_documents,
    transcripts,
)
from voxvault.models import (
    Artifact,
    Recording,
    RecordingPage,
    RecordingQuery,
    RecordingStatus,
    Segment,
    StorageUsage,
    Transcript,
    TranscriptInput,
    TranscriptVersion,
)
from voxvault.search.base import ConnectionLost, IndexPage, SearchFilters
from voxvault.search.query import SearchQuery
from voxvault.search.sql import SqlSearchIndex

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
_DRIVERS = {"sqlite": ("sqlite+aiosqlite", "sqlite"), "postgresql": ("postgresql+psycopg",) * 2}


def _driver_urls(url: str) -> tuple[str, str]:
    """The async URL the store runs on and the sync URL migrations run on."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend not in _DRIVERS:
        raise ConfigurationError(
            f"unsupported database URL {url!r}; use sqlite:// or postgresql://"
        )
    async_driver, sync_driver = _DRIVERS[backend]
    return (
        parsed.set(drivername=async_driver).render_as_string(hide_password=False),
        parsed.set(drivername=sync_driver).render_as_string(hide_password=False),
    )


def _sqlite_pragma_statements() -> list[str]:
    """What every connection to a SQLite file runs first."""
    return [
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=FULL",
        "PRAGMA foreign_keys=ON",
        f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
    ]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    for pragma in _sqlite_pragma_statements():
        cursor.execute(pragma)
    cursor.close()


def _unreachable_is_unavailable(context: ExceptionContext) -> None:
    """Raise a lost or refused connection as ``BackendUnavailable`` (503), not a bare driver error.

    Only driver errors that happened while connecting or that broke the connection: a failing
    statement on a live connection stays what it is, and so do cancellations. A failed pre-ping
    is left to the pool, which then opens a new connection.
    """
    failure = context.sqlalchemy_exception
    if context.is_pre_ping or not isinstance(failure, OperationalError | SAInterfaceError):
        return
    if context.is_disconnect or context.connection is None:
        reason = str(context.original_exception).strip().split("\n", 1)[0]
        raise BackendUnavailable(f"the database is unreachable: {reason}")


class _Pool(AsyncAdaptedQueuePool):
    """The engine's pool, whose exhaustion (every connection busy past the pool timeout) is a
    ``BackendUnavailable`` (503 with Retry-After) like an unreachable database, not a 500."""

    def _do_get(self) -> ConnectionPoolEntry:
        try:
            return super()._do_get()
        except PoolTimeout as exc:
            raise BackendUnavailable(
                "the database has no free connection now; try again shortly"
            ) from exc


def _sqlite_reset(dbapi_connection: Any, _record: Any, state: PoolResetState) -> None:
    """Roll back a transaction a returned connection left open, and only then: the pool's own
    rollback on return is a round trip to aiosqlite's thread on every use, most often after a
    commit, when there is nothing to roll back."""
    if state.transaction_was_reset or not state.asyncio_safe:
        return
    if dbapi_connection.driver_connection.in_transaction:
        dbapi_connection.rollback()


def _sqlite_explicit_transactions(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite would run DDL outside of any transaction; BEGIN is issued by the "begin" hook.
    dbapi_connection.isolation_level = None


def _sqlite_begin_immediate(connection: sa.Connection) -> None:
    # The write lock for the whole migration: processes started together migrate one after
    # another (waiting up to the busy timeout), and a later one finds nothing left to do.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def encode_cursor(created_at: datetime, recording_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), recording_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, recording_id = json.loads(raw)
        when = datetime.fromisoformat(created)
        if not isinstance(recording_id, str) or when.tzinfo is None:
            raise ValueError
        when = when.astimezone(UTC)
    except (ValueError, TypeError, OverflowError, RecursionError, binascii.Error):
        raise InvalidRequest("the cursor is not one this server issued") from None
    return when, recording_id


def _utc(value: datetime) -> datetime:
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise InvalidRequest(f"{value.isoformat()} is outside the representable range") from None


# A recording's columns as clients see them (the workspace is the caller's scope, not a field).
_RECORDING_COLUMNS = [c for c in recordings.c if c.name not in ("workspace_id", "playback_sha256")]
_TRANSCRIPT_VERSION_COLUMNS = [transcripts.c[name] for name in TranscriptVersion.model_fields]
_ARTIFACT_COLUMNS = [artifacts.c[name] for name in Artifact.model_fields]


def _recording(row: sa.Row[Any]) -> Recording:
    return Recording.model_validate(dict(row._mapping))


def _transcript(row: sa.Row[Any]) -> Transcript:
    return Transcript(
        recording_id=row.recording_id,
        version=row.version,
        language=row.language,
        segments=[Segment.model_validate(s) for s in row.segments],
        created_at=row.created_at,
        engine=row.engine,
        model=row.model,
        timings=row.timings or {},
        job_id=row.job_id,
    )


def _artifact(row: sa.Row[Any]) -> Artifact:
    return Artifact.model_validate(dict(row._mapping))


CONNECT_TIMEOUT_S = 5


def _search_index(dialect: sa.Dialect) -> SqlSearchIndex:
    if dialect.name == "sqlite":
        from voxvault.search.sqlite import SqliteSearchIndex

        return SqliteSearchIndex(dialect)
    from voxvault.search.postgres import PostgresSearchIndex

    return PostgresSearchIndex(dialect)


class SqlMetadataStore(MetadataStore):
    def __init__(self, url: str) -> None:
        self.url = url
        async_url, self._sync_url = _driver_urls(url)
        self.dialect = make_url(async_url).get_backend_name()
        # SQLite files cannot drop a connection, so pinging before each use would only cost time.
        # A server that stops answering (a partition, not a refusal) fails within seconds.
        connect_args: dict[str, Any] = {}
        if self.dialect != "sqlite":
            # psycopg prepares a statement it has run five times; PostgreSQL may then plan it
            # once for any value, and a search planned for a rare word would read every match
            # of a common one. Each statement is planned for its own values instead.
            connect_args = {
                "connect_timeout": CONNECT_TIMEOUT_S,
                "options": "-c plan_cache_mode=force_custom_plan",
            }
        in_memory = make_url(async_url).database in (None, "", ":memory:")
        sqlite = self.dialect == "sqlite"
        self.engine: AsyncEngine = create_async_engine(
            async_url,
            pool_pre_ping=not sqlite,
            pool_reset_on_return=None if sqlite else "rollback",
            connect_args=connect_args,
            **({} if in_memory else {"poolclass": _Pool}),
        )
        event.listen(self.engine.sync_engine, "handle_error", _unreachable_is_unavailable)
        if self.dialect == "sqlite":
            database = make_url(async_url).database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            event.listen(self.engine.sync_engine.pool, "reset", _sqlite_reset)
        # A search only reads: one SELECT, two when the index refreshes what it caches. It runs
        # on an engine of its own, on a connection borrowed from the pool and given back without
        # SQLAlchemy's Connection around it (``search``). Giving one back must need no I/O, as
        # it happens outside SQLAlchemy's greenlet: there is nothing to reset (PostgreSQL's stay
        # in autocommit, so no BEGIN and ROLLBACK round trips either; a SELECT begins nothing
        # on SQLite), and none is closed then (no overflow: a sixth search at once waits for
        # one of the five). Nor are they pinged before each use, a round trip per search: a
        # search whose connection turns out dead runs once more on a new one instead.
        # An in-memory SQLite database lives in its one connection, which searches share.
        self.search_engine: AsyncEngine = self.engine
        if not in_memory:
            self.search_engine = create_async_engine(
                async_url,
                pool_reset_on_return=None,
                max_overflow=0,
                connect_args=connect_args,
                poolclass=_Pool,
                **({} if sqlite else {"isolation_level": "AUTOCOMMIT"}),
            )
            if sqlite:
                event.listen(self.search_engine.sync_engine, "connect", _sqlite_pragmas)
        self.search_index = _search_index(self.search_engine.dialect)
        # Resumable uploads record each stored chunk on a connection of their own (see there).
        self.autocommit: SqliteAutocommit | None = None
        if sqlite and not in_memory:
            database = make_url(async_url).database
            assert database is not None
            self.autocommit = SqliteAutocommit(database, _sqlite_pragma_statements)

    @classmethod
    def from_url(cls, url: str) -> SqlMetadataStore:
        return cls(url)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.dialect,
            "url": make_url(self.url).render_as_string(hide_password=True),
        }

    async def migrate(self) -> None:
        def upgrade() -> None:
            engine = sa.create_engine(self._sync_url)
            if self.dialect == "sqlite":
                event.listen(engine, "connect", _sqlite_pragmas)
                event.listen(engine, "connect", _sqlite_explicit_transactions)
                event.listen(engine, "begin", _sqlite_begin_immediate)
            try:
                with engine.begin() as connection:
                    config = Config()
                    config.set_main_option("script_location", str(MIGRATIONS_DIR))
                    config.attributes["connection"] = connection
                    command.upgrade(config, "head")
            finally:
                engine.dispose()

        await anyio.to_thread.run_sync(upgrade)

    async def check(self) -> None:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except (OperationalError, SAInterfaceError, OSError) as exc:
            raise BackendUnavailable(f"the database is unreachable: {exc}") from exc

    async def close(self) -> None:
        if self.autocommit is not None:
            await self.autocommit.close()
        if self.search_engine is not self.engine:
            await self.search_engine.dispose()
        await self.engine.dispose()

    # ---- recordings ---------------------------------------------------------------------------

    async def insert_recording(self, workspace: str, recording: Recording) -> None:
        values = recording.model_dump()
        async with self.engine.begin() as conn:
            await conn.execute(recordings.insert().values(workspace_id=workspace, **values))
            await self._replace_tags(conn, recording.id, recording.tags)

    @staticmethod
    async def _replace_tags(conn: AsyncConnection, recording_id: str, tags: list[str]) -> None:
        await conn.execute(
            recording_tags.delete().where(recording_tags.c.recording_id == recording_id)
        )
        if tags:
            await conn.execute(
                recording_tags.insert(), [{"recording_id": recording_id, "tag": t} for t in tags]
            )

    @staticmethod
    def _visible(workspace: str) -> sa.ColumnElement[bool]:
        return sa.and_(
            recordings.c.workspace_id == workspace,
            recordings.c.status != RecordingStatus.DELETING.value,
        )

    async def _fetch_recording(
        self, conn: AsyncConnection, workspace: str, recording_id: str, *, lock: bool = False
    ) -> Recording:
        query = sa.select(*_RECORDING_COLUMNS).where(
            self._visible(workspace), recordings.c.id == recording_id
        )
        if lock and self.dialect != "sqlite":
            query = query.with_for_update()
        row = (await conn.execute(query)).first()
        if row is None:
            raise NotFound(f"no recording {recording_id!r}", detail={"recording_id": recording_id})
        return _recording(row)

    async def get_recording(self, workspace: str, recording_id: str) -> Recording:
        async with self.engine.connect() as conn:
            return await self._fetch_recording(conn, workspace, recording_id)

    async def list_recordings(self, workspace: str, query: RecordingQuery) -> RecordingPage:
        stmt = sa.select(*_RECORDING_COLUMNS).where(self._visible(workspace))
        if query.status is not None:
            stmt = stmt.where(recordings.c.status == query.status.value)
        if query.tag is not None:
            tagged = sa.select(recording_tags.c.recording_id).where(
                recording_tags.c.tag == query.tag
            )
            stmt = stmt.where(recordings.c.id.in_(tagged))
        if query.created_after is not None:
            stmt = stmt.where(recordings.c.created_at > _utc(query.created_after))
        if query.created_before is not None:
            stmt = stmt.where(recordings.c.created_at < _utc(query.created_before))
        if query.cursor is not None:
            created, last_id = decode_cursor(query.cursor)
            stmt = stmt.where(
                sa.or_(
                    recordings.c.created_at < created,
                    sa.and_(recordings.c.created_at == created, recordings.c.id < last_id),
                )
            )
        stmt = stmt.order_by(recordings.c.created_at.desc(), recordings.c.id.desc())
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt.limit(query.limit + 1))).all()
        items = [_recording(row) for row in rows[: query.limit]]
        more = len(rows) > query.limit
        next_cursor = encode_cursor(items[-1].created_at, items[-1].id) if more else None
        return RecordingPage(items=items, next_cursor=next_cursor)

    async def update_recording(
        self,
        workspace: str,
        recording_id: str,
        *,
        title: str | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        status: RecordingStatus | None = None,
        error: str | None = None,
    ) -> Recording:
        changes: dict[str, Any] = {"updated_at": datetime.now(UTC)}
        if status is not None:
            changes["error"] = None if error is None else error[:4000]
        if title is not None:
            changes["title"] = title
        if tags is not None:
            changes["tags"] = tags
        if metadata is not None:
            changes["metadata"] = metadata
        if status is not None:
            changes["status"] = status.value
        async with self.engine.begin() as conn:
            result = await conn.execute(
                recordings.update()
                .where(self._visible(workspace), recordings.c.id == recording_id)
                .values(**changes)
            )
            if result.rowcount == 0:
                raise NotFound(
                    f"no recording {recording_id!r}", detail={"recording_id": recording_id}
                )
            if tags is not None:
                await self._replace_tags(conn, recording_id, tags)
            if status is RecordingStatus.DELETING:
                return await self._fetch_deleting(conn, recording_id)
            return await self._fetch_recording(conn, workspace, recording_id)

    @staticmethod
    async def _fetch_deleting(conn: AsyncConnection, recording_id: str) -> Recording:
        row = (
            await conn.execute(
                sa.select(*_RECORDING_COLUMNS).where(recordings.c.id == recording_id)
            )
        ).one()
        return _recording(row)

    async def list_tombstones(self, limit: int = 1000) -> list[tuple[str, str]]:
        query = (
            sa.select(recordings.c.workspace_id, recordings.c.id)
            .where(recordings.c.status == RecordingStatus.DELETING.value)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [(row.workspace_id, row.id) for row in await conn.execute(query)]

    async def _recording_blobs(
        self, where: sa.ColumnElement[bool], limit: int | None
    ) -> list[RecordingBlobs]:
        query = (
            sa.select(
                recordings.c.workspace_id,
                recordings.c.id,
                recordings.c.status,
                recordings.c.sha256,
                recordings.c.playback_sha256,
            )
            .where(where)
            .order_by(recordings.c.id)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            found: dict[str, dict[str, str]] = {row.id: {} for row in rows}
            if found:
                named = sa.select(
                    artifacts.c.recording_id, artifacts.c.name, artifacts.c.sha256
                ).where(artifacts.c.recording_id.in_(list(found)))
                for artifact in await conn.execute(named):
                    found[artifact.recording_id][artifact.name] = artifact.sha256
        return [
            RecordingBlobs(
                workspace=row.workspace_id,
                recording_id=row.id,
                status=RecordingStatus(row.status),
                sha256=row.sha256,
                playback_sha256=row.playback_sha256,
                artifacts=found[row.id],
            )
            for row in rows
        ]

    async def list_recording_blobs(
        self, *, after: str | None = None, limit: int = 500
    ) -> list[RecordingBlobs]:
        where = recordings.c.id > after if after is not None else sa.true()
        return await self._recording_blobs(where, limit)

    async def get_recording_blobs(self, recording_id: str) -> RecordingBlobs | None:
        found = await self._recording_blobs(recordings.c.id == recording_id, 1)
        return found[0] if found else None

    async def purge_recording(self, workspace: str, recording_id: str) -> bool:
        async with self.engine.begin() as conn:
            owned = sa.and_(recordings.c.workspace_id == workspace, recordings.c.id == recording_id)
            exists = (await conn.execute(sa.select(recordings.c.id).where(owned))).first()
            if exists is None:
                return False
            # Children are removed explicitly too, so that no engine setting can leave any behind.
            await self.search_index.remove(conn, recording_id)
            for child in (jobs, transcripts, artifacts, recording_tags):
                await conn.execute(child.delete().where(child.c.recording_id == recording_id))
            await conn.execute(recordings.delete().where(owned))
        return True

    async def set_playback(self, workspace: str, recording_id: str, sha256: str | None) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                recordings.update()
                .where(self._visible(workspace), recordings.c.id == recording_id)
                .values(playback_sha256=sha256)
            )
        if result.rowcount == 0:
            raise NotFound(f"no recording {recording_id!r}", detail={"recording_id": recording_id})

    async def get_playback(self, workspace: str, recording_id: str) -> str | None:
        query = sa.select(recordings.c.playback_sha256).where(
            self._visible(workspace), recordings.c.id == recording_id
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            raise NotFound(f"no recording {recording_id!r}", detail={"recording_id": recording_id})
        sha256: str | None = row.playback_sha256
        return sha256

    # ---- transcripts --------------------------------------------------------------------------

    async def add_transcript(
        self,
        workspace: str,
        recording_id: str,
        transcript: TranscriptInput,
        *,
        job_id: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> Transcript:
        created_at = datetime.now(UTC)
        segments = [s.model_dump(exclude_none=True) for s in transcript.segments]
        # The version is computed inside the INSERT, which SQLite runs under its write lock;
        # PostgreSQL serialises writers on the recording's row lock instead.
        values: dict[str, tuple[Any, sa.types.TypeEngine[Any]]] = {
            "recording_id": (recording_id, transcripts.c.recording_id.type),
            "language": (transcript.language, transcripts.c.language.type),
            "segment_count": (len(segments), transcripts.c.segment_count.type),
            "segments": (segments, transcripts.c.segments.type),
            "created_at": (created_at, transcripts.c.created_at.type),
            "job_id": (job_id, transcripts.c.job_id.type),
            "engine": (transcript.engine, transcripts.c.engine.type),
            "model": (transcript.model, transcripts.c.model.type),
            "timings": (timings, transcripts.c.timings.type),
        }
        next_version = sa.select(
            sa.func.coalesce(sa.func.max(transcripts.c.version), 0) + 1,
            *(sa.literal(value, type_) for value, type_ in values.values()),
        ).where(transcripts.c.recording_id == recording_id)
        for attempt in range(10):
            try:
                async with self.engine.begin() as conn:
                    await self._fetch_recording(conn, workspace, recording_id, lock=True)
                    if job_id is not None and (made := await self._job_transcript(conn, job_id)):
                        if made.recording_id != recording_id:
                            raise Conflict(f"job {job_id!r} belongs to another recording")
                        return made
                    result = await conn.execute(
                        transcripts.insert()
                        .from_select(["version", *values], next_version)
                        .returning(transcripts.c.version)
                    )
                    version = result.scalar_one()
                    await self.search_index.replace(
                        conn, recording_id, version, transcript.language, transcript.segments
                    )
            except IntegrityError:
                await anyio.sleep(0.01 * (attempt + 1))  # lost a race for the number: retry
                continue
            return Transcript(
                recording_id=recording_id,
                version=version,
                language=transcript.language,
                segments=transcript.segments,
                created_at=created_at,
                engine=transcript.engine,
                model=transcript.model,
                timings=timings or {},
                job_id=job_id,
            )
        raise BackendUnavailable("could not allocate a transcript version; try again")

    @staticmethod
    async def _job_transcript(conn: AsyncConnection, job_id: str) -> Transcript | None:
        row = (
            await conn.execute(sa.select(transcripts).where(transcripts.c.job_id == job_id))
        ).first()
        return None if row is None else _transcript(row)

    async def get_job_transcript(
        self, workspace: str, recording_id: str, job_id: str
    ) -> Transcript | None:
        async with self.engine.connect() as conn:
            await self._fetch_recording(conn, workspace, recording_id)
            made = await self._job_transcript(conn, job_id)
        return made if made is not None and made.recording_id == recording_id else None

    async def get_transcript(
        self, workspace: str, recording_id: str, version: int | None = None
    ) -> Transcript:
        stmt = sa.select(transcripts).where(transcripts.c.recording_id == recording_id)
        if version is None:
            stmt = stmt.order_by(transcripts.c.version.desc()).limit(1)
        else:
            stmt = stmt.where(transcripts.c.version == version)
        async with self.engine.connect() as conn:
            await self._fetch_recording(conn, workspace, recording_id)
            row = (await conn.execute(stmt)).first()
        if row is None:
            which = "transcript" if version is None else f"transcript version {version}"
            raise NotFound(f"recording {recording_id!r} has no {which}")
        return _transcript(row)

    async def list_transcript_versions(
        self, workspace: str, recording_id: str
    ) -> list[TranscriptVersion]:
        stmt = (
            sa.select(*_TRANSCRIPT_VERSION_COLUMNS)
            .where(transcripts.c.recording_id == recording_id)
            .order_by(transcripts.c.version)
        )
        async with self.engine.connect() as conn:
            await self._fetch_recording(conn, workspace, recording_id)
            rows = (await conn.execute(stmt)).all()
        return [TranscriptVersion.model_validate(dict(row._mapping)) for row in rows]

    # ---- search -------------------------------------------------------------------------------

    async def search(
        self,
        workspace: str,
        query: SearchQuery,
        filters: SearchFilters,
        *,
        offset: int,
        limit: int,
        per_group: int | None = None,
    ) -> IndexPage:
        if filters.created_after is not None or filters.created_before is not None:
            filters = dataclasses.replace(
                filters,
                created_after=filters.created_after and _utc(filters.created_after),
                created_before=filters.created_before and _utc(filters.created_before),
            )
        dbapi = self.search_engine.dialect.loaded_dbapi
        for attempt in (1, 2):
            try:
                pooled = await self.search_engine.raw_connection()
            except dbapi.OperationalError as exc:
                # Refused, unreachable, or (SQLite) locked past the busy timeout while it
                # connected: a 503, as ``_unreachable_is_unavailable`` makes it on the
                # engine's own connections (the pool's checkout does not go through it).
                reason = str(exc).strip().split("\n", 1)[0]
                raise BackendUnavailable(f"the database is unreachable: {reason}") from exc
            try:
                return await self.search_index.search(
                    pooled.driver_connection,
                    workspace,
                    query,
                    filters,
                    offset=offset,
                    limit=limit,
                    per_group=per_group,
                )
            except ConnectionLost as exc:
                # The pooled connection was dead (the database restarted, or a network path
                # reset it while idle): the pool replaces it when it is next taken out, and a
                # read is safe to run again. Unreachable twice is a 503.
                pooled.invalidate(exc, soft=True)
                if attempt == 2:
                    raise
            finally:
                pooled.close()  # back to the pool, without I/O (see the search engine)
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def reindex_recording(self, recording_id: str) -> bool:
        async with self.engine.begin() as conn:
            query = sa.select(recordings.c.id).where(recordings.c.id == recording_id)
            if self.dialect != "sqlite":
                query = query.with_for_update()  # the writers of transcripts take it too
            if (await conn.execute(query)).first() is None:
                return False
            row = (
                await conn.execute(
                    sa.select(transcripts)
                    .where(transcripts.c.recording_id == recording_id)
                    .order_by(transcripts.c.version.desc())
                    .limit(1)
                )
            ).first()
            if row is None:
                await self.search_index.remove(conn, recording_id)
            else:
                current = _transcript(row)
                await self.search_index.replace(
                    conn, recording_id, current.version, current.language, current.segments
                )
        return True

    async def unindexed_recordings(self, limit: int) -> list[str]:
        newest = (
            sa.select(
                transcripts.c.recording_id, sa.func.max(transcripts.c.version).label("version")
            )
            .group_by(transcripts.c.recording_id)
            .subquery()
        )
        stmt = (
            sa.select(newest.c.recording_id)
            .outerjoin(search_documents, search_documents.c.recording_id == newest.c.recording_id)
            .where(
                sa.or_(
                    search_documents.c.version.is_(None),
                    search_documents.c.version != newest.c.version,
                )
            )
            .order_by(newest.c.recording_id)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return list((await conn.execute(stmt)).scalars())

    async def transcribed_recordings(self, after: str | None, limit: int) -> list[str]:
        stmt = sa.select(transcripts.c.recording_id).distinct()
        if after is not None:
            stmt = stmt.where(transcripts.c.recording_id > after)
        stmt = stmt.order_by(transcripts.c.recording_id).limit(limit)
        async with self.engine.connect() as conn:
            return list((await conn.execute(stmt)).scalars())

    # ---- artifacts ----------------------------------------------------------------------------

    async def upsert_artifact(self, workspace: str, recording_id: str, artifact: Artifact) -> None:
        key = sa.and_(artifacts.c.recording_id == recording_id, artifacts.c.name == artifact.name)
        fields = artifact.model_dump(exclude={"name", "created_at"})
        async with self.engine.begin() as conn:
            # Locked, so that two upserts of one name cannot both find it missing and insert.
            await self._fetch_recording(conn, workspace, recording_id, lock=True)
            replaced = await conn.execute(
                artifacts.update().where(key).values(updated_at=artifact.created_at, **fields)
            )
            if replaced.rowcount == 0:
                await conn.execute(
                    artifacts.insert().values(
                        recording_id=recording_id,
                        name=artifact.name,
                        created_at=artifact.created_at,
                        updated_at=artifact.created_at,
                        **fields,
                    )
                )

    async def get_artifact(self, workspace: str, recording_id: str, name: str) -> Artifact:
        async with self.engine.connect() as conn:
            await self._fetch_recording(conn, workspace, recording_id)
            row = (
                await conn.execute(
                    sa.select(*_ARTIFACT_COLUMNS).where(
                        artifacts.c.recording_id == recording_id, artifacts.c.name == name
                    )
                )
            ).first()
        if row is None:
            raise NotFound(f"recording {recording_id!r} has no artifact {name!r}")
        return _artifact(row)

    async def list_artifacts(self, workspace: str, recording_id: str) -> list[Artifact]:
        async with self.engine.connect() as conn:
            await self._fetch_recording(conn, workspace, recording_id)
            rows = (
                await conn.execute(
                    sa.select(*_ARTIFACT_COLUMNS)
                    .where(artifacts.c.recording_id == recording_id)
                    .order_by(artifacts.c.name)
                )
            ).all()
        return [_artifact(row) for row in rows]

    async def delete_artifact(self, workspace: str, recording_id: str, name: str) -> bool:
        async with self.engine.begin() as conn:
            await self._fetch_recording(conn, workspace, recording_id)
            result = await conn.execute(
                artifacts.delete().where(
                    artifacts.c.recording_id == recording_id, artifacts.c.name == name
                )
            )
        return bool(result.rowcount)

    # ---- accounting ---------------------------------------------------------------------------

    async def usage(self, workspace: str) -> StorageUsage:
        owned = sa.select(recordings.c.id).where(recordings.c.workspace_id == workspace)
        async with self.engine.connect() as conn:
            rec = (
                await conn.execute(
                    sa.select(
                        sa.func.count(), sa.func.coalesce(sa.func.sum(recordings.c.size_bytes), 0)
                    ).where(self._visible(workspace))
                )
            ).one()
            tr = (
                await conn.execute(
                    sa.select(sa.func.count()).where(transcripts.c.recording_id.in_(owned))
                )
            ).scalar_one()
            art = (
                await conn.execute(
                    sa.select(
                        sa.func.count(), sa.func.coalesce(sa.func.sum(artifacts.c.size_bytes), 0)
                    ).where(artifacts.c.recording_id.in_(owned))
                )
            ).one()
        return StorageUsage(
            recordings=rec[0],
            recording_bytes=rec[1],
            transcripts=tr,
            artifacts=art[0],
            artifact_bytes=art[1],
        )

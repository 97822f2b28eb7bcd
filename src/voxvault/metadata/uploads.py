"""The UploadStore port: the state of resumable uploads, shared by every API process.

An upload's bytes are part blobs (``uploads/{id}/parts/{name}``): one per chunk, or one grown in
place where the blob store can; or, where the blob store assembles blobs from parts (S3), parts
of one multipart upload of the recording's own blob (``multipart_id``), each numbered by the
row (``claim_part_number``) so that no two attempts share a number. The row lists the parts that
are durable, in order, with their sizes, and the offset they add up to. The offset moves only by
a conditional update (``append_part``), so of two processes writing at the same offset exactly
one wins.

::

    active ──(last part)──> completing ──> completed
       │                        │
       └──(DELETE, expiry)──────┴──(refused: not audio, too long...)──> terminated
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from voxvault.errors import NotFound
from voxvault.metadata.base import MetadataStore
from voxvault.metadata.sqlite_autocommit import SqliteAutocommit
from voxvault.metadata.tables import uploads


class UploadStatus(enum.StrEnum):
    ACTIVE = "active"
    COMPLETING = "completing"
    COMPLETED = "completed"
    TERMINATED = "terminated"


@dataclass(frozen=True, slots=True)
class UploadPart:
    name: str
    """The blob's name under ``uploads/{id}/parts/``: a new one per chunk, so racing writers
    never share one, or the same one for every chunk of a blob grown in place (under a lock).
    For a part of the upload's multipart upload, a name that tells its number (no blob)."""
    size: int
    part_number: int | None = None
    """Set for a part of the upload's multipart upload: its number there."""
    etag: str | None = None
    """Set for a part of the upload's multipart upload: the store's name for its bytes."""

    @property
    def in_multipart(self) -> bool:
        return self.part_number is not None


@dataclass(frozen=True, slots=True)
class Upload:
    id: str
    workspace: str
    length: int
    offset: int
    metadata: dict[str, str]
    status: UploadStatus
    recording_id: str
    """Chosen at creation: the recording the upload becomes, so a retried completion finds it."""
    created_at: datetime
    updated_at: datetime
    """For a ``completing`` upload, the last sign of life of the process completing it."""
    expires_at: datetime
    parts: tuple[UploadPart, ...] = field(default=())
    error: str | None = None
    multipart_id: str | None = None
    """The multipart upload of the recording's blob that chunks go to (once one did)."""

    @property
    def complete(self) -> bool:
        return self.offset == self.length


class UploadStore(ABC):
    @abstractmethod
    async def create_upload(self, upload: Upload) -> None: ...

    @abstractmethod
    async def get_upload(self, workspace: str, upload_id: str) -> Upload:
        """The upload in any status; ``NotFound`` once its row is gone."""

    @abstractmethod
    async def append_part(
        self, current: Upload, part: UploadPart, *, now: datetime, expires_at: datetime
    ) -> Upload | None:
        """Add a durable part at ``current.offset`` and move the offset past it, atomically;
        ``current`` is the upload as the caller read it. A part named as the last one extends
        it (a blob grown in place).

        Only while the upload is ``active``, unexpired at ``now`` and still at that offset;
        otherwise nothing changes and the answer is None. The part that fills the upload makes
        it ``completing`` (claimed by the caller, at ``now``)."""

    @abstractmethod
    async def claim_part_number(
        self, current: Upload, *, multipart_id: str, now: datetime
    ) -> tuple[str, int] | None:
        """Take a part number of the upload's multipart upload for a chunk at ``current.offset``:
        numbers are never given twice, and one taken later at a greater offset is greater.
        ``multipart_id`` becomes the upload's unless it has one already (another process's).

        Returns the upload's multipart id and the number; None unless the upload is ``active``,
        unexpired at ``now`` and still at that offset."""

    @abstractmethod
    async def claim_completion(
        self, workspace: str, upload_id: str, *, now: datetime, stale_before: datetime
    ) -> Upload | None:
        """Claim a full upload for completion: an ``active`` one, or a ``completing`` one whose
        claimer gave no sign of life since ``stale_before`` (it crashed). None when not ours."""

    @abstractmethod
    async def renew_claim(self, workspace: str, upload_id: str, now: datetime) -> None:
        """A sign of life of the process completing the upload."""

    @abstractmethod
    async def settle_upload(
        self,
        workspace: str,
        upload_id: str,
        status: UploadStatus,
        *,
        from_statuses: Sequence[UploadStatus],
        now: datetime,
        expires_at: datetime,
        error: str | None = None,
        expired_before: datetime | None = None,
    ) -> Upload | None:
        """Move to ``status`` (forgetting the parts) if the upload is in one of
        ``from_statuses`` (and, with ``expired_before``, expired by then), and return the row as
        settled (its ``multipart_id`` is final then); None otherwise."""

    @abstractmethod
    async def list_expired_uploads(self, now: datetime, limit: int = 500) -> list[Upload]:
        """Uploads of every workspace whose ``expires_at`` is before ``now``, oldest first."""

    @abstractmethod
    async def delete_upload(self, workspace: str, upload_id: str) -> bool: ...

    @abstractmethod
    async def list_stalled_completions(self, stale_before: datetime) -> list[Upload]:
        """``completing`` uploads (every workspace) with no sign of life since ``stale_before``."""

    @abstractmethod
    async def find_uploads(self, upload_ids: Collection[str]) -> dict[str, Upload]:
        """The uploads of these ids that have a row, in any workspace and status, by id."""


_FIND_BATCH = 500  # ids per query: well under every engine's bound parameter limit


def _part(value: Any) -> UploadPart:
    number = value.get("part_number")
    etag = value.get("etag")
    return UploadPart(
        name=str(value["name"]),
        size=int(value["size"]),
        part_number=None if number is None else int(number),
        etag=None if etag is None else str(etag),
    )


def _upload(row: sa.Row[Any]) -> Upload:
    return Upload(
        id=row.id,
        workspace=row.workspace_id,
        length=row.upload_length,
        offset=row.upload_offset,
        metadata=dict(row._mapping["metadata"]),
        status=UploadStatus(row.status),
        recording_id=row.recording_id,
        created_at=row.created_at,
        updated_at=row.updated_at,
        expires_at=row.expires_at,
        parts=tuple(_part(p) for p in row.parts),
        error=row.error,
        multipart_id=row.multipart_id,
    )


def _part_json(part: UploadPart) -> dict[str, Any]:
    value: dict[str, Any] = {"name": part.name, "size": part.size}
    if part.part_number is not None:
        value["part_number"] = part.part_number
    if part.etag is not None:
        value["etag"] = part.etag
    return value


def _parts_json(parts: Sequence[UploadPart]) -> list[dict[str, Any]]:
    return [_part_json(p) for p in parts]


_APPEND_COLUMNS = ("upload_offset", "parts", "status", "updated_at", "expires_at")
_SQLITE_APPEND = (
    "UPDATE uploads SET upload_offset = ?, parts = ?, status = ?, updated_at = ?, expires_at = ? "
    "WHERE id = ? AND workspace_id = ? AND upload_offset = ? AND status = ? AND expires_at > ?"
)


class _SqliteAppend:
    """``append_part``'s update on SQLite, on the store's autocommit connection: it runs once
    per stored chunk, and the chunk's answer waits for it. The values are encoded by the
    columns' own types, so the row reads back as any other."""

    def __init__(self, engine: AsyncEngine, autocommit: SqliteAutocommit) -> None:
        self._autocommit = autocommit
        columns = (*_APPEND_COLUMNS, "id", "workspace_id", "upload_offset", "status", "expires_at")
        self._encoders = [self._encoder(uploads.c[name].type, engine.dialect) for name in columns]

    @staticmethod
    def _encoder(column_type: sa.types.TypeEngine[Any], dialect: Any) -> Callable[[Any], Any]:
        process: Callable[[Any], Any] | None = column_type.dialect_impl(dialect).bind_processor(
            dialect
        )
        return process if process is not None else (lambda value: value)

    async def __call__(self, *values: Any) -> int:
        """Run the update with ``values`` for its ``?`` in order; the rows it changed."""
        params = [encode(value) for encode, value in zip(self._encoders, values, strict=True)]
        return await self._autocommit.execute(_SQLITE_APPEND, params)


class SqlUploadStore(UploadStore):
    """Upload rows on the metadata store's own SQLAlchemy engine (SQLite or PostgreSQL)."""

    def __init__(self, engine: AsyncEngine, autocommit: SqliteAutocommit | None = None) -> None:
        """``autocommit``: the SQLite file's autocommit connection, which records chunks (else
        they are recorded through the engine, as on PostgreSQL)."""
        self.engine = engine
        self._sqlite_append = _SqliteAppend(engine, autocommit) if autocommit else None

    @staticmethod
    def _row(workspace: str, upload_id: str) -> sa.ColumnElement[bool]:
        return sa.and_(uploads.c.id == upload_id, uploads.c.workspace_id == workspace)

    async def create_upload(self, upload: Upload) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                uploads.insert().values(
                    id=upload.id,
                    workspace_id=upload.workspace,
                    upload_length=upload.length,
                    upload_offset=upload.offset,
                    parts=_parts_json(upload.parts),
                    metadata=upload.metadata,
                    status=upload.status.value,
                    recording_id=upload.recording_id,
                    error=upload.error,
                    created_at=upload.created_at,
                    updated_at=upload.updated_at,
                    expires_at=upload.expires_at,
                    multipart_id=upload.multipart_id,
                    next_part_number=1,
                )
            )

    async def _fetch(self, conn: AsyncConnection, workspace: str, upload_id: str) -> Upload:
        row = (
            await conn.execute(sa.select(uploads).where(self._row(workspace, upload_id)))
        ).one_or_none()
        if row is None:
            raise NotFound(f"no upload {upload_id!r}", detail={"upload_id": upload_id})
        return _upload(row)

    async def get_upload(self, workspace: str, upload_id: str) -> Upload:
        async with self.engine.connect() as conn:
            return await self._fetch(conn, workspace, upload_id)

    async def append_part(
        self, current: Upload, part: UploadPart, *, now: datetime, expires_at: datetime
    ) -> Upload | None:
        expected_offset = current.offset
        offset = expected_offset + part.size
        if (
            current.status is not UploadStatus.ACTIVE
            or current.expires_at <= now
            or offset > current.length
        ):
            return None
        workspace, upload_id = current.workspace, current.id
        status = UploadStatus.COMPLETING if offset == current.length else UploadStatus.ACTIVE
        if current.parts and current.parts[-1].name == part.name:
            last = current.parts[-1]
            parts = (*current.parts[:-1], UploadPart(name=part.name, size=last.size + part.size))
        else:
            parts = (*current.parts, part)
        # The WHERE repeats what the caller read: the parts change only with the offset and the
        # status, so a writer that got in between has moved one of them and this update changes
        # nothing (PostgreSQL re-checks the WHERE after waiting for that writer's row lock;
        # SQLite runs one writer at a time). The read stays outside the write transaction,
        # since SQLite cannot turn a read transaction that another writer overtook into a write.
        values = (offset, _parts_json(parts), status.value, now, expires_at)
        if self._sqlite_append is not None:
            changed = await self._sqlite_append(
                *values, upload_id, workspace, expected_offset, UploadStatus.ACTIVE.value, now
            )
        else:
            async with self.engine.begin() as conn:
                result = await conn.execute(
                    uploads.update()
                    .where(
                        self._row(workspace, upload_id),
                        uploads.c.upload_offset == expected_offset,
                        uploads.c.status == UploadStatus.ACTIVE.value,
                        uploads.c.expires_at > now,
                    )
                    .values(dict(zip(_APPEND_COLUMNS, values, strict=True)))
                )
                changed = result.rowcount
        if changed != 1:
            return None
        return replace(
            current,
            offset=offset,
            parts=parts,
            status=status,
            updated_at=now,
            expires_at=expires_at,
        )

    async def claim_part_number(
        self, current: Upload, *, multipart_id: str, now: datetime
    ) -> tuple[str, int] | None:
        # One statement: the row lock (PostgreSQL) or the one writer (SQLite) orders the claims,
        # and the WHERE repeats what the caller read, as append_part's does.
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    uploads.update()
                    .where(
                        self._row(current.workspace, current.id),
                        uploads.c.upload_offset == current.offset,
                        uploads.c.status == UploadStatus.ACTIVE.value,
                        uploads.c.expires_at > now,
                    )
                    .values(
                        next_part_number=uploads.c.next_part_number + 1,
                        multipart_id=sa.func.coalesce(uploads.c.multipart_id, multipart_id),
                    )
                    .returning(uploads.c.multipart_id, uploads.c.next_part_number)
                )
            ).one_or_none()
        if row is None:
            return None
        return str(row.multipart_id), int(row.next_part_number) - 1

    async def claim_completion(
        self, workspace: str, upload_id: str, *, now: datetime, stale_before: datetime
    ) -> Upload | None:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                uploads.update()
                .where(
                    self._row(workspace, upload_id),
                    uploads.c.upload_offset == uploads.c.upload_length,
                    sa.or_(
                        uploads.c.status == UploadStatus.ACTIVE.value,
                        sa.and_(
                            uploads.c.status == UploadStatus.COMPLETING.value,
                            uploads.c.updated_at < stale_before,
                        ),
                    ),
                )
                .values(status=UploadStatus.COMPLETING.value, updated_at=now)
            )
            if result.rowcount != 1:
                return None
            return await self._fetch(conn, workspace, upload_id)

    async def renew_claim(self, workspace: str, upload_id: str, now: datetime) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                uploads.update()
                .where(
                    self._row(workspace, upload_id),
                    uploads.c.status == UploadStatus.COMPLETING.value,
                )
                .values(updated_at=now)
            )

    async def settle_upload(
        self,
        workspace: str,
        upload_id: str,
        status: UploadStatus,
        *,
        from_statuses: Sequence[UploadStatus],
        now: datetime,
        expires_at: datetime,
        error: str | None = None,
        expired_before: datetime | None = None,
    ) -> Upload | None:
        conditions = [
            self._row(workspace, upload_id),
            uploads.c.status.in_([s.value for s in from_statuses]),
        ]
        if expired_before is not None:
            conditions.append(uploads.c.expires_at < expired_before)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                uploads.update()
                .where(*conditions)
                .values(
                    status=status.value,
                    parts=[],
                    error=error[:4000] if error else None,
                    updated_at=now,
                    expires_at=expires_at,
                )
                .returning(*uploads.c)
            )
            row = result.one_or_none()
            return None if row is None else _upload(row)

    async def list_expired_uploads(self, now: datetime, limit: int = 500) -> list[Upload]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(uploads)
                .where(uploads.c.expires_at < now)
                .order_by(uploads.c.expires_at, uploads.c.id)
                .limit(limit)
            )
            return [_upload(row) for row in rows]

    async def delete_upload(self, workspace: str, upload_id: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(uploads.delete().where(self._row(workspace, upload_id)))
            return result.rowcount == 1

    async def list_stalled_completions(self, stale_before: datetime) -> list[Upload]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(uploads)
                .where(
                    uploads.c.status == UploadStatus.COMPLETING.value,
                    uploads.c.updated_at < stale_before,
                )
                .order_by(uploads.c.updated_at, uploads.c.id)
            )
            return [_upload(row) for row in rows]

    async def find_uploads(self, upload_ids: Collection[str]) -> dict[str, Upload]:
        found: dict[str, Upload] = {}
        wanted = list(upload_ids)
        async with self.engine.connect() as conn:
            for start in range(0, len(wanted), _FIND_BATCH):
                batch = wanted[start : start + _FIND_BATCH]
                rows = await conn.execute(sa.select(uploads).where(uploads.c.id.in_(batch)))
                found.update((row.id, _upload(row)) for row in rows)
        return found


def open_upload_store(metadata: MetadataStore) -> UploadStore:
    """The upload store that lives beside ``metadata``, in the same database."""
    from voxvault.metadata.sql import SqlMetadataStore

    if not isinstance(metadata, SqlMetadataStore):  # pragma: no cover - the only adapter today
        raise NotImplementedError(f"no upload store beside {type(metadata).__name__}")
    return SqlUploadStore(metadata.engine, metadata.autocommit)

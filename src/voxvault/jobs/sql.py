"""JobQueue on the metadata database: the embedded default (SQLite) and PostgreSQL alike.

A claim is one UPDATE ... WHERE id = (oldest runnable) RETURNING: atomic under SQLite's write
lock, and with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL so that workers never wait on each other.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from voxvault.errors import Conflict, NotFound
from voxvault.jobs.base import Job, JobQueue, JobStatus
from voxvault.metadata.tables import UTCDateTime, jobs, recordings

LOST_WORKER_ERROR = "the worker running this job stopped responding"
_COLUMNS = [
    jobs.c.workspace_id.label("workspace"),
    *(c for c in jobs.c if c.name not in ("workspace_id", "run_after", "lease_owner")),
]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _job(row: sa.Row[Any] | sa.RowMapping) -> Job:
    return Job.model_validate(dict(row if isinstance(row, sa.RowMapping) else row._mapping))


def _violates_foreign_key(exc: IntegrityError) -> bool:
    """A missing parent row rather than a duplicate, told by the engine's error code: PostgreSQL
    translates its messages into the server's language."""
    sqlstate = getattr(exc.orig, "sqlstate", None)  # psycopg
    if sqlstate is not None:
        return bool(sqlstate == "23503")  # foreign_key_violation
    sqlite_error = getattr(exc.orig, "sqlite_errorname", None)
    if sqlite_error is not None:
        return bool(sqlite_error == "SQLITE_CONSTRAINT_FOREIGNKEY")
    return "foreign" in str(exc.orig).lower()


class SqlJobQueue(JobQueue):
    def __init__(self, engine: AsyncEngine, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self.engine = engine
        self._skip_locked = engine.dialect.name != "sqlite"
        self._clock = clock

    async def open(self, *, migrate: bool = True) -> None:
        """Nothing to do: the metadata store's migrations made the jobs table."""

    async def close(self) -> None:
        """Nothing to do: the engine belongs to the metadata store."""

    async def enqueue(
        self,
        workspace: str,
        recording_id: str,
        kind: str,
        payload: dict[str, Any] | None = None,
        *,
        max_attempts: int = 3,
    ) -> Job:
        now = self._clock()
        values = {
            "id": uuid.uuid4().hex,
            "workspace_id": workspace,
            "recording_id": recording_id,
            "kind": kind,
            "status": JobStatus.QUEUED.value,
            "attempts": 0,
            "max_attempts": max_attempts,
            "progress": 0.0,
            "stage": None,
            "error": None,
            "payload": payload or {},
            "run_after": now,
            "lease_owner": None,
            "lease_expires_at": None,
            "created_at": now,
            "started_at": None,
            "finished_at": None,
        }
        owned = sa.select(recordings.c.id).where(
            recordings.c.id == recording_id, recordings.c.workspace_id == workspace
        )
        try:
            async with self.engine.begin() as conn:
                if (await conn.execute(owned)).first() is None:
                    raise NotFound(f"no recording {recording_id!r}")
                row = (
                    await conn.execute(jobs.insert().values(**values).returning(*_COLUMNS))
                ).one()
        except IntegrityError as exc:
            if _violates_foreign_key(exc):  # the recording went away after the check above
                raise NotFound(f"no recording {recording_id!r}") from None
            raise Conflict(
                f"recording {recording_id!r} already has a queued or running job"
            ) from None
        return _job(row)

    async def claim(
        self, worker: str, lease_seconds: float, *, job_ids: Collection[str] | None = None
    ) -> Job | None:
        now = self._clock()
        expired = sa.and_(jobs.c.status == JobStatus.RUNNING.value, jobs.c.lease_expires_at < now)
        runnable = sa.or_(
            sa.and_(jobs.c.status == JobStatus.QUEUED.value, jobs.c.run_after <= now),
            sa.and_(expired, jobs.c.attempts < jobs.c.max_attempts),
        )
        if job_ids is not None:
            runnable = sa.and_(runnable, jobs.c.id.in_(list(job_ids)))
        oldest = sa.select(jobs.c.id).where(runnable).order_by(jobs.c.created_at).limit(1)
        if self._skip_locked:
            oldest = oldest.with_for_update(skip_locked=True)
        async with self.engine.begin() as conn:
            # A job whose worker vanished on its last allowed attempt ends here, not in a retry.
            await conn.execute(
                jobs.update()
                .where(expired, jobs.c.attempts >= jobs.c.max_attempts)
                .values(
                    status=JobStatus.FAILED.value,
                    error=LOST_WORKER_ERROR,
                    lease_owner=None,
                    lease_expires_at=None,
                    finished_at=now,
                )
            )
            row = (
                await conn.execute(
                    jobs.update()
                    .where(jobs.c.id == oldest.scalar_subquery(), runnable)
                    .values(
                        status=JobStatus.RUNNING.value,
                        attempts=jobs.c.attempts + 1,
                        lease_owner=worker,
                        lease_expires_at=now + timedelta(seconds=lease_seconds),
                        progress=0.0,  # each attempt starts over
                        stage=None,
                        started_at=sa.func.coalesce(jobs.c.started_at, now),
                    )
                    .returning(*_COLUMNS)
                )
            ).first()
        return None if row is None else _job(row)

    def _held_by(self, job_id: str, worker: str) -> sa.ColumnElement[bool]:
        return sa.and_(
            jobs.c.id == job_id,
            jobs.c.lease_owner == worker,
            jobs.c.status == JobStatus.RUNNING.value,
        )

    async def heartbeat(
        self,
        job_id: str,
        worker: str,
        lease_seconds: float,
        progress: float | None = None,
        stage: str | None = None,
    ) -> bool:
        values: dict[str, Any] = {
            "lease_expires_at": self._clock() + timedelta(seconds=lease_seconds)
        }
        if progress is not None:
            values["progress"] = min(1.0, max(0.0, progress))
        if stage is not None:
            values["stage"] = stage
        async with self.engine.begin() as conn:
            result = await conn.execute(
                jobs.update().where(self._held_by(job_id, worker)).values(**values)
            )
        return bool(result.rowcount)

    async def complete(self, job_id: str, worker: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                jobs.update()
                .where(self._held_by(job_id, worker))
                .values(
                    status=JobStatus.SUCCEEDED.value,
                    progress=1.0,
                    stage=None,
                    error=None,
                    lease_owner=None,
                    lease_expires_at=None,
                    finished_at=self._clock(),
                )
            )
        return bool(result.rowcount)

    async def fail(
        self, job_id: str, worker: str, error: str, *, retry_after: float, retry: bool = True
    ) -> Job | None:
        now = self._clock()
        again = jobs.c.attempts < jobs.c.max_attempts if retry else sa.false()
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    jobs.update()
                    .where(self._held_by(job_id, worker))
                    .values(
                        status=sa.case(
                            (again, JobStatus.QUEUED.value), else_=JobStatus.FAILED.value
                        ),
                        run_after=now + timedelta(seconds=retry_after),
                        finished_at=sa.case((again, None), else_=now),
                        error=error[:4000],
                        lease_owner=None,
                        lease_expires_at=None,
                    )
                    .returning(*_COLUMNS)
                )
            ).first()
        return None if row is None else _job(row)

    async def cancel(self, workspace: str, job_id: str) -> Job:
        unfinished = [JobStatus.QUEUED.value, JobStatus.RUNNING.value]
        async with self.engine.begin() as conn:
            await conn.execute(
                jobs.update()
                .where(
                    jobs.c.id == job_id,
                    jobs.c.workspace_id == workspace,
                    jobs.c.status.in_(unfinished),
                )
                .values(
                    status=JobStatus.CANCELLED.value,
                    lease_owner=None,
                    lease_expires_at=None,
                    finished_at=self._clock(),
                )
            )
        return await self.get(workspace, job_id)

    async def get(self, workspace: str, job_id: str) -> Job:
        query = sa.select(*_COLUMNS).where(jobs.c.id == job_id, jobs.c.workspace_id == workspace)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            raise NotFound(f"no job {job_id[:64]!r}", detail={"job_id": job_id[:64]})
        return _job(row)

    async def latest(self, workspace: str, recording_id: str) -> Job | None:
        jobs_of = await self._of_recording(workspace, recording_id, limit=1)
        return jobs_of[0] if jobs_of else None

    async def list_for_recording(self, workspace: str, recording_id: str) -> list[Job]:
        return await self._of_recording(workspace, recording_id, limit=None)

    async def _of_recording(
        self, workspace: str, recording_id: str, *, limit: int | None
    ) -> list[Job]:
        query = (
            sa.select(*_COLUMNS)
            .where(jobs.c.recording_id == recording_id, jobs.c.workspace_id == workspace)
            .order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [_job(row) for row in await conn.execute(query)]

    async def live(self) -> list[tuple[Job, datetime]]:
        """Every queued or running job with the time it can next be claimed."""
        due = sa.type_coerce(
            sa.case(
                (jobs.c.status == JobStatus.QUEUED.value, jobs.c.run_after),
                else_=jobs.c.lease_expires_at,
            ),
            UTCDateTime(),
        ).label("due")
        query = sa.select(*_COLUMNS, due).where(
            jobs.c.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value])
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [(_job(row), row["due"]) for row in rows]

    async def due_at(self, job_id: str) -> datetime | None:
        """When a queued job may next run (its retry's backoff), or None if it is not queued."""
        query = sa.select(jobs.c.run_after).where(
            jobs.c.id == job_id, jobs.c.status == JobStatus.QUEUED.value
        )
        async with self.engine.connect() as conn:
            due: datetime | None = (await conn.execute(query)).scalar_one_or_none()
        return due

    async def live_job_ids(self) -> set[str]:
        query = sa.select(jobs.c.id).where(
            jobs.c.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value])
        )
        async with self.engine.connect() as conn:
            return {row.id for row in await conn.execute(query)}

    async def lease_owners(self) -> set[str]:
        query = (
            sa.select(jobs.c.lease_owner)
            .distinct()
            .where(jobs.c.status == JobStatus.RUNNING.value, jobs.c.lease_owner.is_not(None))
        )
        async with self.engine.connect() as conn:
            return {row.lease_owner for row in await conn.execute(query)}

    async def expire_leases(self, owners: Collection[str]) -> int:
        if not owners:
            return 0
        async with self.engine.begin() as conn:
            result = await conn.execute(
                jobs.update()
                .where(
                    jobs.c.status == JobStatus.RUNNING.value,
                    jobs.c.lease_owner.in_(list(owners)),
                )
                .values(lease_expires_at=self._clock() - timedelta(seconds=1))
            )
        return int(result.rowcount)

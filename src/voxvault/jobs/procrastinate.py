"""JobQueue on procrastinate: jobs dispatched to ``voxvault worker`` processes on any machine.

The job rows stay where the embedded queue keeps them (the metadata database, through
``SqlJobQueue``): they carry what the API shows (status, progress, stage, error, attempts) and
the lease that lets exactly one worker write a job's transcript. procrastinate, on PostgreSQL,
carries the dispatch: each queued row has a procrastinate job (``voxvault.run_job``) that a
worker, woken by LISTEN/NOTIFY, runs by claiming that row. procrastinate's worker heartbeats
find the jobs of a worker that died (SIGKILL, a lost machine); a periodic sweep, deferred once
per cluster by procrastinate's periodic deferrer, retries them and re-dispatches any live row
that lost its procrastinate job (a crash between the row's insert and its dispatch, say).

Retries keep the row's own rules (attempts, backoff, permanent errors): a failed attempt that
may run again is dispatched anew at its due time; procrastinate never retries on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio

from voxvault.errors import BackendUnavailable
from voxvault.jobs.base import Job, JobQueue, JobRunner, JobStatus
from voxvault.jobs.sql import SqlJobQueue

log = logging.getLogger(__name__)

RUN_TASK = "voxvault.run_job"
REQUEUE_TASK = "voxvault.requeue"
SWEEP_TASK = "voxvault.sweep"
REQUEUE_EVERY_S = 10  # how soon a dead worker's job is noticed, beyond its lease
SWEEP_EVERY_S = 60  # the product's own sweeps
_SCHEMA_LOCK = 0x766F7876_71756575  # "voxvqueu": one schema install at a time per database
_LIVE = ("todo", "doing")
STOP_WAIT_S = 10.0


def every(seconds: int) -> str:
    """A cron spec (procrastinate's sixth column is seconds) firing every ``seconds``, which
    must divide a minute, or be a whole number of minutes dividing an hour."""
    if 0 < seconds < 60 and 60 % seconds == 0:
        return f"* * * * * */{seconds}"
    if seconds % 60 == 0 and 0 < seconds // 60 <= 60 and 60 % (seconds // 60) == 0:
        return f"*/{seconds // 60} * * * *"
    raise ValueError(f"cannot run every {seconds} s on a clock: pick a divisor of 60 s or 60 min")


def conninfo(url: str) -> str:
    """The libpq URL of ``url`` (SQLAlchemy's ``postgresql+psycopg://`` spelling accepted)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+", 1)[0] not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {url!r}")
    return f"postgresql://{rest}"


class ProcrastinateJobQueue(JobQueue):
    pushes = True

    def __init__(
        self,
        url: str,
        records: SqlJobQueue,
        *,
        lease_seconds: float = 30.0,
        requeue_every_s: int = REQUEUE_EVERY_S,
        sweep_every_s: int = SWEEP_EVERY_S,
    ) -> None:
        import procrastinate

        self.records = records
        self.conninfo = conninfo(url)
        self.lease_seconds = lease_seconds
        self.app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(
                conninfo=self.conninfo, kwargs={"connect_timeout": 5}, timeout=10
            )
        )
        self._runner: JobRunner | None = None
        self._sweeps: Sequence[Callable[[], Awaitable[object]]] = ()
        self._register_tasks(every(requeue_every_s), every(sweep_every_s))

    # ---- life cycle ------------------------------------------------------------------------

    async def open(self, *, migrate: bool = True) -> None:
        if migrate:
            await self._install_schema()
        try:
            await self.app.open_async()
        except Exception as exc:
            raise BackendUnavailable(f"the job queue database is unreachable: {exc}") from exc

    async def close(self) -> None:
        await self.app.close_async()

    async def _install_schema(self) -> None:
        """procrastinate's tables, installed once (under a lock) when the database has none."""
        import psycopg
        from procrastinate.schema import SchemaManager

        try:
            async with (
                await psycopg.AsyncConnection.connect(self.conninfo, connect_timeout=5) as conn,
                conn.transaction(),
            ):
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                found = await (
                    await conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
                ).fetchone()
                if found is None or not found[0]:
                    await conn.execute(SchemaManager.get_schema())
        except psycopg.OperationalError as exc:
            raise BackendUnavailable(f"the job queue database is unreachable: {exc}") from exc

    # ---- dispatch ------------------------------------------------------------------------

    async def _dispatch(self, job: Job, *, at: datetime | None = None) -> None:
        """Give the row a procrastinate job; one waiting per row (its id is the queueing lock)."""
        from procrastinate.exceptions import AlreadyEnqueued, ConnectorException

        task = self.app.tasks[RUN_TASK]
        options: dict[str, Any] = {"queueing_lock": job.id}
        if at is not None and at > datetime.now(UTC):
            options["schedule_at"] = at
        try:
            await task.configure(**options).defer_async(job_id=job.id)
        except AlreadyEnqueued:
            pass
        except ConnectorException as exc:
            # The row is durable; the requeue sweep dispatches it once the queue is back.
            log.warning("job %s: could not dispatch it yet: %s", job.id, exc)

    async def enqueue(
        self,
        workspace: str,
        recording_id: str,
        kind: str,
        payload: dict[str, Any] | None = None,
        *,
        max_attempts: int = 3,
    ) -> Job:
        job = await self.records.enqueue(
            workspace, recording_id, kind, payload, max_attempts=max_attempts
        )
        await self._dispatch(job)
        return job

    async def fail(
        self, job_id: str, worker: str, error: str, *, retry_after: float, retry: bool = True
    ) -> Job | None:
        job = await self.records.fail(job_id, worker, error, retry_after=retry_after, retry=retry)
        if job is not None and job.status is JobStatus.QUEUED:
            due = await self.records.due_at(job.id)
            await self._dispatch(job, at=due)
        return job

    # ---- workers -------------------------------------------------------------------------

    async def serve(
        self,
        runner: JobRunner,
        concurrency: int,
        *,
        sweeps: Sequence[Callable[[], Awaitable[object]]] = (),
    ) -> None:
        self._runner = runner
        self._sweeps = sweeps
        heartbeat = max(1.0, self.lease_seconds / 3)
        # A task of its own: procrastinate stops gracefully (unregistering from the cluster)
        # when cancelled once, which the caller's cancel scope would not let it finish.
        worker = asyncio.ensure_future(
            self.app.run_worker_async(
                concurrency=concurrency,
                install_signal_handlers=False,
                delete_jobs="successful",
                update_heartbeat_interval=heartbeat,
                stalled_worker_timeout=self.lease_seconds,
                shutdown_graceful_timeout=0,  # a stopped job's lease lapses; it runs again
            )
        )
        try:
            await asyncio.shield(worker)
        finally:
            if not worker.done():
                worker.cancel()
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(STOP_WAIT_S),
                    contextlib.suppress(asyncio.CancelledError),
                ):
                    await worker

    def _register_tasks(self, requeue_cron: str, sweep_cron: str) -> None:
        @self.app.task(name=RUN_TASK)
        async def run_job(job_id: str) -> None:
            if self._runner is None:  # pragma: no cover - tasks run only under serve()
                raise RuntimeError("no job runner in this process")
            await self._runner(job_id)

        @self.app.periodic(cron=requeue_cron, periodic_id="requeue")
        @self.app.task(name=REQUEUE_TASK, queueing_lock=REQUEUE_TASK)
        async def requeue(timestamp: int) -> None:
            await self.requeue()

        @self.app.periodic(cron=sweep_cron, periodic_id="sweep")
        @self.app.task(name=SWEEP_TASK, queueing_lock=SWEEP_TASK)
        async def sweep(timestamp: int) -> None:
            for each in self._sweeps:
                await each()

    async def requeue(self) -> int:
        """Retry the jobs of dead workers and dispatch every live row that has no procrastinate
        job; returns how many rows were dispatched again."""
        manager = self.app.job_manager
        stalled = await manager.get_stalled_jobs(
            task_name=RUN_TASK, seconds_since_heartbeat=self.lease_seconds
        )
        for dead in stalled:
            log.warning("job %s: its worker stopped responding; retrying it", dead.task_kwargs)
            await manager.retry_job(dead)
        covered: set[str] = set()
        for status in _LIVE:
            for pending in await manager.list_jobs_async(task=RUN_TASK, status=status):
                covered.add(str(pending.task_kwargs.get("job_id")))
        dispatched = 0
        for job, due in await self.records.live():
            if job.id not in covered:
                await self._dispatch(job, at=due)
                dispatched += 1
        return dispatched

    # ---- the rows --------------------------------------------------------------------------

    async def claim(
        self, worker: str, lease_seconds: float, *, job_ids: Collection[str] | None = None
    ) -> Job | None:
        return await self.records.claim(worker, lease_seconds, job_ids=job_ids)

    async def heartbeat(
        self,
        job_id: str,
        worker: str,
        lease_seconds: float,
        progress: float | None = None,
        stage: str | None = None,
    ) -> bool:
        return await self.records.heartbeat(job_id, worker, lease_seconds, progress, stage)

    async def complete(self, job_id: str, worker: str) -> bool:
        return await self.records.complete(job_id, worker)

    async def cancel(self, workspace: str, job_id: str) -> Job:
        return await self.records.cancel(workspace, job_id)

    async def get(self, workspace: str, job_id: str) -> Job:
        return await self.records.get(workspace, job_id)

    async def latest(self, workspace: str, recording_id: str) -> Job | None:
        return await self.records.latest(workspace, recording_id)

    async def list_for_recording(self, workspace: str, recording_id: str) -> list[Job]:
        return await self.records.list_for_recording(workspace, recording_id)

    async def live_job_ids(self) -> set[str]:
        return await self.records.live_job_ids()

    async def lease_owners(self) -> set[str]:
        return await self.records.lease_owners()

    async def expire_leases(self, owners: Collection[str]) -> int:
        return await self.records.expire_leases(owners)

"""The procrastinate JobQueue: what it adds to the rows the conformance suite checks.

Dispatch (one procrastinate job per queued row), workers that run what is dispatched, retries at
their due time, the requeue sweep, and periodic sweeps that run once per cluster however many
workers there are. Each test gets a fresh PostgreSQL database (tests/postgres.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import anyio
import pytest

from tests.conformance.test_metadata_store import make_recording
from tests.postgres import postgres_database
from voxvault.jobs import JobStatus
from voxvault.jobs.procrastinate import RUN_TASK, SWEEP_TASK, ProcrastinateJobQueue, every
from voxvault.jobs.sql import SqlJobQueue
from voxvault.metadata import DEFAULT_WORKSPACE as WS
from voxvault.metadata.sql import SqlMetadataStore

pytestmark = pytest.mark.anyio
WAIT_S = 30


@pytest.fixture
async def database() -> AsyncIterator[tuple[str, SqlMetadataStore]]:
    with postgres_database() as url:
        metadata = SqlMetadataStore(url)
        try:
            await metadata.migrate()
            yield url, metadata
        finally:
            await metadata.close()


def make_queue(metadata: SqlMetadataStore, url: str, **options: Any) -> ProcrastinateJobQueue:
    return ProcrastinateJobQueue(url, SqlJobQueue(metadata.engine), **options)


@pytest.fixture
async def queue(database: tuple[str, SqlMetadataStore]) -> AsyncIterator[ProcrastinateJobQueue]:
    url, metadata = database
    opened = make_queue(metadata, url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def new_recording(metadata: SqlMetadataStore) -> str:
    recording = make_recording()
    await metadata.insert_recording(WS, recording)
    return recording.id


async def dispatched(queue: ProcrastinateJobQueue, status: str = "todo") -> list[Any]:
    return list(await queue.app.job_manager.list_jobs_async(task=RUN_TASK, status=status))


async def wait_until(check: Callable[[], Any], what: str) -> None:
    with anyio.move_on_after(WAIT_S):
        while not await check():
            await anyio.sleep(0.1)
        return
    pytest.fail(f"not within {WAIT_S} s: {what}")


def test_every_makes_cron_specs_on_the_clock() -> None:
    assert every(10) == "* * * * * */10"
    assert every(60) == "*/1 * * * *"
    assert every(300) == "*/5 * * * *"
    for bad in (0, 7, 90, 7200):
        with pytest.raises(ValueError, match="cannot run every"):
            every(bad)


async def test_enqueue_dispatches_one_procrastinate_job_per_row(
    queue: ProcrastinateJobQueue, database: tuple[str, SqlMetadataStore]
) -> None:
    job = await queue.enqueue(WS, await new_recording(database[1]), "transcribe")
    pending = await dispatched(queue)
    assert [p.task_kwargs for p in pending] == [{"job_id": job.id}]
    # Dispatching it again (the sweep after a lost response, say) does not double it.
    assert await queue.requeue() == 0
    assert len(await dispatched(queue)) == 1


async def test_the_schema_is_installed_once_and_open_is_repeatable(
    database: tuple[str, SqlMetadataStore],
) -> None:
    url, metadata = database
    queues = [make_queue(metadata, url) for _ in range(3)]
    async with anyio.create_task_group() as group:  # three processes starting at once
        for each in queues:
            group.start_soon(each.open)
    try:
        assert all([await q.app.check_connection_async() for q in queues])
    finally:
        for each in queues:
            await each.close()


async def test_a_worker_runs_what_is_dispatched(
    queue: ProcrastinateJobQueue, database: tuple[str, SqlMetadataStore]
) -> None:
    metadata = database[1]
    ran: list[str] = []

    async def runner(job_id: str) -> None:
        job = await queue.claim("worker-a", 30, job_ids=[job_id])
        assert job is not None
        ran.append(job.id)
        assert await queue.complete(job.id, "worker-a")

    jobs = [await queue.enqueue(WS, await new_recording(metadata), "transcribe") for _ in range(3)]
    async with anyio.create_task_group() as group:
        group.start_soon(queue.serve, runner, 2)

        async def all_ran() -> bool:
            return len(ran) == len(jobs)

        await wait_until(all_ran, "every job ran")
        group.cancel_scope.cancel()
    assert sorted(ran) == sorted(job.id for job in jobs)
    for job in jobs:
        assert (await queue.get(WS, job.id)).status is JobStatus.SUCCEEDED
    assert await dispatched(queue, "todo") == []


async def test_a_failed_attempt_is_dispatched_again_at_its_due_time(
    queue: ProcrastinateJobQueue, database: tuple[str, SqlMetadataStore]
) -> None:
    job = await queue.enqueue(WS, await new_recording(database[1]), "transcribe")
    # The worker that takes the first dispatch ends its procrastinate job when it returns.
    for pending in await dispatched(queue):
        await queue.app.job_manager.cancel_job_by_id_async(pending.id, delete_job=True)
    claimed = await queue.claim("worker-a", 30, job_ids=[job.id])
    assert claimed is not None
    before = datetime.now(UTC)
    failed = await queue.fail(job.id, "worker-a", "engine hiccup", retry_after=120)
    assert failed is not None
    assert failed.status is JobStatus.QUEUED
    (again,) = await dispatched(queue)
    assert again.task_kwargs == {"job_id": job.id}
    assert again.scheduled_at is not None
    assert (again.scheduled_at - before).total_seconds() == pytest.approx(120, abs=10)


async def test_a_permanent_failure_is_not_dispatched_again(
    queue: ProcrastinateJobQueue, database: tuple[str, SqlMetadataStore]
) -> None:
    job = await queue.enqueue(WS, await new_recording(database[1]), "transcribe")
    for pending in await dispatched(queue):
        await queue.app.job_manager.cancel_job_by_id_async(pending.id, delete_job=True)
    assert await queue.claim("worker-a", 30, job_ids=[job.id]) is not None
    failed = await queue.fail(job.id, "worker-a", "not audio", retry_after=1, retry=False)
    assert failed is not None
    assert failed.status is JobStatus.FAILED
    assert await dispatched(queue) == []
    assert await queue.requeue() == 0


async def test_the_requeue_sweep_dispatches_a_row_that_lost_its_dispatch(
    queue: ProcrastinateJobQueue, database: tuple[str, SqlMetadataStore]
) -> None:
    # A crash between the row's insert and its dispatch: the row alone.
    job = await queue.records.enqueue(WS, await new_recording(database[1]), "transcribe")
    assert await dispatched(queue) == []
    assert await queue.requeue() == 1
    assert [p.task_kwargs for p in await dispatched(queue)] == [{"job_id": job.id}]
    assert await queue.requeue() == 0


async def test_periodic_sweeps_run_once_per_cluster(
    database: tuple[str, SqlMetadataStore],
) -> None:
    url, metadata = database
    workers = [make_queue(metadata, url, sweep_every_s=2, lease_seconds=6) for _ in range(2)]
    ticks: list[tuple[int, int]] = []  # (worker, the tick's timestamp)

    async def runner(job_id: str) -> None:  # pragma: no cover - no job is queued here
        raise AssertionError(job_id)

    async def running_sweeps() -> list[int]:
        async with await _connect(url) as conn:
            rows = await (
                await conn.execute(
                    "SELECT (args->>'timestamp')::bigint FROM procrastinate_jobs "
                    "WHERE task_name = %s AND status = 'doing'",
                    (SWEEP_TASK,),
                )
            ).fetchall()
        return [row[0] for row in rows]

    for each in workers:
        await each.open()
    try:
        async with anyio.create_task_group() as group:
            for index, each in enumerate(workers):

                async def sweep(index: int = index) -> None:
                    (tick,) = await running_sweeps()  # this run's own job, and no other
                    ticks.append((index, tick))

                group.start_soon(partial(each.serve, runner, 1, sweeps=[sweep]))

            async def enough() -> bool:
                return len(ticks) >= 5

            await wait_until(enough, "five sweeps")
            group.cancel_scope.cancel()
    finally:
        for each in workers:
            await each.close()
    stamps = [tick for _, tick in ticks]
    # Both workers defer every tick; procrastinate lets one defer through, so one worker runs it.
    assert len(stamps) == len(set(stamps)), ticks
    assert all(tick % 2 == 0 for tick in stamps)


async def _connect(url: str) -> Any:
    import psycopg

    return await psycopg.AsyncConnection.connect(url, autocommit=True)

"""Conformance suite for the JobQueue port: a new adapter passes by adding a fixture param."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import anyio
import pytest

from tests.conformance.test_metadata_store import (
    OTHER_WS,
    add_workspace,
    concurrently,
    make_recording,
)
from tests.postgres import postgres_database
from voxvault.errors import Conflict, NotFound
from voxvault.jobs import Job, JobQueue, JobStatus
from voxvault.jobs.procrastinate import ProcrastinateJobQueue
from voxvault.jobs.sql import LOST_WORKER_ERROR, SqlJobQueue
from voxvault.metadata import DEFAULT_WORKSPACE as WS
from voxvault.metadata.sql import SqlMetadataStore

pytestmark = pytest.mark.anyio


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = datetime(2026, 6, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Harness:
    queue: JobQueue
    clock: Clock
    metadata: SqlMetadataStore
    recording_id: str

    async def new_recording(self, workspace: str = WS) -> str:
        """Another recording: a recording has at most one queued or running job at a time."""
        recording = make_recording()
        await self.metadata.insert_recording(workspace, recording)
        return recording.id


@pytest.fixture(params=["sqlite", "postgresql", "procrastinate"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    clock = Clock()
    with ExitStack() as cleanup:
        if request.param == "sqlite":
            metadata = SqlMetadataStore(f"sqlite:///{tmp_path / 'jobs.db'}")
            queue: JobQueue = SqlJobQueue(metadata.engine, clock=clock)
        else:
            url = cleanup.enter_context(postgres_database())
            metadata = SqlMetadataStore(url)
            queue = SqlJobQueue(metadata.engine, clock=clock)
            if request.param == "procrastinate":
                queue = ProcrastinateJobQueue(url, queue)
        try:
            await metadata.migrate()
            await queue.open()
            recording = make_recording()
            await metadata.insert_recording(WS, recording)
            yield Harness(queue, clock, metadata, recording.id)
        finally:
            await queue.close()
            await metadata.close()


async def test_enqueue_then_claim_runs_the_oldest_first(harness: Harness) -> None:
    q, clock = harness.queue, harness.clock
    first = await q.enqueue(WS, harness.recording_id, "transcribe", {"model": "tiny.en"})
    clock.advance(1)
    second = await q.enqueue(WS, await harness.new_recording(), "transcribe")
    assert (first.status, first.attempts, first.payload) == (
        JobStatus.QUEUED,
        0,
        {"model": "tiny.en"},
    )
    claimed = await q.claim("w1", lease_seconds=30)
    assert claimed is not None
    assert claimed.id == first.id
    assert (claimed.status, claimed.attempts) == (JobStatus.RUNNING, 1)
    assert claimed.started_at == clock.now
    assert claimed.lease_expires_at == clock.now + timedelta(seconds=30)
    again = await q.claim("w2", lease_seconds=30)
    assert again is not None
    assert again.id == second.id
    assert await q.claim("w3", lease_seconds=30) is None


async def test_concurrent_claims_never_share_a_job(harness: Harness) -> None:
    for _ in range(6):
        await harness.queue.enqueue(WS, await harness.new_recording(), "transcribe")
    claimed: list[str] = []

    async def worker(name: str) -> None:
        while (job := await harness.queue.claim(name, lease_seconds=30)) is not None:
            claimed.append(job.id)
            assert len(claimed) <= 6, f"claims never end: {claimed}"

    async with anyio.create_task_group() as group:
        for n in range(4):
            group.start_soon(worker, f"w{n}")
    assert len(claimed) == 6
    assert len(set(claimed)) == 6


async def test_heartbeat_extends_the_lease_and_records_progress(harness: Harness) -> None:
    q, clock = harness.queue, harness.clock
    job = await q.enqueue(WS, harness.recording_id, "transcribe")
    await q.claim("w1", lease_seconds=10)
    clock.advance(8)
    assert await q.heartbeat(job.id, "w1", lease_seconds=10, progress=0.4) is True
    clock.advance(8)  # past the first lease, within the renewed one
    assert await q.claim("w2", lease_seconds=10) is None
    current = await q.get(WS, job.id)
    assert current.progress == 0.4
    assert current.lease_expires_at == clock.now + timedelta(seconds=2)
    assert await q.heartbeat(job.id, "someone-else", lease_seconds=10) is False


async def test_an_expired_lease_is_claimed_again_and_the_old_worker_is_told(
    harness: Harness,
) -> None:
    q, clock = harness.queue, harness.clock
    job = await q.enqueue(WS, harness.recording_id, "transcribe")
    await q.claim("crashed", lease_seconds=5)
    clock.advance(6)
    retaken = await q.claim("w2", lease_seconds=5)
    assert retaken is not None
    assert (retaken.id, retaken.attempts) == (job.id, 2)
    assert await q.heartbeat(job.id, "crashed", lease_seconds=5) is False
    assert await q.complete(job.id, "crashed") is False
    assert await q.complete(job.id, "w2") is True
    done = await q.get(WS, job.id)
    assert (done.status, done.progress, done.finished_at) == (JobStatus.SUCCEEDED, 1.0, clock.now)


async def test_failures_retry_with_backoff_then_fail_with_the_error_kept(harness: Harness) -> None:
    q, clock = harness.queue, harness.clock
    job = await q.enqueue(WS, harness.recording_id, "transcribe", max_attempts=2)
    await q.claim("w1", lease_seconds=5)
    retried = await q.fail(job.id, "w1", "decoder crashed", retry_after=30)
    assert retried is not None
    assert (retried.status, retried.error, retried.finished_at) == (
        JobStatus.QUEUED,
        "decoder crashed",
        None,
    )
    assert await q.claim("w1", lease_seconds=5) is None  # not before the backoff
    clock.advance(31)
    second = await q.claim("w1", lease_seconds=5)
    assert second is not None
    assert second.attempts == 2
    final = await q.fail(job.id, "w1", "decoder crashed again", retry_after=30)
    assert final is not None
    assert (final.status, final.error, final.finished_at) == (
        JobStatus.FAILED,
        "decoder crashed again",
        clock.now,
    )
    clock.advance(3600)
    assert await q.claim("w1", lease_seconds=5) is None


async def test_a_worker_lost_on_the_last_attempt_fails_the_job(harness: Harness) -> None:
    q, clock = harness.queue, harness.clock
    job = await q.enqueue(WS, harness.recording_id, "transcribe", max_attempts=1)
    await q.claim("crashed", lease_seconds=5)
    clock.advance(6)
    assert await q.claim("w2", lease_seconds=5) is None
    failed = await q.get(WS, job.id)
    assert (failed.status, failed.error, failed.attempts) == (
        JobStatus.FAILED,
        LOST_WORKER_ERROR,
        1,
    )


async def test_cancel_stops_queued_and_running_jobs_but_not_finished_ones(
    harness: Harness,
) -> None:
    q = harness.queue
    running = await q.enqueue(WS, harness.recording_id, "transcribe")
    harness.clock.advance(1)
    queued = await q.enqueue(WS, await harness.new_recording(), "transcribe")
    claimed = await q.claim("w1", lease_seconds=30)  # takes `running`, the oldest
    assert claimed is not None
    assert claimed.id == running.id
    assert (await q.cancel(WS, running.id)).status == JobStatus.CANCELLED
    assert await q.heartbeat(running.id, "w1", lease_seconds=30) is False
    assert await q.complete(running.id, "w1") is False
    assert (await q.cancel(WS, queued.id)).status == JobStatus.CANCELLED
    assert await q.claim("w2", lease_seconds=30) is None
    done = await q.enqueue(WS, harness.recording_id, "transcribe")
    await q.claim("w3", lease_seconds=30)
    await q.complete(done.id, "w3")
    assert (await q.cancel(WS, done.id)).status == JobStatus.SUCCEEDED


async def test_jobs_are_scoped_to_their_workspace(harness: Harness) -> None:
    job = await harness.queue.enqueue(WS, harness.recording_id, "transcribe")
    with pytest.raises(NotFound):
        await harness.queue.get("elsewhere", job.id)
    with pytest.raises(NotFound):
        await harness.queue.cancel("elsewhere", job.id)
    with pytest.raises(NotFound):
        await harness.queue.get(WS, "0" * 32)


async def test_deleting_the_recording_removes_its_jobs(harness: Harness) -> None:
    q = harness.queue
    job = await q.enqueue(WS, harness.recording_id, "transcribe")
    await q.claim("w1", lease_seconds=30)
    assert await harness.metadata.purge_recording(WS, harness.recording_id) is True
    assert await q.heartbeat(job.id, "w1", lease_seconds=30) is False  # the worker stops
    with pytest.raises(NotFound):
        await q.get(WS, job.id)


# ---- one live job per recording -----------------------------------------------------------------


async def test_a_second_live_job_on_a_recording_is_a_conflict(harness: Harness) -> None:
    q = harness.queue
    queued = await q.enqueue(WS, harness.recording_id, "transcribe")
    with pytest.raises(Conflict):
        await q.enqueue(WS, harness.recording_id, "transcribe")
    await q.claim("w1", lease_seconds=30)
    with pytest.raises(Conflict):  # running blocks too
        await q.enqueue(WS, harness.recording_id, "summarize")
    retried = await q.fail(queued.id, "w1", "flaky", retry_after=60)
    assert retried is not None
    assert retried.status == JobStatus.QUEUED
    with pytest.raises(Conflict):  # queued again for a retry: still live
        await q.enqueue(WS, harness.recording_id, "transcribe")
    assert [j.id for j in await q.list_for_recording(WS, harness.recording_id)] == [queued.id]
    other = await q.enqueue(WS, await harness.new_recording(), "transcribe")
    assert other.status == JobStatus.QUEUED


async def test_concurrent_enqueues_on_one_recording_make_one_job(harness: Harness) -> None:
    for _ in range(3):
        recording_id = await harness.new_recording()
        outcomes = await concurrently(
            [partial(harness.queue.enqueue, WS, recording_id, "transcribe") for _ in range(5)]
        )
        made = [o for o in outcomes if isinstance(o, Job)]
        assert len(made) == 1, outcomes
        assert all(isinstance(o, Conflict) for o in outcomes if o is not made[0]), outcomes
        listed = await harness.queue.list_for_recording(WS, recording_id)
        assert [j.id for j in listed] == [made[0].id]


async def test_enqueue_for_an_unknown_recording_is_not_found(harness: Harness) -> None:
    with pytest.raises(NotFound):
        await harness.queue.enqueue(WS, "0" * 32, "transcribe")
    assert await harness.queue.claim("w1", lease_seconds=30) is None


@pytest.mark.parametrize("ending", ["complete", "fail", "cancel"])
async def test_a_finished_job_does_not_block_a_new_one(harness: Harness, ending: str) -> None:
    q, clock = harness.queue, harness.clock
    old = await q.enqueue(WS, harness.recording_id, "transcribe")
    await q.claim("w1", lease_seconds=30)
    if ending == "complete":
        assert await q.complete(old.id, "w1") is True
    elif ending == "fail":
        assert await q.fail(old.id, "w1", "broken", retry_after=0, retry=False) is not None
    else:
        await q.cancel(WS, old.id)
    assert (await q.get(WS, old.id)).status in {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.CANCELLED,
    }
    clock.advance(1)
    new = await q.enqueue(WS, harness.recording_id, "transcribe")
    assert (new.status, new.attempts) == (JobStatus.QUEUED, 0)
    with pytest.raises(Conflict):
        await q.enqueue(WS, harness.recording_id, "transcribe")
    claimed = await q.claim("w2", lease_seconds=30)
    assert claimed is not None
    assert claimed.id == new.id


# ---- claiming only some jobs, stages, failing for good ------------------------------------------


async def test_claim_with_job_ids_takes_only_those(harness: Harness) -> None:
    q, clock = harness.queue, harness.clock
    oldest = await q.enqueue(WS, harness.recording_id, "transcribe")
    clock.advance(1)
    mine = await q.enqueue(WS, await harness.new_recording(), "transcribe")
    clock.advance(1)
    also_mine = await q.enqueue(WS, await harness.new_recording(), "transcribe")
    assert await q.claim("cli", lease_seconds=30, job_ids=[]) is None
    assert await q.claim("cli", lease_seconds=30, job_ids=["0" * 32]) is None
    wanted = {also_mine.id, mine.id}
    first = await q.claim("cli", lease_seconds=30, job_ids=wanted)
    second = await q.claim("cli", lease_seconds=30, job_ids=wanted)
    assert first is not None
    assert second is not None
    assert [first.id, second.id] == [mine.id, also_mine.id]  # oldest first among those
    assert await q.claim("cli", lease_seconds=30, job_ids=wanted) is None
    assert (await q.get(WS, oldest.id)).status == JobStatus.QUEUED  # never taken
    other = await q.claim("server", lease_seconds=30)
    assert other is not None
    assert other.id == oldest.id


async def test_heartbeat_records_the_stage_and_complete_clears_it(harness: Harness) -> None:
    q = harness.queue
    job = await q.enqueue(WS, harness.recording_id, "transcribe")
    assert job.stage is None
    claimed = await q.claim("w1", lease_seconds=30)
    assert claimed is not None
    assert claimed.stage is None
    assert await q.heartbeat(job.id, "w1", lease_seconds=30, progress=0.1, stage="decode")
    current = await q.get(WS, job.id)
    assert (current.stage, current.progress) == ("decode", 0.1)
    assert await q.heartbeat(job.id, "w1", lease_seconds=30, progress=0.3)
    current = await q.get(WS, job.id)
    assert (current.stage, current.progress) == ("decode", 0.3)  # no stage given: kept
    assert await q.heartbeat(job.id, "w1", lease_seconds=30, stage="transcribe")
    assert (await q.get(WS, job.id)).stage == "transcribe"
    assert await q.heartbeat(job.id, "intruder", lease_seconds=30, stage="hijacked") is False
    assert (await q.get(WS, job.id)).stage == "transcribe"
    assert await q.complete(job.id, "w1") is True
    done = await q.get(WS, job.id)
    assert (done.status, done.stage, done.progress) == (JobStatus.SUCCEEDED, None, 1.0)


async def test_fail_without_retry_fails_for_good_at_once(harness: Harness) -> None:
    q, clock = harness.queue, harness.clock
    job = await q.enqueue(WS, harness.recording_id, "transcribe", max_attempts=5)
    await q.claim("w1", lease_seconds=30)
    failed = await q.fail(job.id, "w1", "not audio", retry_after=0, retry=False)
    assert failed is not None
    assert (failed.status, failed.error, failed.attempts, failed.finished_at) == (
        JobStatus.FAILED,
        "not audio",
        1,
        clock.now,
    )
    assert failed.lease_expires_at is None
    clock.advance(3600)
    assert await q.claim("w1", lease_seconds=30) is None
    assert (await q.get(WS, job.id)).status == JobStatus.FAILED
    assert await q.fail(job.id, "w1", "again", retry_after=0, retry=False) is None  # not held


# ---- a recording's jobs -------------------------------------------------------------------------


async def test_latest_and_list_are_newest_first(harness: Harness) -> None:
    q, clock = harness.queue, harness.clock
    assert await q.latest(WS, harness.recording_id) is None
    assert await q.list_for_recording(WS, harness.recording_id) == []
    made: list[str] = []
    for n in range(3):
        job = await q.enqueue(WS, harness.recording_id, "transcribe", {"run": n})
        made.append(job.id)
        await q.claim("w1", lease_seconds=30)
        await q.complete(job.id, "w1")
        clock.advance(1)
    live = await q.enqueue(WS, harness.recording_id, "transcribe", {"run": 3})
    made.append(live.id)
    other = await q.enqueue(WS, await harness.new_recording(), "transcribe")
    latest = await q.latest(WS, harness.recording_id)
    assert latest is not None
    assert (latest.id, latest.status, latest.payload) == (live.id, JobStatus.QUEUED, {"run": 3})
    listed = await q.list_for_recording(WS, harness.recording_id)
    assert [j.id for j in listed] == made[::-1]
    assert [j.status for j in listed] == [JobStatus.QUEUED] + [JobStatus.SUCCEEDED] * 3
    assert all(j.workspace == WS and j.recording_id == harness.recording_id for j in listed)
    assert other.id not in {j.id for j in listed}


async def test_latest_and_list_are_scoped_to_the_workspace(harness: Harness) -> None:
    q = harness.queue
    await add_workspace(harness.metadata, OTHER_WS)
    theirs = await harness.new_recording(OTHER_WS)
    their_job = await q.enqueue(OTHER_WS, theirs, "transcribe")
    my_job = await q.enqueue(WS, harness.recording_id, "transcribe")
    assert their_job.workspace == OTHER_WS
    assert my_job.workspace == WS
    assert await q.latest(WS, theirs) is None
    assert await q.list_for_recording(WS, theirs) == []
    assert await q.latest(OTHER_WS, harness.recording_id) is None
    assert await q.list_for_recording(OTHER_WS, harness.recording_id) == []
    mine = await q.latest(WS, harness.recording_id)
    assert mine is not None
    assert mine.id == my_job.id
    assert [j.id for j in await q.list_for_recording(OTHER_WS, theirs)] == [their_job.id]
    with pytest.raises(NotFound):
        await q.get(WS, their_job.id)


# ---- leases of workers known dead ---------------------------------------------------------------


async def test_lease_owners_are_the_workers_running_jobs(harness: Harness) -> None:
    q = harness.queue
    assert await q.lease_owners() == set()
    jobs = [await q.enqueue(WS, harness.recording_id, "transcribe")]
    for _ in range(3):
        jobs.append(await q.enqueue(WS, await harness.new_recording(), "transcribe"))
        harness.clock.advance(1)
    assert await q.lease_owners() == set()  # queued jobs have no owner
    claims = [await q.claim(w, lease_seconds=30) for w in ("w1", "w1", "w2")]
    assert [c.id for c in claims if c is not None] == [j.id for j in jobs[:3]]
    assert await q.lease_owners() == {"w1", "w2"}
    assert await q.complete(jobs[0].id, "w1") is True
    assert await q.lease_owners() == {"w1", "w2"}  # w1 still runs its second job
    assert await q.fail(jobs[1].id, "w1", "flaky", retry_after=60) is not None
    assert await q.lease_owners() == {"w2"}
    await q.cancel(WS, jobs[2].id)
    assert await q.lease_owners() == set()


async def test_expired_leases_are_claimed_by_another_worker_at_once(harness: Harness) -> None:
    q, clock = harness.queue, harness.clock
    orphan = await q.enqueue(WS, harness.recording_id, "transcribe", max_attempts=3)
    clock.advance(1)
    healthy = await q.enqueue(WS, await harness.new_recording(), "transcribe")
    await q.claim("dead", lease_seconds=600)
    await q.claim("alive", lease_seconds=600)
    assert await q.heartbeat(orphan.id, "dead", lease_seconds=600, progress=0.5, stage="decode")
    assert await q.claim("w2", lease_seconds=30) is None  # both leases still run
    assert await q.expire_leases([]) == 0
    assert await q.expire_leases(["nobody"]) == 0
    assert await q.expire_leases(["dead"]) == 1
    retaken = await q.claim("w2", lease_seconds=30)  # no clock advance: at once
    assert retaken is not None
    assert (retaken.id, retaken.status, retaken.attempts) == (orphan.id, JobStatus.RUNNING, 2)
    assert retaken.lease_expires_at == clock.now + timedelta(seconds=30)
    assert await q.lease_owners() == {"w2", "alive"}
    assert await q.heartbeat(orphan.id, "dead", lease_seconds=600) is False
    assert await q.complete(orphan.id, "dead") is False
    assert await q.claim("w3", lease_seconds=30) is None  # the healthy lease was left alone
    assert await q.heartbeat(healthy.id, "alive", lease_seconds=600) is True
    assert (await q.get(WS, healthy.id)).attempts == 1
    assert await q.complete(orphan.id, "w2") is True


async def test_an_expired_lease_on_the_last_attempt_fails_the_job(harness: Harness) -> None:
    q = harness.queue
    job = await q.enqueue(WS, harness.recording_id, "transcribe", max_attempts=1)
    await q.claim("dead", lease_seconds=600)
    assert await q.expire_leases({"dead"}) == 1
    assert await q.claim("w2", lease_seconds=30) is None
    failed = await q.get(WS, job.id)
    assert (failed.status, failed.error, failed.attempts) == (
        JobStatus.FAILED,
        LOST_WORKER_ERROR,
        1,
    )
    assert await q.lease_owners() == set()
    again = await q.enqueue(WS, harness.recording_id, "transcribe")  # a finished job: allowed
    assert again.status == JobStatus.QUEUED

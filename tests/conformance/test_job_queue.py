"""Conformance suite for the JobQueue port: a new adapter passes by adding a fixture param."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from tests.conformance.test_metadata_store import make_recording
from voxvault.errors import NotFound
from voxvault.jobs import JobQueue, JobStatus
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


@pytest.fixture(params=["sqlite"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    clock = Clock()
    if request.param == "sqlite":
        metadata = SqlMetadataStore(f"sqlite:///{tmp_path / 'jobs.db'}")
        await metadata.migrate()
        queue: JobQueue = SqlJobQueue(metadata.engine, clock=clock)
    recording = make_recording()
    await metadata.insert_recording(WS, recording)
    yield Harness(queue, clock, metadata, recording.id)
    await metadata.close()


async def test_enqueue_then_claim_runs_the_oldest_first(harness: Harness) -> None:
    q, clock = harness.queue, harness.clock
    first = await q.enqueue(WS, harness.recording_id, "transcribe", {"model": "tiny.en"})
    clock.advance(1)
    second = await q.enqueue(WS, harness.recording_id, "transcribe")
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
        await harness.queue.enqueue(WS, harness.recording_id, "transcribe")
    claimed: list[str] = []

    async def worker(name: str) -> None:
        while (job := await harness.queue.claim(name, lease_seconds=30)) is not None:
            claimed.append(job.id)

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
    queued = await q.enqueue(WS, harness.recording_id, "transcribe")
    running = await q.enqueue(WS, harness.recording_id, "transcribe")
    await q.claim("w1", lease_seconds=30)  # takes `queued`, the oldest
    assert (await q.cancel(WS, queued.id)).status == JobStatus.CANCELLED
    assert await q.heartbeat(queued.id, "w1", lease_seconds=30) is False
    assert (await q.cancel(WS, running.id)).status == JobStatus.CANCELLED
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

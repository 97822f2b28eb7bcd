"""Workers keep going when a backend fails under them; dead workers' jobs come back at once."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Collection
from typing import Any

import anyio
import pytest

from tests.media import wav_bytes
from voxvault import RecordingStatus, Vault
from voxvault.errors import BackendUnavailable
from voxvault.jobs import Job, JobQueue
from voxvault.pipeline import worker as workers
from voxvault.pipeline.worker import Worker, reclaim_dead_workers

pytestmark = pytest.mark.anyio


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


class FailingClaims:
    """The real queue, whose first ``failures`` claims fail as a lost database would."""

    def __init__(self, inner: JobQueue, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    async def claim(
        self, worker: str, lease_seconds: float, *, job_ids: Collection[str] | None = None
    ) -> Job | None:
        if self.failures > 0:
            self.failures -= 1
            raise BackendUnavailable("the database is unreachable")
        return await self.inner.claim(worker, lease_seconds, job_ids=job_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_worker_survives_a_failing_backend_and_goes_on(
    vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers, "IDLE_POLL_SECONDS", 0.05)
    vault.jobs = FailingClaims(vault.jobs, failures=3)  # type: ignore[assignment]
    recording = await vault.create_recording(chunks(wav_bytes(1.0)), filename="a.wav")
    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            group.start_soon(Worker(vault).run)
            while (await vault.get_recording(recording.id)).status is not RecordingStatus.READY:
                await anyio.sleep(0.05)
            group.cancel_scope.cancel()
    assert vault.jobs.failures == 0  # type: ignore[attr-defined]


async def test_jobs_of_a_dead_worker_on_this_host_are_reclaimed_at_once(vault: Vault) -> None:
    recording = await vault.create_recording(chunks(wav_bytes(1.0)), filename="a.wav")
    # A process that has exited: its pid is free, so its lease owner is known dead.
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    dead = f"{socket.gethostname()}/{pid}/feedbeef/0"
    alive = f"{socket.gethostname()}/{os.getpid()}/{workers._PROCESS_TOKEN}/9"
    elsewhere = f"another-host/{pid}/feedbeef/0"
    claimed = await vault.jobs.claim(dead, lease_seconds=3600)
    assert claimed is not None
    assert await vault.jobs.claim("nobody", lease_seconds=3600) is None  # the lease holds
    for owner in (alive, elsewhere):
        assert not workers._owner_is_dead(owner)
    assert workers._owner_is_dead(dead)
    assert workers._owner_is_dead(f"{socket.gethostname()}/{os.getpid()}/earlier0/0")

    assert await reclaim_dead_workers(vault) == 1
    job = await Worker(vault).run_one()
    assert job is not None
    assert (job.id, job.attempts) == (claimed.id, 2)
    assert (await vault.get_recording(recording.id)).status is RecordingStatus.READY

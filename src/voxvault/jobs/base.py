"""The JobQueue port: durable work items with leases.

A worker claims a job and holds it by a lease it renews (heartbeat). A job whose lease expires
— its worker crashed or hung — is claimed again by another worker, so no job is lost; each
claim counts an attempt, and a job that fails ``max_attempts`` times ends ``failed`` with its
error kept. The work itself must be idempotent (handbook §2), since a job can run twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class Job(BaseModel):
    id: str
    workspace: str
    recording_id: str
    kind: str
    status: JobStatus
    attempts: int
    max_attempts: int
    progress: float
    stage: str | None = None
    error: str | None
    payload: dict[str, Any]
    lease_expires_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


JobRunner = Callable[[str], Awaitable[object]]
"""Runs the job with this id to its end (claiming it first), in a worker process."""


class JobQueue(ABC):
    pushes = False
    """Whether the queue hands jobs to ``serve``; else workers poll ``claim`` (embedded)."""

    @abstractmethod
    async def open(self, *, migrate: bool = True) -> None:
        """Connect, and with ``migrate`` install what the queue needs in its database."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""

    async def serve(
        self,
        runner: JobRunner,
        concurrency: int,
        *,
        sweeps: Sequence[Callable[[], Awaitable[object]]] = (),
    ) -> None:
        """Run jobs handed to this process, ``concurrency`` at a time, until cancelled, and run
        ``sweeps`` periodically, once per cluster. Only a queue that ``pushes`` has it."""
        raise NotImplementedError(f"{type(self).__name__} does not hand out jobs; poll claim()")

    @abstractmethod
    async def enqueue(
        self,
        workspace: str,
        recording_id: str,
        kind: str,
        payload: dict[str, Any] | None = None,
        *,
        max_attempts: int = 3,
    ) -> Job:
        """Queue a job; ``Conflict`` while the recording has a queued or running job."""

    @abstractmethod
    async def claim(
        self, worker: str, lease_seconds: float, *, job_ids: Collection[str] | None = None
    ) -> Job | None:
        """Take the oldest runnable job (queued and due, or running with an expired lease).

        With ``job_ids``, only one of those: a CLI that ingests files runs its own jobs only.
        """

    @abstractmethod
    async def heartbeat(
        self,
        job_id: str,
        worker: str,
        lease_seconds: float,
        progress: float | None = None,
        stage: str | None = None,
    ) -> bool:
        """Extend the lease (and record progress); False when this worker no longer holds the
        job: it was cancelled, its recording deleted, or another worker claimed it after the
        lease expired (stop working). A late heartbeat before any reclaim keeps the job."""

    @abstractmethod
    async def complete(self, job_id: str, worker: str) -> bool:
        """Mark the job succeeded; False when the lease was lost or the job cancelled."""

    @abstractmethod
    async def fail(
        self, job_id: str, worker: str, error: str, *, retry_after: float, retry: bool = True
    ) -> Job | None:
        """Record a failed attempt: queued again after ``retry_after`` s, or failed for good
        when attempts are used up or ``retry`` is False (an error no retry can fix)."""

    @abstractmethod
    async def cancel(self, workspace: str, job_id: str) -> Job:
        """Cancel a job that has not finished; a finished job is returned unchanged."""

    @abstractmethod
    async def get(self, workspace: str, job_id: str) -> Job: ...

    @abstractmethod
    async def latest(self, workspace: str, recording_id: str) -> Job | None:
        """The recording's newest job, if it has any."""

    @abstractmethod
    async def list_for_recording(self, workspace: str, recording_id: str) -> list[Job]:
        """The recording's jobs, newest first."""

    @abstractmethod
    async def live_job_ids(self) -> set[str]:
        """The ids of every queued or running job, in every workspace."""

    @abstractmethod
    async def lease_owners(self) -> set[str]:
        """The workers that hold a lease now."""

    @abstractmethod
    async def expire_leases(self, owners: Collection[str]) -> int:
        """End the leases these workers hold (they are known dead), so others claim at once."""

"""The JobQueue port: durable work items with leases.

A worker claims a job and holds it by a lease it renews (heartbeat). A job whose lease expires
— its worker crashed or hung — is claimed again by another worker, so no job is lost; each
claim counts an attempt, and a job that fails ``max_attempts`` times ends ``failed`` with its
error kept. The work itself must be idempotent (handbook §2), since a job can run twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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
    recording_id: str
    kind: str
    status: JobStatus
    attempts: int
    max_attempts: int
    progress: float
    error: str | None
    payload: dict[str, Any]
    lease_expires_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobQueue(ABC):
    @abstractmethod
    async def enqueue(
        self,
        workspace: str,
        recording_id: str,
        kind: str,
        payload: dict[str, Any] | None = None,
        *,
        max_attempts: int = 3,
    ) -> Job: ...

    @abstractmethod
    async def claim(self, worker: str, lease_seconds: float) -> Job | None:
        """Take the oldest runnable job (queued and due, or running with an expired lease)."""

    @abstractmethod
    async def heartbeat(
        self, job_id: str, worker: str, lease_seconds: float, progress: float | None = None
    ) -> bool:
        """Extend the lease; False when this worker no longer holds the job (stop working)."""

    @abstractmethod
    async def complete(self, job_id: str, worker: str) -> bool:
        """Mark the job succeeded; False when the lease was lost or the job cancelled."""

    @abstractmethod
    async def fail(self, job_id: str, worker: str, error: str, *, retry_after: float) -> Job | None:
        """Record a failed attempt: queued again after ``retry_after`` s, or failed for good."""

    @abstractmethod
    async def cancel(self, workspace: str, job_id: str) -> Job:
        """Cancel a job that has not finished; a finished job is returned unchanged."""

    @abstractmethod
    async def get(self, workspace: str, job_id: str) -> Job: ...

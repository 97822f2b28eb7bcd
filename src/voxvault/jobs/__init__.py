"""Durable jobs behind the JobQueue port, chosen by ``VOXVAULT_QUEUE_URL``."""

from __future__ import annotations

from voxvault.errors import ConfigurationError
from voxvault.jobs.base import FINISHED, Job, JobQueue, JobStatus
from voxvault.metadata import MetadataStore

__all__ = ["FINISHED", "Job", "JobQueue", "JobStatus", "open_job_queue"]


def open_job_queue(url: str, metadata: MetadataStore) -> JobQueue:
    """``embedded``: jobs are rows in the metadata database, next to the recordings."""
    from voxvault.jobs.sql import SqlJobQueue
    from voxvault.metadata.sql import SqlMetadataStore

    if url != "embedded":
        raise ConfigurationError(f"unsupported queue URL {url!r}; use 'embedded'")
    if not isinstance(metadata, SqlMetadataStore):  # pragma: no cover - the only store today
        raise ConfigurationError("the embedded queue needs an SQL metadata database")
    return SqlJobQueue(metadata.engine)

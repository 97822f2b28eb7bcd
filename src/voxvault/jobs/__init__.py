"""Durable jobs behind the JobQueue port, chosen by ``VOXVAULT_QUEUE_URL``."""

from __future__ import annotations

from voxvault.errors import ConfigurationError
from voxvault.jobs.base import FINISHED, Job, JobQueue, JobRunner, JobStatus
from voxvault.metadata import MetadataStore

__all__ = ["FINISHED", "Job", "JobQueue", "JobRunner", "JobStatus", "open_job_queue"]


def open_job_queue(
    url: str,
    metadata: MetadataStore,
    *,
    lease_seconds: float = 30.0,
    sweep_every_s: int | None = None,
) -> JobQueue:
    """``embedded``: jobs are rows in the metadata database, next to the recordings, and
    workers poll for them. ``postgresql://…``: the same rows, dispatched to workers on any
    machine by procrastinate on that database (the ``postgres`` extra), which runs the
    product's sweeps once per cluster every ``sweep_every_s`` (its default when ``None``)."""
    from voxvault.jobs.sql import SqlJobQueue
    from voxvault.metadata.sql import SqlMetadataStore

    if not isinstance(metadata, SqlMetadataStore):  # pragma: no cover - the only store today
        raise ConfigurationError("the job queue keeps its jobs in an SQL metadata database")
    records = SqlJobQueue(metadata.engine)
    if url == "embedded":
        return records
    if url.split("://", 1)[0].split("+", 1)[0] in ("postgresql", "postgres"):
        try:
            from voxvault.jobs.procrastinate import ProcrastinateJobQueue
        except ImportError as exc:
            raise ConfigurationError(
                f"the procrastinate job queue needs an extra: pip install 'voxvault[postgres]' "
                f"({exc})"
            ) from exc
        if sweep_every_s is None:
            return ProcrastinateJobQueue(url, records, lease_seconds=lease_seconds)
        return ProcrastinateJobQueue(
            url, records, lease_seconds=lease_seconds, sweep_every_s=sweep_every_s
        )
    raise ConfigurationError(
        f"unsupported queue URL {url!r}; use 'embedded' or a postgresql:// URL"
    )

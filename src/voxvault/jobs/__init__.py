"""Durable jobs behind the JobQueue port."""

from voxvault.jobs.base import FINISHED, Job, JobQueue, JobStatus

__all__ = ["FINISHED", "Job", "JobQueue", "JobStatus"]

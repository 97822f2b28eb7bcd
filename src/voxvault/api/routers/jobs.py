"""Pipeline runs: start one for a recording, follow it (JSON or Server-Sent Events), cancel it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Body, Header
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

from voxvault.api.deps import VaultDep
from voxvault.jobs import Job
from voxvault.models import TranscribeRequest

router = APIRouter(tags=["jobs"])

SSE_PING_SECONDS = 15
MAX_EVENT_ID = 64


class JobList(BaseModel):
    items: list[Job]


@router.post("/v1/recordings/{recording_id}/transcribe", status_code=202)
async def transcribe(
    recording_id: str,
    vault: VaultDep,
    options: Annotated[TranscribeRequest | None, Body()] = None,
) -> Job:
    """Run the pipeline again into a new transcript version (earlier versions are kept).

    409 while a run of this recording is already queued or running.
    """
    return await vault.transcribe(recording_id, options)


@router.get("/v1/recordings/{recording_id}/jobs")
async def list_jobs(recording_id: str, vault: VaultDep) -> JobList:
    """The recording's pipeline runs, newest first."""
    return JobList(items=await vault.list_jobs(recording_id))


@router.get("/v1/recordings/{recording_id}/events", response_class=EventSourceResponse)
async def recording_events(
    recording_id: str,
    vault: VaultDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    """Progress as Server-Sent Events: the current state at once, then each change, as JSON
    ``{type, status, stage, progress, job_id, error?}``; the stream ends once the recording is
    ``ready``, ``failed`` or ``stored``. Reconnects resume after ``Last-Event-ID``."""
    await vault.get_recording(recording_id)  # a clean 404 before the stream starts
    if last_event_id is not None and (
        len(last_event_id) > MAX_EVENT_ID or not last_event_id.isprintable()
    ):
        last_event_id = None  # not one we issued: start from the current state

    async def stream() -> AsyncIterator[ServerSentEvent]:
        async for event_id, event in vault.watch(recording_id, last_event_id=last_event_id):
            yield ServerSentEvent(data=event.model_dump_json(exclude_none=True), id=event_id)

    return EventSourceResponse(stream(), ping=SSE_PING_SECONDS)


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, vault: VaultDep) -> Job:
    return await vault.get_job(job_id)


@router.post("/v1/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, vault: VaultDep) -> Job:
    """Cancel a queued or running job; a finished job is returned unchanged."""
    return await vault.cancel_job(job_id)

"""/v1/recordings/{id}/transcript: versions, submission from elsewhere, exports."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from voxvault.api.deps import VaultDep
from voxvault.exports import ExportFormat
from voxvault.models import Transcript, TranscriptInput, TranscriptVersionList
from voxvault.names import content_disposition

router = APIRouter(prefix="/v1/recordings/{recording_id}", tags=["transcripts"])

Version = Annotated[
    int | None, Query(ge=1, le=2**31 - 1, description="a version; the newest when omitted")
]


@router.put("/transcript", status_code=201)
async def put_transcript(
    recording_id: str, transcript: TranscriptInput, vault: VaultDep
) -> Transcript:
    """Store a transcript made elsewhere as the next version; earlier versions are kept."""
    return await vault.put_transcript(recording_id, transcript)


@router.get("/transcript")
async def get_transcript(recording_id: str, vault: VaultDep, version: Version = None) -> Transcript:
    return await vault.get_transcript(recording_id, version)


@router.get("/transcript/versions")
async def list_transcript_versions(recording_id: str, vault: VaultDep) -> TranscriptVersionList:
    return TranscriptVersionList(items=await vault.list_transcript_versions(recording_id))


@router.get("/transcript.{fmt}", response_class=Response)
async def export_transcript(
    recording_id: str,
    fmt: ExportFormat,
    vault: VaultDep,
    version: Version = None,
    download: bool = False,
) -> Response:
    """The transcript as JSON, SRT, WebVTT, plain text or Markdown."""
    text, media_type, filename = await vault.export_transcript(recording_id, fmt, version)
    disposition = content_disposition(filename, f"transcript.{fmt.value}", inline=not download)
    return Response(text, media_type=media_type, headers={"Content-Disposition": disposition})

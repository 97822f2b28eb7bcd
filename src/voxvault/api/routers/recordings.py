"""/v1/recordings: upload, list, read, change, delete, and the original audio."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from voxvault.api.bodies import MultipartUpload, declared_length
from voxvault.api.deps import VaultDep
from voxvault.api.ranges import serve_download
from voxvault.errors import InvalidRequest, PayloadTooLarge
from voxvault.models import (
    PlaybackLink,
    Recording,
    RecordingPage,
    RecordingPatch,
    RecordingQuery,
    RecordingStatus,
)
from voxvault.settings import MAX_PLAYBACK_URL_TTL

router = APIRouter(prefix="/v1/recordings", tags=["recordings"])

MULTIPART_OVERHEAD_BYTES = 4 * 1024 * 1024

_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "Either the raw audio or video bytes (any audio/* or video/* Content-Type), or "
            "multipart/form-data with a `file` part; text fields `title`, `tags` "
            "(comma-separated) and `metadata` (JSON object) must come before the file part."
        ),
        "content": {
            "audio/*": {"schema": {"type": "string", "format": "binary"}},
            "video/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "title": {"type": "string"},
                        "tags": {"type": "string"},
                        "metadata": {"type": "string"},
                        "file": {"type": "string", "format": "binary"},
                    },
                }
            },
        },
    }
}


def _json_object(value: Any, field: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InvalidRequest(f"{field} is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{field} must be a JSON object")
    return value


def _flag(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise InvalidRequest("transcribe must be true or false")


@router.post("", status_code=201, openapi_extra=_UPLOAD_DOC)
async def upload_recording(
    request: Request,
    vault: VaultDep,
    filename: Annotated[str | None, Query(description="the file's name, kept as a label")] = None,
    title: str | None = None,
    tag: Annotated[list[str] | None, Query(description="repeat for several tags")] = None,
    metadata: Annotated[str | None, Query(description="a JSON object")] = None,
    transcribe: Annotated[
        bool, Query(description="run the transcription pipeline (false: store only)")
    ] = True,
) -> Recording:
    """Store a recording; it is listed only once its bytes are durable and verified as audio.

    By default the pipeline is queued at once (status ``queued``); follow it on ``…/events``.
    """
    size = declared_length(request)
    tags = list(tag or [])
    meta = _json_object(metadata, "metadata")
    content_type = request.headers.get("content-type")
    if content_type and content_type.lower().startswith("multipart/"):
        limit = vault.settings.max_upload_bytes
        if size is not None and size > limit + MULTIPART_OVERHEAD_BYTES:
            raise PayloadTooLarge(
                f"the upload exceeds the limit of {limit} bytes", detail={"max_bytes": limit}
            )
        form = MultipartUpload(request)
        await form.start()
        if "tags" in form.fields:
            tags += [t.strip() for t in form.fields["tags"].split(",") if t.strip()]
        return await vault.create_recording(
            form.file_chunks(),
            filename=form.filename or filename,
            content_type=form.content_type,
            title=form.fields.get("title", title),
            tags=tags,
            metadata=_json_object(form.fields.get("metadata"), "metadata") or meta,
            transcribe=_flag(form.fields.get("transcribe"), transcribe),
        )
    return await vault.create_recording(
        request.stream(),
        filename=filename,
        content_type=content_type,
        title=title,
        tags=tags,
        metadata=meta,
        declared_size=size,
        transcribe=transcribe,
    )


@router.get("")
async def list_recordings(
    vault: VaultDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
    status: RecordingStatus | None = None,
    tag: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> RecordingPage:
    """Newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    query = RecordingQuery(
        limit=limit,
        cursor=cursor,
        status=status,
        tag=tag,
        created_after=created_after,
        created_before=created_before,
    )
    return await vault.list_recordings(query)


@router.get("/{recording_id}")
async def get_recording(recording_id: str, vault: VaultDep) -> Recording:
    return await vault.get_recording(recording_id)


@router.patch("/{recording_id}")
async def update_recording(recording_id: str, patch: RecordingPatch, vault: VaultDep) -> Recording:
    """Change ``title``, ``tags`` (replaced whole) or ``metadata`` (replaced whole)."""
    return await vault.update_recording(recording_id, patch)


@router.delete("/{recording_id}", status_code=204)
async def delete_recording(recording_id: str, vault: VaultDep) -> Response:
    """Delete the recording with every byte, transcript and artifact of it."""
    await vault.delete_recording(recording_id)
    return Response(status_code=204)


@router.get("/{recording_id}/audio", response_model=None)
@router.head("/{recording_id}/audio", response_model=None, include_in_schema=False)
async def get_audio(recording_id: str, request: Request, vault: VaultDep) -> Response:
    """The original bytes, untouched; supports ``Range`` (206), ``If-None-Match`` and HEAD."""
    return serve_download(request, await vault.open_audio(recording_id))


@router.get("/{recording_id}/playback")
async def get_playback_link(
    recording_id: str,
    request: Request,
    vault: VaultDep,
    ttl: Annotated[int | None, Query(ge=1, le=MAX_PLAYBACK_URL_TTL)] = None,
) -> PlaybackLink:
    """A signed URL that plays the recording (with ranges) without credentials until expiry."""
    return await vault.playback_link(recording_id, base_url=str(request.base_url), ttl=ttl)

"""/v1/recordings/{id}/artifacts: named files derived from a recording, any bytes."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from voxvault.api.bodies import declared_length
from voxvault.api.deps import VaultDep
from voxvault.api.ranges import serve_download
from voxvault.models import Artifact, ArtifactList

router = APIRouter(prefix="/v1/recordings/{recording_id}/artifacts", tags=["artifacts"])


@router.get("")
async def list_artifacts(recording_id: str, vault: VaultDep) -> ArtifactList:
    return ArtifactList(items=await vault.list_artifacts(recording_id))


@router.put(
    "/{name:path}",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def put_artifact(recording_id: str, name: str, request: Request, vault: VaultDep) -> Artifact:
    """Store or replace the artifact: the body's bytes, with its Content-Type kept."""
    return await vault.put_artifact(
        recording_id,
        name,
        request.stream(),
        content_type=request.headers.get("content-type"),
        declared_size=declared_length(request),
    )


@router.get("/{name:path}", response_model=None)
@router.head("/{name:path}", response_model=None, include_in_schema=False)
async def get_artifact(recording_id: str, name: str, request: Request, vault: VaultDep) -> Response:
    return serve_download(request, await vault.open_artifact(recording_id, name))


@router.delete("/{name:path}", status_code=204)
async def delete_artifact(recording_id: str, name: str, vault: VaultDep) -> Response:
    await vault.delete_artifact(recording_id, name)
    return Response(status_code=204)

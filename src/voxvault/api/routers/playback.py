"""/v1/playback/{id}: the target of signed playback URLs, served by the range handler."""

from __future__ import annotations

import re
import time

from fastapi import APIRouter, Request, Response

from voxvault.api.deps import VaultDep
from voxvault.api.ranges import serve_download
from voxvault.errors import SignatureInvalid

router = APIRouter(prefix="/v1/playback", tags=["playback"])
_EXPIRES = re.compile(r"[0-9]{1,12}")


@router.get("/{recording_id}", response_model=None)
@router.head("/{recording_id}", response_model=None, include_in_schema=False)
async def play(
    recording_id: str,
    request: Request,
    vault: VaultDep,
    ws: str | None = None,
    expires: str | None = None,
    signature: str | None = None,
) -> Response:
    if not (ws and signature and expires and _EXPIRES.fullmatch(expires)):
        raise SignatureInvalid("the playback link is incomplete")
    scoped = vault.for_workspace(ws)
    download = await scoped.open_signed_audio(recording_id, int(expires), signature)
    remaining = max(0, int(expires) - int(time.time()))
    return serve_download(request, download, cache_control=f"private, max-age={remaining}")

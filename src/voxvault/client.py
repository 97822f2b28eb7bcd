"""A small HTTP client of a VoxVault server: upload a file, follow its progress, read records.

The CLI uses it for ``voxvault ingest --server URL``; it speaks the public API only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Self

import anyio
import httpx
from httpx_sse import aconnect_sse

from voxvault.errors import (
    BackendUnavailable,
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    UnsupportedMedia,
    ValidationFailed,
    VoxVaultError,
)
from voxvault.events import ProgressEvent

UPLOAD_CHUNK_BYTES = 1024 * 1024
_ERRORS: dict[int, type[VoxVaultError]] = {
    400: InvalidRequest,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMedia,
    422: ValidationFailed,
    503: BackendUnavailable,
}


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        message, detail = str(error["message"]), error.get("detail")
    except (ValueError, KeyError, TypeError):
        message, detail = response.text[:300] or response.reason_phrase, None
    raise _ERRORS.get(response.status_code, VoxVaultError)(message, detail=detail)


class VaultClient:
    def __init__(self, base_url: str, *, timeout: float = 60.0) -> None:
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._http.aclose()

    async def upload(
        self,
        path: Path,
        *,
        title: str | None = None,
        tags: list[str] | None = None,
        transcribe: bool = True,
        on_progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Upload a file as a recording; ``on_progress`` is told each chunk's size."""

        async def chunks() -> AsyncIterator[bytes]:
            async with await anyio.open_file(path, "rb") as handle:
                while chunk := await handle.read(UPLOAD_CHUNK_BYTES):
                    if on_progress is not None:
                        on_progress(len(chunk))
                    yield chunk

        size = (await anyio.Path(path).stat()).st_size
        params: list[tuple[str, str | int | float | bool | None]] = [("filename", path.name)]
        params += [("transcribe", "true" if transcribe else "false")]
        params += [("title", title)] if title else []
        params += [("tag", tag) for tag in tags or []]
        response = await self._http.post(
            "/v1/recordings",
            params=params,
            content=chunks(),
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size),
            },
            timeout=None,
        )
        _raise_for_error(response)
        recording: dict[str, Any] = response.json()
        return recording

    async def get_recording(self, recording_id: str) -> dict[str, Any]:
        response = await self._http.get(f"/v1/recordings/{recording_id}")
        _raise_for_error(response)
        recording: dict[str, Any] = response.json()
        return recording

    async def events(self, recording_id: str) -> AsyncIterator[ProgressEvent]:
        """The recording's progress events until the server ends the stream."""
        async with aconnect_sse(
            self._http, "GET", f"/v1/recordings/{recording_id}/events", timeout=None
        ) as source:
            _raise_for_error(source.response)
            async for message in source.aiter_sse():
                if message.data:
                    yield ProgressEvent.model_validate_json(message.data)

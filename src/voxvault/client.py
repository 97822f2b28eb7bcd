"""A small HTTP client of a VoxVault server: upload a file, follow its progress, read records.

The CLI uses it for ``voxvault ingest --server URL``; it speaks the public API only. Uploads go
in one request (``upload``) or over tus, resumable across failures and processes
(``upload_resumable``, see ``voxvault.tus_client``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Self

import anyio
import httpx
from httpx_sse import aconnect_sse

from voxvault.events import ProgressEvent
from voxvault.tus_client import (
    ANSWER_TIMEOUT_S,
    DEFAULT_CHECKSUM,
    DEFAULT_CHUNK_BYTES,
    ResumableUpload,
    UploadUrlStore,
    error_of,
)

UPLOAD_CHUNK_BYTES = 1024 * 1024
# The server sends a keep-alive on an event stream every 15 s: a stream silent for four of
# those has lost its server, and following it ends with ``httpx.ReadTimeout``.
EVENTS_SILENCE_TIMEOUT_S = 60.0


def _raise_for_error(response: httpx.Response) -> None:
    if not response.is_success:
        raise error_of(response)


class VaultClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout, transport=transport
        )

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
            # Sending takes as long as the bytes take; the answer comes once they are durable,
            # hashed and probed.
            timeout=httpx.Timeout(self._http.timeout.connect, read=ANSWER_TIMEOUT_S),
        )
        _raise_for_error(response)
        recording: dict[str, Any] = response.json()
        return recording

    async def upload_resumable(
        self,
        path: Path,
        *,
        title: str | None = None,
        tags: list[str] | None = None,
        transcribe: bool = True,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        checksum: str = DEFAULT_CHECKSUM,
        url_store: UploadUrlStore | None = None,
        max_attempts: int = 5,
        on_progress: Callable[[int], None] | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Upload a file as a recording over tus, in chunks of ``chunk_bytes`` that each carry
        a ``checksum`` (``crc32c``, ``sha1``, ``sha256`` or ``md5``).

        A damaged chunk is sent again; a dropped connection or a 5xx resumes at the server's
        offset, up to ``max_attempts`` failures in a row. The upload's URL is kept in
        ``url_store`` (by default in the user's cache directory) until the upload completes,
        so that a later call for the same, unchanged file resumes it instead of starting over.
        ``on_progress`` is told each newly sent byte count, ``on_chunk`` the offset after each
        stored chunk. See ``voxvault.tus_client``.
        """
        upload = ResumableUpload(
            self._http,
            path,
            ResumableUpload.metadata_for(path, title=title, tags=tags, transcribe=transcribe),
            store=url_store,
            chunk_bytes=chunk_bytes,
            checksum=checksum,
            max_attempts=max_attempts,
            on_progress=on_progress,
            on_chunk=on_chunk,
        )
        return await self.get_recording(await upload.run())

    async def get_recording(self, recording_id: str) -> dict[str, Any]:
        response = await self._http.get(f"/v1/recordings/{recording_id}")
        _raise_for_error(response)
        recording: dict[str, Any] = response.json()
        return recording

    async def events(self, recording_id: str) -> AsyncIterator[ProgressEvent]:
        """The recording's progress events until the server ends the stream."""
        async with aconnect_sse(
            self._http,
            "GET",
            f"/v1/recordings/{recording_id}/events",
            timeout=httpx.Timeout(self._http.timeout.connect, read=EVENTS_SILENCE_TIMEOUT_S),
        ) as source:
            _raise_for_error(source.response)
            async for message in source.aiter_sse():
                if message.data:
                    yield ProgressEvent.model_validate_json(message.data)

"""The client side of resumable uploads: tus 1.0 over httpx, resumable across processes.

``ResumableUpload`` sends a file to ``/files/v1/uploads`` in checksummed chunks (``PATCH`` with
``Upload-Checksum: crc32c …`` by default, see ``voxvault.checksums``). A chunk the server
refuses as corrupt (460) is sent again; a dropped connection, a 5xx or a 409 makes it ask the
server for the offset it holds (``HEAD``) and go on from there, after a growing pause, up to
``max_attempts`` failures in a row. The upload URL is kept in an ``UploadUrlStore`` (a small
JSON file keyed by the file's path, size and modification time) as soon as the server has made
it, so that the next process to upload the same file — after a crash, a Ctrl-C, a lost network
— resumes where the server stopped instead of starting over. The chunk that completes the
upload answers with the recording's id.

Hand-written rather than built on tuspy, the official Python tus client (which the test suite
uses as an independent peer of the server): tuspy imports both requests and aiohttp, two HTTP
stacks beside the httpx the rest of the client uses; its asynchronous uploader opens a new
aiohttp session and connection for every chunk; it reports progress per chunk only and retries
after a fixed delay; and it knows nothing of the recording a completed upload became. The
protocol part needed here is small: one POST, then HEADs and PATCHes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import mimetypes
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Final

import anyio
import httpx

from voxvault import checksums
from voxvault.errors import (
    BackendUnavailable,
    ChecksumMismatch,
    Conflict,
    Gone,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    UnsupportedMedia,
    ValidationFailed,
    VoxVaultError,
)

__all__ = ["DEFAULT_CHUNK_BYTES", "ResumableUpload", "UploadUrlStore", "error_of"]

DEFAULT_CHUNK_BYTES: Final = 8 * 1024 * 1024
DEFAULT_CHECKSUM: Final = "crc32c"
UPLOADS_PATH: Final = "/files/v1/uploads"
TUS_VERSION: Final = "1.0.0"
RECORDING_ID_HEADER: Final = "VoxVault-Recording-Id"
CHUNK_CONTENT_TYPE: Final = "application/offset+octet-stream"
SEND_SLICE_BYTES: Final = 1024 * 1024
"""A chunk goes out in slices of this size, so the progress bar moves within a chunk."""
MAX_BACKOFF_S: Final = 10.0
# How long an answer may take once a request is sent: a chunk is answered once it is durable,
# the final one once the recording is made of the upload (on S3, once its multipart upload is
# completed). A server silent for longer is taken as gone: a chunk is then resumed from HEAD.
ANSWER_TIMEOUT_S: Final = 600.0
_ERRORS: Final[dict[int, type[VoxVaultError]]] = {
    400: InvalidRequest,
    404: NotFound,
    409: Conflict,
    410: Gone,
    413: PayloadTooLarge,
    415: UnsupportedMedia,
    422: ValidationFailed,
    460: ChecksumMismatch,
    503: BackendUnavailable,
}


def error_of(response: httpx.Response) -> VoxVaultError:
    """The VoxVault error an unsuccessful answer stands for (JSON error body or plain text)."""
    try:
        error = response.json()["error"]
        message, detail = str(error["message"]), error.get("detail")
    except (ValueError, KeyError, TypeError):
        message, detail = response.text[:300] or response.reason_phrase, None
    return _ERRORS.get(response.status_code, VoxVaultError)(message, detail=detail)


class UploadUrlStore:
    """Upload URLs of unfinished uploads, in one JSON file, keyed by server and file.

    A file is known by its absolute path, size and modification time: a file changed since
    its upload began is a new upload. Writes replace the file atomically; a store that cannot
    be read counts as empty (it only ever saves work, it never decides what is stored).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else self.default_path()

    @staticmethod
    def default_path() -> Path:
        import platformdirs

        return Path(platformdirs.user_cache_dir("voxvault")) / "uploads.json"

    @staticmethod
    def key(server: str, path: Path) -> str:
        info = path.stat()
        return json.dumps([server.rstrip("/"), str(path.resolve()), info.st_size, info.st_mtime_ns])

    def get(self, key: str) -> str | None:
        return self._load().get(key)

    def put(self, key: str, url: str) -> None:
        urls = self._load()
        urls[key] = url
        self._save(urls)

    def discard(self, key: str) -> None:
        urls = self._load()
        if urls.pop(key, None) is not None:
            self._save(urls)

    def _load(self) -> dict[str, str]:
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(loaded, dict):
            return {}
        return {str(k): v for k, v in loaded.items() if isinstance(v, str)}

    def _save(self, urls: Mapping[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=".uploads-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(urls, handle, indent=1)
            os.replace(staging, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(staging)
            raise


class _Retry(Exception):
    """This attempt failed in a way another attempt may fix."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class ResumableUpload:
    """One file's upload over tus, resumed from the store when the server still has it.

    ``on_progress`` is told how many more bytes the server holds (or is being sent), never
    counting a byte twice; ``on_chunk`` is told the offset after each stored chunk.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        path: Path,
        metadata: Mapping[str, str],
        *,
        store: UploadUrlStore | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        checksum: str = DEFAULT_CHECKSUM,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        on_progress: Callable[[int], None] | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be at least 1")
        if checksum not in checksums.ALGORITHMS:
            raise ValueError(f"checksum must be one of {', '.join(checksums.ALGORITHMS)}")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.http = http
        self.path = path
        self.metadata = dict(metadata)
        self.store = store if store is not None else UploadUrlStore()
        self.chunk_bytes = chunk_bytes
        self.checksum = checksum
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.on_progress = on_progress
        self.on_chunk = on_chunk
        self.size = path.stat().st_size
        self.key = UploadUrlStore.key(str(http.base_url), path)
        self.url: str | None = None
        self.offset = 0
        self.resumed_from: int | None = None
        """The offset the server held when this upload was resumed from the store."""
        self._reported = 0
        self._next: tuple[int, bytes, str] | None = None
        """The chunk after the one in flight, read and checksummed meanwhile: (offset, bytes,
        base64 checksum)."""

    @staticmethod
    def metadata_for(
        path: Path, *, title: str | None, tags: list[str] | None, transcribe: bool
    ) -> dict[str, str]:
        metadata = {"filename": path.name, "transcribe": "true" if transcribe else "false"}
        content_type, _ = mimetypes.guess_type(path.name)
        if content_type:
            metadata["content_type"] = content_type
        if title:
            metadata["title"] = title
        if tags:
            metadata["tags"] = ",".join(tags)
        return metadata

    async def run(self) -> str:
        """Send what the server lacks; the id of the recording the upload became."""
        self.url = self.store.get(self.key)
        resuming = needs_head = self.url is not None
        recording_id: str | None = None
        failures = 0
        while recording_id is None:
            try:
                if self.url is None:
                    await self._create()
                elif needs_head:
                    try:
                        recording_id = await self._head()
                    except NotFound:
                        if not resuming:
                            raise
                        # The stored upload ended or expired: start afresh.
                        self.store.discard(self.key)
                        self.url, self.offset = None, 0
                    if resuming and self.url is not None:
                        self.resumed_from = self.offset
                    resuming = needs_head = False
                else:
                    recording_id = await self._step()
                failures = 0
            except _Retry as retry:
                # A server away keeps the stored URL: the next attempt, or the next run, resumes.
                failures += 1
                if failures >= self.max_attempts:
                    raise retry.cause from None
                await anyio.sleep(min(self.backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S))
                needs_head = self.url is not None
        self.store.discard(self.key)
        self._report(self.size)
        return recording_id

    async def _create(self) -> None:
        encoded = ",".join(
            f"{key} {base64.b64encode(value.encode()).decode()}"
            for key, value in self.metadata.items()
        )
        try:
            response = await self.http.post(
                UPLOADS_PATH,
                headers={
                    "Tus-Resumable": TUS_VERSION,
                    "Upload-Length": str(self.size),
                    "Upload-Metadata": encoded,
                },
            )
        except httpx.TransportError as exc:
            raise _Retry(exc) from None
        if response.status_code >= 500:
            raise _Retry(error_of(response))
        if response.status_code != 201 or "location" not in response.headers:
            raise error_of(response)
        # Kept before the first byte goes out: from here on, any crash can resume.
        self.url = str(response.url.join(response.headers["location"]))
        self.offset = 0
        self.store.put(self.key, self.url)

    async def _head(self) -> str | None:
        """Learn the server's offset; the recording id once the upload is complete."""
        assert self.url is not None
        try:
            response = await self.http.head(self.url, headers={"Tus-Resumable": TUS_VERSION})
        except httpx.TransportError as exc:
            raise _Retry(exc) from None
        if response.status_code in (404, 410):
            raise (Gone if response.status_code == 410 else NotFound)(
                f"the server no longer has the upload {self.url}"
            )
        if response.status_code >= 500:
            raise _Retry(error_of(response))
        if response.status_code != 200:
            raise error_of(response)
        if int(response.headers.get("upload-length", self.size)) != self.size:
            raise NotFound(f"the upload at {self.url} is of another file")
        self.offset = int(response.headers["upload-offset"])
        self._report(self.offset)
        recording_id: str | None = response.headers.get(RECORDING_ID_HEADER)
        if recording_id is None and self.offset >= self.size:
            # Full, and another server process is making the recording now: ask again later.
            raise _Retry(BackendUnavailable("the upload is being completed"))
        return recording_id

    async def _step(self) -> str | None:
        """Send the chunk at the current offset; the recording id if it completed the upload."""
        assert self.url is not None
        if self.offset >= self.size:
            return await self._head()
        start = self.offset
        ready, self._next = self._next, None
        if ready is not None and ready[0] == start:
            _, chunk, digest = ready
        else:
            chunk, digest = await anyio.to_thread.run_sync(self._read_chunk, start)

        async def body() -> AsyncIterator[bytes]:
            for begin in range(0, len(chunk), SEND_SLICE_BYTES):
                piece = chunk[begin : begin + SEND_SLICE_BYTES]
                yield piece
                self._report(start + begin + len(piece))

        failure: Exception | None = None
        async with anyio.create_task_group() as group:
            if start + len(chunk) < self.size:
                # The next chunk is read and hashed while this one travels and is stored.
                group.start_soon(self._prefetch, start + len(chunk))
            try:
                response = await self.http.patch(
                    self.url,
                    content=body(),
                    headers={
                        "Tus-Resumable": TUS_VERSION,
                        "Content-Type": CHUNK_CONTENT_TYPE,
                        "Content-Length": str(len(chunk)),
                        "Upload-Offset": str(start),
                        "Upload-Checksum": f"{self.checksum} {digest}",
                    },
                    timeout=httpx.Timeout(self.http.timeout.connect, read=ANSWER_TIMEOUT_S),
                )
            except Exception as exc:  # raised below, outside the task group's wrapping
                failure = exc
        if isinstance(failure, httpx.TransportError):
            raise _Retry(failure) from None
        if failure is not None:
            raise failure
        if response.status_code in (409, 460) or response.status_code >= 500:
            # 460: the chunk arrived damaged and nothing was kept; 409: the offset moved (a
            # lost answer to an earlier attempt); 5xx: a store is away. HEAD, then go on.
            raise _Retry(error_of(response))
        if response.status_code != 204:
            if response.status_code in (404, 410, 413, 415, 422):
                self.store.discard(self.key)  # refused for good: resuming cannot help
            raise error_of(response)
        self.offset = int(response.headers["upload-offset"])
        if self.on_chunk is not None:
            self.on_chunk(self.offset)
        if self.offset >= self.size:
            completed: str | None = response.headers.get(RECORDING_ID_HEADER)
            return completed if completed is not None else await self._head()
        return None

    def _read_chunk(self, offset: int) -> tuple[bytes, str]:
        """The chunk at ``offset`` and its checksum (base64); blocking, so run in a thread."""
        with self.path.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read(min(self.chunk_bytes, self.size - offset))
        digest = checksums.new_digest(self.checksum)
        digest.update(chunk)
        return chunk, base64.b64encode(digest.digest()).decode()

    async def _prefetch(self, offset: int) -> None:
        try:
            chunk, digest = await anyio.to_thread.run_sync(self._read_chunk, offset)
        except OSError:
            return  # read again when its turn comes, and reported then
        self._next = (offset, chunk, digest)

    def _report(self, position: int) -> None:
        if position > self._reported:
            if self.on_progress is not None:
                self.on_progress(position - self._reported)
            self._reported = position

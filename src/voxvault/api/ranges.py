"""Serving stored bytes over HTTP: single and suffix byte ranges, ETags, HEAD.

Hand-written because the bytes come from the BlobStore port, not from a file path, so
Starlette's ``FileResponse`` cannot serve them; multi-range requests get the whole body, which
RFC 9110 §14.2 allows.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from email.utils import format_datetime

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from voxvault.errors import RangeNotSatisfiable
from voxvault.names import content_disposition
from voxvault.vault import Download

# Positions longer than this are past the end of any blob; int() is not asked to parse
# thousands of digits.
_MAX_DIGITS = 19
_BEYOND_ANY_SIZE = "9" * _MAX_DIGITS
# One range only, ASCII digits only (str.isdigit would also take '²').
_BYTE_RANGE = re.compile(
    r"bytes=\s*(?P<first>[0-9]*)-(?P<last>[0-9]*)\s*", re.ASCII | re.IGNORECASE
)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range a ``Range`` header asks for, or None to send everything.

    Syntactically invalid or multi-range headers are ignored (None); a well-formed range that
    no byte of the resource satisfies raises ``RangeNotSatisfiable``.
    """
    if not header:
        return None
    match = _BYTE_RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match["first"], match["last"]
    if first and len(first) > _MAX_DIGITS:
        first = _BEYOND_ANY_SIZE
    if last and len(last) > _MAX_DIGITS:
        last = _BEYOND_ANY_SIZE
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable("the requested range is empty", size=size)
        return max(0, size - suffix), size - 1
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(f"the range starts past the end ({size} bytes)", size=size)
    return start, min(int(last), size - 1) if last else size - 1


def serve_download(
    request: Request, download: Download, *, cache_control: str = "private, max-age=0"
) -> Response:
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": download.etag,
        "Last-Modified": format_datetime(download.modified_at, usegmt=True),
        "Cache-Control": cache_control,
        "Content-Disposition": content_disposition(download.filename, "download"),
        "X-Content-Type-Options": "nosniff",
    }
    if_none_match = request.headers.get("if-none-match")
    if if_none_match and (if_none_match.strip() == "*" or download.etag in if_none_match):
        return Response(status_code=304, headers=headers)

    wanted = parse_range(request.headers.get("range"), download.size)
    if_range = request.headers.get("if-range")
    if wanted is not None and if_range is not None and if_range.strip() != download.etag:
        wanted = None  # the client's copy is stale: send the current whole
    if wanted is None:
        status, start, length = 200, 0, download.size
    else:
        status, start, length = 206, wanted[0], wanted[1] - wanted[0] + 1
        headers["Content-Range"] = f"bytes {wanted[0]}-{wanted[1]}/{download.size}"
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=download.content_type)
    return _BlobResponse(
        download.stream(start, length),
        length,
        status_code=status,
        headers=headers,
        media_type=download.content_type,
    )


class _BlobResponse(StreamingResponse):
    """Reads the first chunk before the status line is sent.

    A blob that went missing after ``open_audio`` found it is then a clean 404 (the app's error
    handlers still apply) rather than a 200 cut short, and a body that fits in one chunk, as
    most players' ranges do, goes out in one message without the task StreamingResponse starts
    per request to watch for a disconnect.
    """

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        length: int,
        *,
        status_code: int,
        headers: Mapping[str, str],
        media_type: str,
    ) -> None:
        super().__init__(chunks, status_code=status_code, headers=headers, media_type=media_type)
        self._chunks = chunks
        self._length = length

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await anext(self._chunks, b"")
        if len(first) >= self._length:
            await anext(self._chunks, b"")  # lets the stream finish and release what it holds
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            await send({"type": "http.response.body", "body": first})
            return
        self.body_iterator = _prepend(first, self._chunks)
        await super().__call__(scope, receive, send)


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk

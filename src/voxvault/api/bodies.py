"""Request bodies streamed in flat memory: raw uploads and ``multipart/form-data``.

Starlette's own form parser spools files to temporary files first; an upload here goes straight
from the socket to the BlobStore instead, so memory stays flat and no byte is written twice.
python-multipart's push parser does the parsing; this module only routes its callbacks.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from voxvault.errors import InvalidRequest, PayloadTooLarge

MAX_FORM_FIELD_BYTES = 64 * 1024
MAX_FORM_FIELDS = 32


def declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 19):
        raise InvalidRequest("Content-Length is not a number")
    return int(value)


class MultipartUpload:
    """One file part (``file``) streamed out of a multipart body, with the fields before it.

    Text fields must come before the file part (as in S3's POST uploads): a streaming store
    cannot wait for fields that arrive after gigabytes of audio.
    """

    def __init__(self, request: Request, file_field: str = "file") -> None:
        content_type, params = parse_options_header(request.headers.get("content-type", ""))
        boundary = params.get(b"boundary")
        if content_type != b"multipart/form-data" or not boundary:
            raise InvalidRequest("expected multipart/form-data with a boundary")
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.content_type: str | None = None
        self._file_field = file_field
        self._body = request.stream()
        self._state = "before"  # before -> in_file -> after
        self._part_name: str | None = None
        self._part_is_file = False
        self._value = bytearray()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._file_data: list[bytes] = []
        self._finished = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
        )

    # ---- parser callbacks ---------------------------------------------------------------------

    def _on_part_begin(self) -> None:
        self._headers = {}
        self._value = bytearray()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field = bytearray()
        self._header_value = bytearray()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._part_name = name
        self._part_is_file = name == self._file_field
        if self._part_is_file:
            if self._state != "before":
                raise InvalidRequest(f"the form has more than one {self._file_field!r} part")
            self._state = "in_file"
            raw_filename = options.get(b"filename")
            self.filename = raw_filename.decode("utf-8", "replace") if raw_filename else None
            part_type = self._headers.get(b"content-type")
            self.content_type = part_type.decode("latin-1") if part_type else None
        elif self._state == "after":
            raise InvalidRequest(
                f"form field {name!r} comes after the file; send text fields before the file part"
            )
        elif len(self.fields) >= MAX_FORM_FIELDS:
            raise InvalidRequest(f"the form has more than {MAX_FORM_FIELDS} fields")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_is_file:
            self._file_data.append(data[start:end])
            return
        self._value += data[start:end]
        if len(self._value) > MAX_FORM_FIELD_BYTES:
            raise PayloadTooLarge(
                f"form field {self._part_name!r} is over {MAX_FORM_FIELD_BYTES} bytes"
            )

    def _on_part_end(self) -> None:
        if self._part_is_file:
            self._state = "after"
        elif self._part_name:
            try:
                self.fields[self._part_name] = self._value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(f"form field {self._part_name!r} is not UTF-8") from None

    def _on_end(self) -> None:
        self._finished = True

    # ---- driving ------------------------------------------------------------------------------

    async def _feed(self) -> bool:
        """Feed the parser one network chunk; False at the end of the body."""
        try:
            chunk = await self._body.__anext__()
        except StopAsyncIteration:
            return False
        if chunk:
            try:
                self._parser.write(chunk)
            except (InvalidRequest, PayloadTooLarge):
                raise
            except Exception as exc:  # python-multipart raises its own parse errors
                raise InvalidRequest(f"malformed multipart body: {exc}") from None
        return True

    async def start(self) -> None:
        """Read up to the start of the file part, collecting the text fields before it."""
        while self._state == "before":
            if not await self._feed():
                raise InvalidRequest(f"the form has no {self._file_field!r} part")

    async def file_chunks(self) -> AsyncIterator[bytes]:
        """The file part's bytes; the rest of the body is read and checked to the end."""
        more = True
        while True:
            if self._file_data:
                pending, self._file_data = self._file_data, []
                for piece in pending:
                    yield piece
            if not more:
                break
            more = await self._feed()
        if not self._finished:
            raise InvalidRequest("the multipart body ended before its closing boundary")

    def json_field(self, name: str) -> Any:
        if name not in self.fields:
            return None
        try:
            return json.loads(self.fields[name])
        except json.JSONDecodeError:
            raise InvalidRequest(f"form field {name!r} is not valid JSON") from None

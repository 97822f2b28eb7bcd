"""A cap on JSON request bodies, which FastAPI reads whole into memory before validating."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voxvault.api.errors import error_response
from voxvault.errors import PayloadTooLarge

MAX_JSON_BODY_BYTES = 64 * 1024 * 1024


class JsonBodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_JSON_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if b"json" not in headers.get(b"content-type", b""):
            await self.app(scope, receive, send)
            return
        length = headers.get(b"content-length", b"")
        if length.isdigit() and (len(length) > 19 or int(length) > self.max_bytes):
            response = error_response(
                413, PayloadTooLarge.code, f"JSON bodies are limited to {self.max_bytes} bytes"
            )
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise PayloadTooLarge(f"JSON bodies are limited to {self.max_bytes} bytes")
            return message

        await self.app(scope, counted, send)

"""/files/v1/uploads: resumable uploads over tus 1.0 (core, creation, creation-with-upload,
termination, checksum, expiration). HTTP only: headers in, ``Vault.uploads`` does the rest.

Errors come from the one HTTP mapping (412, 409, 413, 415, 460, 404/410 ...), as JSON error
bodies; ``TusHeaders`` adds the protocol's headers to every answer under the prefix, errors
included, and applies ``X-HTTP-Method-Override``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import AsyncIterator, Mapping
from datetime import UTC
from email.utils import format_datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voxvault.api.deps import VaultDep
from voxvault.errors import InvalidRequest, PreconditionFailed, UnsupportedMedia, VoxVaultError
from voxvault.uploads import CHECKSUM_ALGORITHMS, BodyCut, Checksum, Upload, UploadStatus

PREFIX = "/files/v1/uploads"
TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,creation-with-upload,termination,checksum,expiration"
CHUNK_CONTENT_TYPE = "application/offset+octet-stream"
RECORDING_ID_HEADER = "VoxVault-Recording-Id"
MAX_METADATA_HEADER_BYTES = 64 * 1024
_OVERRIDABLE = frozenset({b"GET", b"HEAD", b"POST", b"PATCH", b"DELETE", b"OPTIONS"})


class TusHeaders:
    """Under ``PREFIX``: ``Tus-Resumable`` and ``Cache-Control: no-store`` on every response
    (an upload's offset must never come from a cache), and ``X-HTTP-Method-Override`` as the
    method, for clients that cannot send PATCH or DELETE."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        override = dict(scope["headers"]).get(b"x-http-method-override", b"").strip().upper()
        if override in _OVERRIDABLE:
            scope = {**scope, "method": override.decode()}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Tus-Resumable"] = TUS_VERSION
                headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def require_tus_resumable(request: Request) -> None:
    # async: a plain def would cost a worker-thread hop on every request.
    version = request.headers.get("tus-resumable")
    if version is None or version.strip() != TUS_VERSION:
        raise PreconditionFailed(
            f"this server speaks tus {TUS_VERSION}; send Tus-Resumable: {TUS_VERSION}",
            detail={"supported_versions": [TUS_VERSION]},
        )


TusRequest = Annotated[None, Depends(require_tus_resumable)]
router = APIRouter(prefix=PREFIX, tags=["uploads"])


def _header_int(request: Request, name: str, *, required: bool) -> int | None:
    value = request.headers.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"the {name} header is required")
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 19):
        raise InvalidRequest(f"{name} must be a non-negative integer")
    return int(value)


def parse_upload_metadata(value: str | None) -> dict[str, str]:
    """``key base64value`` pairs, comma-separated (a key may come alone, for an empty value)."""
    if value is None or not value.strip():
        return {}
    if len(value) > MAX_METADATA_HEADER_BYTES:
        raise InvalidRequest("Upload-Metadata is too long")
    metadata: dict[str, str] = {}
    for pair in value.split(","):
        fields = pair.strip().split(" ")
        key = fields[0]
        if not key or len(fields) > 2 or not key.isascii() or not key.isprintable():
            raise InvalidRequest(
                "Upload-Metadata is a comma-separated list of 'key base64value' pairs"
            )
        if key in metadata:
            raise InvalidRequest(f"Upload-Metadata has the key {key[:40]!r} twice")
        try:
            raw = base64.b64decode(fields[1], validate=True) if len(fields) == 2 else b""
            metadata[key] = raw.decode("utf-8")
        except (binascii.Error, ValueError):
            raise InvalidRequest(
                f"the Upload-Metadata value of {key[:40]!r} is not base64 of UTF-8 text"
            ) from None
    return metadata


def format_upload_metadata(metadata: Mapping[str, str]) -> str:
    return ",".join(
        f"{key} {base64.b64encode(value.encode()).decode()}" if value else key
        for key, value in metadata.items()
    )


def _checksum(request: Request) -> Checksum | None:
    value = request.headers.get("upload-checksum")
    return None if value is None else Checksum.parse(value)


async def _body(request: Request) -> AsyncIterator[bytes]:
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise BodyCut from None


def _state_headers(upload: Upload) -> dict[str, str]:
    headers = {"Upload-Offset": str(upload.offset)}
    if upload.status is UploadStatus.ACTIVE:
        headers["Upload-Expires"] = format_datetime(upload.expires_at.astimezone(UTC), usegmt=True)
    if upload.status is UploadStatus.COMPLETED:
        headers[RECORDING_ID_HEADER] = upload.recording_id
    return headers


def _location(request: Request, vault: VaultDep, upload_id: str) -> str:
    base = vault.settings.public_url or str(request.base_url)
    return f"{base.rstrip('/')}{PREFIX}/{upload_id}"


def _options_response() -> Response:
    return Response(
        status_code=204,
        headers={
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": TUS_EXTENSIONS,
            "Tus-Checksum-Algorithm": ",".join(CHECKSUM_ALGORITHMS),
        },
    )


@router.options("", status_code=204, response_class=Response)
async def tus_options(vault: VaultDep) -> Response:
    """What this server supports: tus version, extensions, checksums and the size limit."""
    response = _options_response()
    response.headers["Tus-Max-Size"] = str(vault.uploads.max_size)
    return response


@router.post("", status_code=201, response_class=Response)
async def create_upload(request: Request, vault: VaultDep, _: TusRequest) -> Response:
    """Create an upload of ``Upload-Length`` bytes; with an ``application/offset+octet-stream``
    body, its first chunk too. The ``Location`` is the upload's URL."""
    if "upload-defer-length" in request.headers:
        raise InvalidRequest("Upload-Defer-Length is not supported; send Upload-Length")
    length = _header_int(request, "upload-length", required=True)
    assert length is not None
    metadata = parse_upload_metadata(request.headers.get("upload-metadata"))
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    with_chunk = content_type == CHUNK_CONTENT_TYPE
    checksum = _checksum(request) if with_chunk else None
    upload = await vault.uploads.create(length, metadata)
    if with_chunk:
        try:
            upload = await vault.uploads.append(
                upload.id,
                _body(request),
                offset=0,
                checksum=checksum,
                declared_size=_header_int(request, "content-length", required=False),
            )
        except VoxVaultError:
            # The client learns no URL from an error: the upload must not outlive it.
            with contextlib.suppress(VoxVaultError):
                await vault.uploads.terminate(upload.id)
            raise
    headers = _state_headers(upload)
    headers["Location"] = _location(request, vault, upload.id)
    return Response(status_code=201, headers=headers)


@router.head("/{upload_id}", response_class=Response)
async def upload_state(upload_id: str, vault: VaultDep, _: TusRequest) -> Response:
    """The upload's offset and length; once complete, the recording it became."""
    upload = await vault.uploads.get(upload_id)
    headers = _state_headers(upload)
    headers["Upload-Length"] = str(upload.length)
    if upload.metadata:
        headers["Upload-Metadata"] = format_upload_metadata(upload.metadata)
    return Response(status_code=200, headers=headers)


@router.patch("/{upload_id}", status_code=204, response_class=Response)
async def append_chunk(
    upload_id: str, request: Request, vault: VaultDep, _: TusRequest
) -> Response:
    """Append the body at ``Upload-Offset``; the final chunk makes the recording
    (``VoxVault-Recording-Id``), or is refused as the plain upload would be (415, 422...)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != CHUNK_CONTENT_TYPE:
        raise UnsupportedMedia(f"a chunk's Content-Type must be {CHUNK_CONTENT_TYPE}")
    offset = _header_int(request, "upload-offset", required=True)
    assert offset is not None
    upload = await vault.uploads.append(
        upload_id,
        _body(request),
        offset=offset,
        checksum=_checksum(request),
        declared_size=_header_int(request, "content-length", required=False),
    )
    return Response(status_code=204, headers=_state_headers(upload))


@router.delete("/{upload_id}", status_code=204, response_class=Response)
async def terminate_upload(upload_id: str, vault: VaultDep, _: TusRequest) -> Response:
    """End an unfinished upload and remove its bytes (termination extension)."""
    await vault.uploads.terminate(upload_id)
    return Response(status_code=204)


@router.options("/{upload_id}", status_code=204, response_class=Response)
async def tus_upload_options(upload_id: str, vault: VaultDep) -> Response:
    del upload_id  # the same answer for every upload
    return await tus_options(vault)

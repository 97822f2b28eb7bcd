"""The one place where VoxVault errors become HTTP responses.

Every error body has the shape ``{"error": {"code", "message", "detail"}}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from voxvault import errors
from voxvault.models import validation_failed

logger = logging.getLogger("voxvault.api")

STATUS: dict[type[errors.VoxVaultError], int] = {
    errors.InvalidRequest: 400,
    errors.SignatureInvalid: 403,
    errors.NotFound: 404,
    errors.Gone: 410,
    errors.Conflict: 409,
    errors.PreconditionFailed: 412,
    errors.PayloadTooLarge: 413,
    errors.UnsupportedMedia: 415,
    errors.RangeNotSatisfiable: 416,
    errors.ValidationFailed: 422,
    errors.ChecksumMismatch: 460,  # tus checksum extension
    errors.BackendUnavailable: 503,
}

_HTTP_CODES = {
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    411: "length_required",
    413: "too_large",
    415: "unsupported_media",
    416: "range_not_satisfiable",
    422: "validation_failed",
    503: "backend_unavailable",
}


def status_of(exc: errors.VoxVaultError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_response(
    status: int,
    code: str,
    message: str,
    detail: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "detail": detail}}
    return JSONResponse(body, status_code=status, headers=headers)


def _headers_for(exc: errors.VoxVaultError) -> dict[str, str] | None:
    if isinstance(exc, errors.RangeNotSatisfiable):
        return {"Content-Range": f"bytes */{exc.size}"}
    if isinstance(exc, errors.BackendUnavailable):
        return {"Retry-After": "5"}
    if isinstance(exc, errors.PreconditionFailed) and isinstance(exc.detail, dict):
        # tus: a refused protocol version names the versions this server speaks.
        versions = exc.detail.get("supported_versions")
        if isinstance(versions, list):
            return {"Tus-Version": ",".join(str(v) for v in versions)}
    return None


async def _vox_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.VoxVaultError)
    status = status_of(exc)
    if isinstance(exc, errors.BackendUnavailable):
        # Expected while a backend is down: one line each, not a traceback per request.
        logger.warning("backend unavailable: %s", exc.message)
    elif status >= 500:
        logger.error("request failed: %s", exc.message, exc_info=exc)
    return error_response(status, exc.code, exc.message, exc.detail, _headers_for(exc))


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {
            "loc": list(e.get("loc", ())),
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()
    ]
    if any(p["type"] == "json_invalid" for p in problems):
        return error_response(400, "malformed_json", "the request body is not valid JSON", problems)
    return error_response(422, "validation_failed", "some fields are invalid", problems)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    # FastAPI reports any failure while reading a JSON body as a bare 400; say what it was.
    cause = exc.__cause__
    if isinstance(cause, errors.VoxVaultError):
        return await _vox_error(request, cause)
    if isinstance(cause, UnicodeDecodeError):
        return error_response(400, "malformed_json", "the request body is not valid UTF-8 JSON")
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), None, exc.headers)


async def _pydantic_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationError)
    return await _vox_error(request, validation_failed(exc))


async def _client_gone(_: Request, __: Exception) -> JSONResponse:
    # The client hung up mid-request; nobody will read this, but the log stays clean.
    return error_response(400, "client_disconnected", "the client closed the connection")


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.error("unexpected error", exc_info=exc)
    return error_response(500, "internal", "an unexpected error occurred; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.VoxVaultError, _vox_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ValidationError, _pydantic_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected)

"""BlobStore on S3-compatible object storage (AWS S3, MinIO, SeaweedFS, Cloudflare R2), via obstore.

``VOXVAULT_BLOB_URL=s3://bucket/prefix?endpoint_url=http://minio:9000&region=us-east-1``; the
credentials come from the standard ``AWS_*`` environment (access keys, session token, web
identity, container or instance credentials), never from the URL. With an endpoint the store uses
path-style addressing, which every S3-compatible server understands; plain http is allowed only
when the endpoint says http.

A put is a multipart upload fed part by part as the bytes arrive: the sink is obstore's buffered
writer with one part uploading while the next one fills, so a put holds about two parts in memory
whatever its size. S3 shows an object only once its upload is complete, and an aborted put aborts
its multipart upload. A process that dies mid-upload cannot abort it, so buckets should carry an
``AbortIncompleteMultipartUpload`` lifecycle rule, as S3 itself recommends.

A resumable upload's chunks go up as the parts of one multipart upload of the recording's own
object (``put_part``, by boto3 in ``s3_multipart``), which completing the upload completes: nothing
is copied. Joining other objects (``compose``) happens inside S3 too.

Reads are ranged GETs, streamed; a long read is split into windows of ``STREAM_WINDOW_BYTES``
pinned to the first window's ETag, so that no request stays open for as long as a slow client
takes and a blob replaced meanwhile is never mixed with its successor.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import anyio.to_thread
import obstore
from obstore.exceptions import BaseError, NotFoundError, PreconditionError
from obstore.store import S3Store

from voxvault.blobs.base import (
    READ_CHUNK_BYTES,
    BlobInfo,
    BlobSink,
    BlobStore,
    PartLimits,
    PartSink,
    StoredBlob,
    too_large,
)
from voxvault.blobs.keys import validate_key
from voxvault.blobs.s3_multipart import MAX_PART_BYTES, MAX_PARTS, S3Multipart, S3PartSink, joinable
from voxvault.errors import (
    BackendUnavailable,
    ConfigurationError,
    Conflict,
    InvalidRequest,
    NotFound,
)

if TYPE_CHECKING:
    from obstore import GetOptions, ObjectMeta, WritableFile
    from obstore.store import ClientConfig, RetryConfig

log = logging.getLogger("voxvault.blobs")

MiB = 1024 * 1024
# S3 refuses parts below 5 MiB (except the last); boto3 uses 8 MiB by default too.
MIN_PART_BYTES = 5 * MiB
DEFAULT_PART_BYTES = 8 * MiB
# The most one ranged GET asks for; a longer read takes several, each bounded in time.
STREAM_WINDOW_BYTES = 8 * MiB
# Presigned SigV4 URLs are valid for at most a week.
MAX_PRESIGN_TTL_S = 7 * 24 * 3600

# Every request is bounded: a connection must open within CONNECT_TIMEOUT and a request (one
# part, one read window) must be done within TIMEOUT. Connection errors, timeouts and 5xx
# answers are retried a few times, briefly, before the store reports itself unavailable.
CONNECT_TIMEOUT = "5s"
TIMEOUT = "300s"
RETRY: RetryConfig = {
    "max_retries": 3,
    "backoff": {
        "init_backoff": timedelta(milliseconds=100),
        "max_backoff": timedelta(seconds=2),
        "base": 2,
    },
    "retry_timeout": timedelta(seconds=30),
}

# What obstore raises when a request fails: its own errors, and OSError from its file objects.
_BACKEND_ERRORS = (BaseError, OSError)
# Where the AWS SDKs (and obstore) look for a custom endpoint when the URL names none.
_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
_URL_PARAMETERS = frozenset({"endpoint_url", "region"})
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
# Sorts after every character a key may start with: listing from here returns nothing, cheaply.
_PAST_EVERY_KEY = "~"


def _is_not_found(exc: BaseException) -> bool:
    # obstore raises NotFoundError from some calls and the builtin FileNotFoundError from others.
    return isinstance(exc, NotFoundError | FileNotFoundError)


def _reason(exc: BaseException) -> str:
    """The first line of a backend error, without the response body that may follow it."""
    text = str(exc).strip() or type(exc).__name__
    text = text.split("\n", 1)[0]
    for marker in ("<?xml", "<Error"):
        text = text.split(marker, 1)[0]
    text = text.rstrip(" :")
    return text if len(text) <= 300 else text[:297] + "..."


def _parse_endpoint(url: str, what: str) -> str:
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        # Not echoed: the message would show the credentials.
        raise ConfigurationError(
            f"the {what} must not carry credentials; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY instead"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"the {what} must be an http:// or https:// URL, got {url!r}")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ConfigurationError(f"the {what} must be scheme://host[:port] only, got {url!r}")
    return f"{parts.scheme}://{parts.netloc}"


class _AbortedPut(Exception):
    """Handed to obstore's writer so that it aborts the upload instead of completing it."""


class _S3Sink(BlobSink):
    """A put as a multipart upload: parts go up as they fill, one at a time.

    obstore's writer buffers up to one part; once that is full it starts the multipart upload
    and sends the part, and with ``max_concurrency=1`` the next write waits until the part in
    flight is stored. So the sink holds at most one part being uploaded and one being filled;
    the base class's queue absorbs the wait. Writes smaller than a part end in one plain PUT.
    """

    def __init__(self, store: S3BlobStore, key: str) -> None:
        self._store = store
        self._key = key
        self._writer: WritableFile = obstore.open_writer(
            store.client, store.path_of(key), buffer_size=store.part_size, max_concurrency=1
        )
        self._finished = False

    def write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
        except _BACKEND_ERRORS as exc:
            self._store.unavailable(f"uploading {self._key!r}", exc)

    def commit(self) -> None:
        try:
            # Waits for the part in flight while the writer can still abort the upload if it
            # failed; closing hands the writer over, so a failure after this point is cleaned up
            # by obstore (a failed completion is aborted there) or by the lifecycle rule.
            self._writer.flush()
            self._finished = True
            self._writer.close()
        except _BACKEND_ERRORS as exc:
            self._store.unavailable(f"uploading {self._key!r}", exc)

    def abort(self) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            # The writer's context-manager exit with an exception aborts the multipart upload
            # (if one was started) instead of completing it; obstore has no other abort call.
            self._writer.__exit__(_AbortedPut, _AbortedPut(), None)
        except _BACKEND_ERRORS as exc:
            # Best effort: the put fails either way, with the error that made it abort. Nothing
            # became visible; uploaded parts stay until a lifecycle rule removes them.
            log.warning(
                "could not abort the upload of %r to S3 bucket %r: %s",
                self._key,
                self._store.bucket,
                _reason(exc),
            )


class S3BlobStore(BlobStore):
    scheme = "s3"
    part_limits = PartLimits(
        min_bytes=MIN_PART_BYTES, max_bytes=MAX_PART_BYTES, max_number=MAX_PARTS
    )

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        part_size: int = DEFAULT_PART_BYTES,
    ) -> None:
        if not _BUCKET.fullmatch(bucket):
            raise ConfigurationError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except InvalidRequest:
                raise ConfigurationError(f"invalid prefix {prefix!r} in the S3 blob URL") from None
        if part_size < MIN_PART_BYTES:
            raise ConfigurationError(f"S3 parts must be at least {MIN_PART_BYTES} bytes")
        endpoint = endpoint_url or next(
            (os.environ[name] for name in _ENDPOINT_VARIABLES if os.environ.get(name)), None
        )
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = _parse_endpoint(endpoint, "S3 endpoint") if endpoint else None
        self.region = (
            region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        self.part_size = part_size
        self.client = self._connect(self.endpoint_url)
        self._signers: dict[str, S3Store] = {}
        self._multipart_client: S3Multipart | None = None
        self._multipart_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> S3BlobStore:
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            raise ConfigurationError(
                "an s3:// blob URL must not carry credentials; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY instead"
            )
        if not parts.netloc:
            raise ConfigurationError(f"an s3:// blob URL needs a bucket, got {url!r}")
        try:
            query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError:
            raise ConfigurationError(f"malformed query in the S3 blob URL {url!r}") from None
        unknown = sorted(set(query) - _URL_PARAMETERS)
        if unknown:
            known = ", ".join(sorted(_URL_PARAMETERS))
            raise ConfigurationError(
                f"unknown parameter(s) {', '.join(unknown)} in the S3 blob URL; known: {known}"
            )
        if any(len(values) > 1 for values in query.values()):
            raise ConfigurationError("a parameter is given twice in the S3 blob URL")
        endpoint = query.get("endpoint_url", [""])[0]
        region = query.get("region", [""])[0]
        return cls(
            parts.netloc,
            unquote(parts.path),
            endpoint_url=endpoint or None,
            region=region or None,
        )

    def _connect(self, endpoint: str | None) -> S3Store:
        options: ClientConfig = {"connect_timeout": CONNECT_TIMEOUT, "timeout": TIMEOUT}
        if endpoint is None:
            # AWS itself: virtual-hosted addressing, except for dotted names, which the
            # wildcard certificate of s3.<region>.amazonaws.com does not cover.
            return S3Store(
                self.bucket,
                region=self.region,
                virtual_hosted_style_request="." not in self.bucket,
                client_options=options,
                retry_config=RETRY,
            )
        options["allow_http"] = endpoint.startswith("http://")
        return S3Store(
            self.bucket,
            region=self.region,
            endpoint=endpoint,
            virtual_hosted_style_request=False,
            client_options=options,
            retry_config=RETRY,
        )

    # ---- helpers ------------------------------------------------------------------------------

    def path_of(self, key: str) -> str:
        """The object's name in the bucket."""
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def unavailable(self, action: str, exc: BaseException) -> NoReturn:
        """Raise a backend error as ``BackendUnavailable``; callers tell an absent blob first.

        (A 404 here means the bucket is missing, as when a put's upload cannot start.)
        """
        where = f"S3 bucket {self.bucket!r} at {self._endpoint_shown()}"
        raise BackendUnavailable(f"{where}: {action} failed: {_reason(exc)}") from exc

    def _endpoint_shown(self) -> str:
        if self.endpoint_url is not None:
            return self.endpoint_url
        return f"https://s3.{self.region}.amazonaws.com"

    def _multipart(self) -> S3Multipart:
        """The boto3 client for the requests obstore lacks, made on first use; blocking (boto3
        reads its configuration), so called from worker threads."""
        with self._multipart_lock:
            if self._multipart_client is None:
                self._multipart_client = S3Multipart(
                    self.bucket, endpoint_url=self.endpoint_url, region=self.region
                )
            return self._multipart_client

    async def _head(self, key: str) -> ObjectMeta:
        try:
            return await self.client.head_async(self.path_of(key))
        except _BACKEND_ERRORS as exc:
            if _is_not_found(exc):
                raise NotFound(f"no blob at {key!r}") from None
            self.unavailable(f"reading {key!r}", exc)

    # ---- adapter primitives -------------------------------------------------------------------

    def _open_sink(self, key: str) -> BlobSink:
        return _S3Sink(self, key)

    def _open_part_sink(self, key: str, multipart_id: str, number: int, size: int) -> PartSink:
        return S3PartSink(self._multipart(), self.path_of(key), multipart_id, number, size)

    async def start_multipart(self, key: str) -> str:
        path = self.path_of(key)
        return await anyio.to_thread.run_sync(lambda: self._multipart().start(path))

    async def complete_multipart(
        self, key: str, multipart_id: str, parts: Sequence[tuple[int, str]]
    ) -> None:
        path = self.path_of(key)
        await anyio.to_thread.run_sync(
            lambda: self._multipart().complete(path, multipart_id, parts)
        )

    async def abort_multipart(self, key: str, multipart_id: str) -> bool:
        path = self.path_of(key)
        return await anyio.to_thread.run_sync(lambda: self._multipart().abort(path, multipart_id))

    async def stream_range(
        self, key: str, start: int, length: int, *, chunk_size: int = READ_CHUNK_BYTES
    ) -> AsyncIterator[bytes]:
        path = self.path_of(key)
        if length <= 0:
            await self._head(key)  # NotFound, like every other store
            return
        position, end = start, start + length
        etag: str | None = None
        while position < end:
            options: GetOptions = {"range": (position, min(end, position + STREAM_WINDOW_BYTES))}
            if etag is not None:
                options["if_match"] = etag
            try:
                result = await self.client.get_async(path, options=options)
            except _BACKEND_ERRORS as exc:
                if _is_not_found(exc):
                    raise NotFound(f"no blob at {key!r}") from None
                if isinstance(exc, PreconditionError):
                    raise Conflict(f"the blob at {key!r} was replaced while it was read") from None
                if etag is None and (await self._head(key))["size"] <= start:
                    # S3 answers 416 to a range that starts at or past the end: nothing to read.
                    return
                self.unavailable(f"reading {key!r}", exc)
            meta = result.meta
            etag = meta["e_tag"] or None
            window_start = position
            stream = result.stream(min_chunk_size=chunk_size)
            while True:
                try:
                    piece = await stream.__anext__()
                except StopAsyncIteration:
                    break
                except _BACKEND_ERRORS as exc:
                    self.unavailable(f"reading {key!r}", exc)
                view = memoryview(piece)
                for offset in range(0, len(view), chunk_size):
                    data = bytes(view[offset : offset + chunk_size])
                    position += len(data)
                    yield data
            if position >= meta["size"]:
                return
            if position == window_start:
                where = f"S3 bucket {self.bucket!r} at {self._endpoint_shown()}"
                raise BackendUnavailable(f"{where}: reading {key!r} returned no bytes")

    async def stat(self, key: str) -> BlobInfo:
        meta = await self._head(key)
        return BlobInfo(key=key, size=meta["size"], modified_at=meta["last_modified"])

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        # S3 lists by whole path segments here: ask for the directory the prefix points into,
        # and keep what starts with the prefix (as the local store does).
        directory = prefix.rpartition("/")[0]
        if directory:
            try:
                validate_key(directory)
            except InvalidRequest:
                return  # no key can start with it
        listed = "/".join(part for part in (self.prefix, directory) if part) or None
        strip = len(self.prefix) + 1 if self.prefix else 0
        stream = self.client.list(listed, chunk_size=1000)
        while True:
            try:
                batch = await stream.__anext__()
            except StopAsyncIteration:
                return
            except _BACKEND_ERRORS as exc:
                self.unavailable(f"listing {prefix!r}", exc)
            for meta in batch:
                key = meta["path"][strip:]
                # Keys starting with '.' are never blobs (validate_key refuses them).
                if key.startswith(prefix) and not key.startswith("."):
                    yield BlobInfo(key=key, size=meta["size"], modified_at=meta["last_modified"])

    async def delete(self, key: str) -> bool:
        # S3 deletes absent objects without complaint, so ask first to tell the caller.
        try:
            await self._head(key)
        except NotFound:
            return False
        try:
            await self.client.delete_async(self.path_of(key))
        except _BACKEND_ERRORS as exc:
            if _is_not_found(exc):
                return False
            self.unavailable(f"deleting {key!r}", exc)
        return True

    async def check(self) -> None:
        """Raise ``BackendUnavailable`` unless the bucket exists and can be listed now.

        One cheap list request (starting past every key, so it returns nothing): it fails for a
        missing bucket, refused credentials and an unreachable endpoint. It writes nothing, as
        readiness probes run it often; a store that can be read but not written shows that at
        the first put. The bucket is never created here.
        """
        start_after = "/".join(part for part in (self.prefix, _PAST_EVERY_KEY) if part)
        stream = self.client.list(self.prefix or None, offset=start_after, chunk_size=1)
        try:
            await stream.__anext__()
        except StopAsyncIteration:
            pass
        except _BACKEND_ERRORS as exc:
            # A missing bucket is unavailable, not an absent blob.
            raise BackendUnavailable(
                f"S3 bucket {self.bucket!r} at {self._endpoint_shown()} cannot be listed: "
                f"{_reason(exc)}"
            ) from exc

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "s3",
            "location": self._location(),
            "bucket": self.bucket,
            "prefix": self.prefix,
            "endpoint": self._endpoint_shown(),
            "region": self.region,
        }

    async def presigned_url(self, key: str, ttl_s: int, public_endpoint: str | None = None) -> str:
        """A URL that lets anyone GET the blob (Range requests included) for ``ttl_s`` seconds.

        ``public_endpoint`` is where clients reach the server when that differs from the
        endpoint VoxVault uses (say ``https://media.example.com`` in front of
        ``http://minio:9000``); the URL is signed for that host, so a proxy there must pass the
        Host header through. Signing is local: the blob's existence is not checked.
        """
        path = self.path_of(key)
        if not 1 <= ttl_s <= MAX_PRESIGN_TTL_S:
            raise ValueError(f"ttl_s must be between 1 and {MAX_PRESIGN_TTL_S} seconds")
        signer = self.client
        if public_endpoint is not None:
            endpoint = _parse_endpoint(public_endpoint, "public S3 endpoint")
            if endpoint not in self._signers:
                self._signers[endpoint] = self._connect(endpoint)
            signer = self._signers[endpoint]
        try:
            return await obstore.sign_async(signer, "GET", path, timedelta(seconds=ttl_s))
        except _BACKEND_ERRORS as exc:
            self.unavailable(f"signing a URL for {key!r}", exc)

    async def compose(
        self,
        key: str,
        parts: Sequence[str],
        *,
        sha256: str | None = None,
        max_bytes: int | None = None,
        sizes: Sequence[int] | None = None,
    ) -> StoredBlob:
        # Inside S3 when the caller has the hash and S3 takes the parts as they are; else the
        # bytes pass through here (and are hashed on the way).
        if sha256 is None:
            return await super().compose(key, parts, max_bytes=max_bytes)
        validate_key(key)
        if sizes is None:
            sizes = [(await self.stat(part)).size for part in parts]
        if max_bytes is not None and sum(sizes) > max_bytes:
            raise too_large(max_bytes)
        if not joinable(sizes):
            return await super().compose(key, parts, sha256=sha256, max_bytes=max_bytes)
        sources = [self.path_of(part) for part in parts]
        path = self.path_of(key)
        await anyio.to_thread.run_sync(lambda: self._multipart().join(path, sources))
        return StoredBlob(key=key, size=sum(sizes), sha256=sha256)

    async def close(self) -> None:
        # obstore holds no connection that needs closing; its pool goes with the store.
        self._signers.clear()

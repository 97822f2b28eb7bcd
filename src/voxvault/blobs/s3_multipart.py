"""The S3 multipart requests obstore lacks, by boto3 (one client per store, used from worker
threads): joining objects into one inside S3 (``UploadPartCopy``), so that no byte passes
through this process; and multipart uploads fed one part at a time (``UploadPart``), each part
streamed as it arrives, so that a resumable upload's chunks become the parts of the recording's
own object.

A new object appears only when its upload completes, as with any put; an upload cut short is
aborted (or, if the process dies, left to the bucket's lifecycle rule for incomplete multipart
uploads, as puts are).

boto3 is told not to checksum parts (``request_checksum_calculation="when_required"``) nor to
sign their payload: the server has verified each chunk against its tus checksum and hashes the
recording as it arrives, and hashing every part again before sending it would also need the
whole part at hand. TLS protects the bytes on their way to S3.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

from voxvault.blobs.base import PartSink
from voxvault.errors import BackendUnavailable, NotFound

MIN_PART_BYTES = 5 * 1024 * 1024
MAX_PART_BYTES = 5 * 1024 * 1024 * 1024
MAX_PARTS = 10_000
PARALLEL_COPIES = 8
# Connections kept for parts in flight: one per chunk being received, across uploads.
MAX_CONNECTIONS = 64
# Bytes of a part waiting for its sending thread; past this the writing thread waits, and the
# put's own queue holds the client back.
PART_QUEUE_BYTES = 2 * 1024 * 1024


def joinable(sizes: Sequence[int]) -> bool:
    """Whether S3 accepts these objects as the parts of one upload: every part but the last at
    least 5 MiB, none empty, at most 10,000."""
    return (
        0 < len(sizes) <= MAX_PARTS
        and all(size >= MIN_PART_BYTES for size in sizes[:-1])
        and sizes[-1] > 0
    )


def _code(exc: BaseException) -> str | None:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        code: str | None = exc.response.get("Error", {}).get("Code")
        return code
    return None


def _unavailable(action: str, exc: BaseException) -> NoReturn:
    raise BackendUnavailable(f"S3: {action} failed: {exc}") from exc


def _config(endpoint_url: str | None) -> Any:
    from botocore.config import Config

    options: dict[str, Any] = {
        "connect_timeout": 5,
        "read_timeout": 300,
        "retries": {"max_attempts": 4, "mode": "standard"},
        "s3": {
            "addressing_style": "path" if endpoint_url else "auto",
            "payload_signing_enabled": False,
        },
        "max_pool_connections": MAX_CONNECTIONS,
    }
    return Config(**options, request_checksum_calculation="when_required")


class S3Multipart:
    """Blocking; run it in a worker thread."""

    def __init__(self, bucket: str, *, endpoint_url: str | None, region: str) -> None:
        import boto3
        from botocore.exceptions import BotoCoreError

        self.bucket = bucket
        try:
            self.client: Any = boto3.client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=_config(endpoint_url)
            )
        except BotoCoreError as exc:  # e.g. a profile named in the environment that is missing
            _unavailable("setting up the client", exc)

    # ---- joining objects ----------------------------------------------------------------------

    def join(self, name: str, sources: Sequence[str]) -> None:
        """Make object ``name`` of the ``sources`` objects, in order (they stay)."""
        from botocore.exceptions import BotoCoreError, ClientError

        upload_id = self.start(name)

        def copy(numbered: tuple[int, str]) -> dict[str, Any]:
            number, source = numbered
            answer = self.client.upload_part_copy(
                Bucket=self.bucket,
                Key=name,
                UploadId=upload_id,
                PartNumber=number,
                CopySource={"Bucket": self.bucket, "Key": source},
            )
            return {"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]}

        try:
            with ThreadPoolExecutor(PARALLEL_COPIES) as pool:
                parts = list(pool.map(copy, enumerate(sources, start=1)))
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException as exc:
            # If even that fails, the lifecycle rule for incomplete uploads takes it.
            with contextlib.suppress(BotoCoreError, ClientError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
            if _code(exc) in ("NoSuchKey", "404"):
                raise NotFound(f"a part of {name!r} is gone") from None
            if isinstance(exc, BotoCoreError | ClientError):
                _unavailable(f"joining {name!r}", exc)
            raise

    # ---- multipart uploads fed part by part ---------------------------------------------------

    def start(self, name: str) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self.client.create_multipart_upload(Bucket=self.bucket, Key=name)
        except (BotoCoreError, ClientError) as exc:
            _unavailable(f"starting a multipart upload of {name!r}", exc)
        upload_id: str = answer["UploadId"]
        return upload_id

    def upload_part(self, name: str, upload_id: str, number: int, body: PartBody, size: int) -> str:
        """Send part ``number`` of ``size`` bytes read from ``body``; its ETag. Not retried: the
        body cannot be read twice (the client sends the chunk again)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self.client.upload_part(
                Bucket=self.bucket,
                Key=name,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
                ContentLength=size,
            )
        except (BotoCoreError, ClientError) as exc:
            body.raise_failure()  # the put gave up: that, not what it did to the request
            if _code(exc) == "NoSuchUpload":
                raise NotFound(f"no multipart upload {upload_id!r} of {name!r}") from None
            _unavailable(f"storing part {number} of {name!r}", exc)
        etag: str = answer["ETag"]
        return etag

    def complete(self, name: str, upload_id: str, parts: Sequence[tuple[int, str]]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        listed = [{"PartNumber": number, "ETag": etag} for number, etag in parts]
        try:
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=name,
                UploadId=upload_id,
                MultipartUpload={"Parts": listed},
            )
        except (BotoCoreError, ClientError) as exc:
            if _code(exc) == "NoSuchUpload":
                raise NotFound(f"no multipart upload {upload_id!r} of {name!r}") from None
            _unavailable(f"completing the multipart upload of {name!r}", exc)

    def abort(self, name: str, upload_id: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
        except (BotoCoreError, ClientError) as exc:
            if _code(exc) == "NoSuchUpload":
                return False
            _unavailable(f"aborting the multipart upload of {name!r}", exc)
        return True


class _Abandoned(Exception):
    """The put of a part gave up; its request must not end with the part stored."""


class PartBody:
    """One part's bytes on their way from the put's writing thread to the thread sending them,
    which reads them as a file; at most about ``PART_QUEUE_BYTES`` wait at a time.

    The last bytes written are held back until ``finish``: a put that fails at its very end (a
    check refusing the bytes) fails the request before S3 has the whole part, so no part of
    refused bytes is ever stored.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pieces: deque[bytes] = deque()
        self._offset = 0
        """Bytes of the first piece already read."""
        self._queued = 0
        self._held: bytes | None = None
        self._finished = False
        self._failure: BaseException | None = None

    # ---- writing thread -----------------------------------------------------------------------

    def put(self, data: bytes) -> None:
        """Queue ``data``, waiting for room; raises once the sending failed."""
        with self._cond:
            self._cond.wait_for(lambda: self._queued < PART_QUEUE_BYTES or self._failure)
            if self._failure is not None:
                raise self._failure
            if self._held is not None:
                self._pieces.append(self._held)
                self._queued += len(self._held)
                self._cond.notify_all()
            self._held = data

    def finish(self) -> None:
        """Let the held-back bytes go: the part is complete."""
        with self._cond:
            if self._held is not None:
                self._pieces.append(self._held)
                self._held = None
            self._finished = True
            self._cond.notify_all()

    def fail(self, failure: BaseException) -> None:
        """End the body with ``failure``: raised to its reader and to a writer alike."""
        with self._cond:
            if self._failure is None:
                self._failure = failure
            self._pieces.clear()
            self._held = None
            self._queued = 0
            self._cond.notify_all()

    def raise_failure(self) -> None:
        with self._cond:
            if self._failure is not None:
                raise self._failure

    # ---- sending thread (the HTTP client reads it as a file) ----------------------------------

    def read(self, amount: int = -1) -> bytes:
        with self._cond:
            self._cond.wait_for(lambda: self._pieces or self._finished or self._failure)
            if self._failure is not None:
                raise self._failure
            if not self._pieces:
                return b""
            piece, start = self._pieces[0], self._offset
            end = len(piece) if amount < 0 else min(len(piece), start + amount)
            if end == len(piece):
                self._pieces.popleft()
                self._offset = 0
            else:
                self._offset = end
            self._queued -= end - start
            self._cond.notify_all()
        return piece if start == 0 and end == len(piece) else piece[start:end]


class S3PartSink(PartSink):
    """A part sent by its own thread while the put writes it (``PartBody`` in between): the
    request carries the part's size, so its bytes need not be gathered first."""

    def __init__(
        self, multipart: S3Multipart, name: str, upload_id: str, number: int, size: int
    ) -> None:
        self._body = PartBody()
        self._sent = threading.Event()
        self._failure: BaseException | None = None
        args = (multipart, name, upload_id, number, size)
        threading.Thread(target=self._send, args=args, name="voxvault-s3-part", daemon=True).start()

    def _send(
        self, multipart: S3Multipart, name: str, upload_id: str, number: int, size: int
    ) -> None:
        try:
            self.etag = multipart.upload_part(name, upload_id, number, self._body, size)
        except BaseException as exc:
            self._failure = exc
            self._body.fail(exc)  # a write waiting for room learns of it
        finally:
            self._sent.set()

    def write(self, data: bytes) -> None:
        self._body.put(data)

    def commit(self) -> None:
        self._body.finish()
        self._sent.wait()
        if self._failure is not None:
            raise self._failure

    def abort(self) -> None:
        self._body.fail(_Abandoned("the put of the part was abandoned"))
        self._sent.wait()

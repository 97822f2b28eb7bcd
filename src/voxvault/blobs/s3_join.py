"""Join S3 objects into one inside S3: a multipart upload whose parts are copied from them
(``UploadPartCopy``), so that no byte passes through this process.

obstore, which does every other S3 request, has no multipart copy; boto3 does, and is used for
this alone. The new object appears only when the upload completes, as with any put; an upload
cut short is aborted (or, if the process dies, left to the bucket's lifecycle rule for
incomplete multipart uploads, as puts are).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from voxvault.errors import BackendUnavailable, NotFound

MIN_PART_BYTES = 5 * 1024 * 1024
MAX_PARTS = 10_000
PARALLEL_COPIES = 8


def joinable(sizes: Sequence[int]) -> bool:
    """Whether S3 accepts these objects as the parts of one upload: every part but the last at
    least 5 MiB, none empty, at most 10,000."""
    return (
        0 < len(sizes) <= MAX_PARTS
        and all(size >= MIN_PART_BYTES for size in sizes[:-1])
        and sizes[-1] > 0
    )


class S3Joiner:
    """Blocking; run it in a worker thread."""

    def __init__(self, bucket: str, *, endpoint_url: str | None, region: str) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(
                connect_timeout=5,
                read_timeout=300,
                retries={"max_attempts": 4, "mode": "standard"},
                s3={"addressing_style": "path" if endpoint_url else "auto"},
                max_pool_connections=PARALLEL_COPIES,
            ),
        )

    def join(self, name: str, sources: Sequence[str]) -> None:
        """Make object ``name`` of the ``sources`` objects, in order (they stay)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=name)[
                "UploadId"
            ]
        except (BotoCoreError, ClientError) as exc:
            raise BackendUnavailable(f"S3: starting to join {name!r} failed: {exc}") from exc

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
            if isinstance(exc, ClientError):
                code = exc.response.get("Error", {}).get("Code")
                if code in ("NoSuchKey", "404"):
                    raise NotFound(f"a part of {name!r} is gone") from None
                raise BackendUnavailable(f"S3: joining {name!r} failed: {exc}") from exc
            if isinstance(exc, BotoCoreError):
                raise BackendUnavailable(f"S3: joining {name!r} failed: {exc}") from exc
            raise

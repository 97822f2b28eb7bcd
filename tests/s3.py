"""S3 for the test suites: moto's S3 server, started once per session, and a fresh bucket per test.

The server runs in a thread of the test process on 127.0.0.1 and a free port. Each test gets its
own bucket and dummy ``AWS_*`` credentials in its environment (every other ``AWS_*`` variable of
the developer's shell is removed for the test), and the bucket is emptied and deleted afterwards.
When moto is missing or cannot start, a test that needs it is skipped, except under CI (``CI``
set), where it fails: CI must not go green without having run the S3 adapter.
"""

from __future__ import annotations

import atexit
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import pytest

REGION = "us-east-1"
ACCESS_KEY_ID = "voxvault-test-access-key"
SECRET_ACCESS_KEY = "voxvault-test-secret-key"
BUCKET_PREFIX = "voxvault-test-"

# The running server's endpoint, or why it could not start: later tests do not try again.
_endpoint: list[str] = []
_unreachable: list[str] = []


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required under CI)", pytrace=False)
    pytest.skip(reason)


def moto_endpoint() -> str:
    """``http://127.0.0.1:PORT`` of moto's S3 server, started on first use."""
    if _endpoint:
        return _endpoint[0]
    if _unreachable:
        _unavailable(_unreachable[0])
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        _unreachable.append(f"moto is not installed (pip install 'moto[server]'): {exc}")
        _unavailable(_unreachable[0])
    try:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
    except Exception as exc:
        _unreachable.append(f"moto's S3 server did not start: {exc}")
        _unavailable(_unreachable[0])
    atexit.register(server.stop)
    # One line per request would bury a failing test's own log.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    _endpoint.append(f"http://{host}:{port}")
    return _endpoint[0]


def use_test_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the test's dummy credentials in the environment, for the rest of the test."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)


def s3_client(endpoint: str) -> Any:
    """A boto3 client for the test's own look at the server (boto3 comes with moto)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
    )


@dataclass(frozen=True)
class S3Bucket:
    endpoint: str
    name: str
    prefix: str
    client: Any

    @property
    def url(self) -> str:
        path = f"/{self.prefix}" if self.prefix else ""
        return f"s3://{self.name}{path}?endpoint_url={self.endpoint}&region={REGION}"

    def object_names(self) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def pending_uploads(self) -> list[str]:
        """Keys of the multipart uploads started and neither completed nor aborted."""
        return pending_uploads(self.client, self.name)


def pending_uploads(client: Any, bucket: str) -> list[str]:
    answer = client.list_multipart_uploads(Bucket=bucket)
    return [upload["Key"] for upload in answer.get("Uploads", [])]


@contextmanager
def s3_bucket(monkeypatch: pytest.MonkeyPatch, prefix: str = "vv") -> Iterator[S3Bucket]:
    """A new, empty bucket on the moto server; dummy credentials in the environment."""
    use_test_credentials(monkeypatch)
    with new_bucket(prefix) as bucket:
        yield bucket


def credentials_env() -> dict[str, str]:
    """The dummy credentials, as environment variables for a child process."""
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY}


@contextmanager
def new_bucket(prefix: str = "vv") -> Iterator[S3Bucket]:
    """A new, empty bucket on the moto server, removed afterwards; the environment untouched."""
    endpoint = moto_endpoint()
    client = s3_client(endpoint)
    name = f"{BUCKET_PREFIX}{uuid.uuid4().hex[:20]}"
    client.create_bucket(Bucket=name)
    try:
        yield S3Bucket(endpoint=endpoint, name=name, prefix=prefix, client=client)
    finally:
        _remove_bucket(client, name)


def _remove_bucket(client: Any, name: str) -> None:
    answer = client.list_multipart_uploads(Bucket=name)
    for upload in answer.get("Uploads", []):
        client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=item["Key"])
    client.delete_bucket(Bucket=name)

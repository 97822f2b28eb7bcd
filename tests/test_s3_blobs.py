"""What the S3 adapter adds to the BlobStore conformance suite: multipart uploads, the bucket and
its endpoint failing, presigned URLs, configuration. Runs against moto's S3 server (tests/s3.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from tests.conftest import free_port
from tests.s3 import (
    ACCESS_KEY_ID,
    REGION,
    SECRET_ACCESS_KEY,
    S3Bucket,
    s3_bucket,
    use_test_credentials,
)
from voxvault.blobs import open_blob_store
from voxvault.blobs.s3 import MIN_PART_BYTES, STREAM_WINDOW_BYTES, S3BlobStore
from voxvault.blobs.s3_multipart import S3Multipart, joinable
from voxvault.errors import (
    BackendUnavailable,
    ConfigurationError,
    Conflict,
    NotFound,
    PayloadTooLarge,
)

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
PART = MIN_PART_BYTES  # 5 MiB, the smallest part S3 (and moto) accepts


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    with s3_bucket(monkeypatch) as made:
        yield made


@pytest.fixture
async def store(bucket: S3Bucket) -> AsyncIterator[S3BlobStore]:
    opened = S3BlobStore(
        bucket.name, bucket.prefix, endpoint_url=bucket.endpoint, region=REGION, part_size=PART
    )
    yield opened
    await opened.close()


async def chunks_of(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    """Poll ``condition`` (which may block: it runs in a thread) until it holds."""
    with anyio.fail_after(timeout_s):
        while not await anyio.to_thread.run_sync(condition):
            await anyio.sleep(0.05)


async def drain(stream: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in stream]


def parts_uploaded(bucket: S3Bucket, key: str) -> int:
    """How many parts the pending multipart upload of ``key`` has stored (0 when none)."""
    name = f"{bucket.prefix}/{key}"
    uploads = bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])
    for upload in uploads:
        if upload["Key"] == name:
            answer = bucket.client.list_parts(
                Bucket=bucket.name, Key=name, UploadId=upload["UploadId"]
            )
            return len(answer.get("Parts", []))
    return 0


def object_exists(bucket: S3Bucket, key: str) -> bool:
    return f"{bucket.prefix}/{key}" in bucket.object_names()


class HeldSource:
    """``data`` in 64 KiB chunks; after ``hold_after`` bytes it waits until released, then
    either yields the rest or raises ``fail_with``."""

    def __init__(
        self, data: bytes, hold_after: int, fail_with: BaseException | None = None
    ) -> None:
        self.data = data
        self.hold_after = hold_after
        self.fail_with = fail_with
        self.release = anyio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in chunks_of(self.data[: self.hold_after]):
            yield chunk
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with
        async for chunk in chunks_of(self.data[self.hold_after :]):
            yield chunk


# ---- multipart uploads ------------------------------------------------------------------------


async def test_a_put_larger_than_a_part_goes_up_in_parts_and_reads_back(
    store: S3BlobStore, bucket: S3Bucket
) -> None:
    data = os.urandom(12 * MiB + 123)
    stored = await store.put_stream("recordings/r1/original", chunks_of(data))
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    head = bucket.client.head_object(Bucket=bucket.name, Key="vv/recordings/r1/original")
    assert head["ETag"].strip('"').endswith("-3"), "three parts: 5 + 5 + 2 MiB"
    assert bucket.pending_uploads() == []
    assert (await store.stat("recordings/r1/original")).size == len(data)
    assert await store.read_all("recordings/r1/original") == data
    # Ranges across the part boundaries and across the read windows.
    for start, length in [(PART - 10, 20), (2 * PART - 1, 3 * MiB), (0, len(data) + 10)]:
        read = await store.read_range("recordings/r1/original", start, length)
        assert read == data[start : start + length]
    streamed = [
        c async for c in store.stream_range("recordings/r1/original", 7, len(data), chunk_size=MiB)
    ]
    assert all(0 < len(c) <= MiB for c in streamed)
    assert b"".join(streamed) == data[7:]
    assert len(data) > STREAM_WINDOW_BYTES, "the read above took more than one ranged GET"


async def test_parts_go_up_while_the_stream_arrives_and_the_blob_appears_only_when_complete(
    store: S3BlobStore, bucket: S3Bucket
) -> None:
    data = os.urandom(13 * MiB)
    source = HeldSource(data, hold_after=11 * MiB)
    async with anyio.create_task_group() as group:
        group.start_soon(store.put_stream, "k/streamed", source)
        # Two full parts have arrived: both are stored before the stream goes on.
        await wait_until(lambda: parts_uploaded(bucket, "k/streamed") >= 2)
        assert not object_exists(bucket, "k/streamed")
        with pytest.raises(NotFound):
            await store.stat("k/streamed")
        source.release.set()
    assert await store.read_all("k/streamed") == data
    assert bucket.pending_uploads() == []


async def test_a_put_failing_mid_upload_leaves_no_object_and_no_upload(
    store: S3BlobStore, bucket: S3Bucket
) -> None:
    await store.put_bytes("k/v", b"old")
    source = HeldSource(os.urandom(13 * MiB), 11 * MiB, ConnectionResetError("client went away"))
    failures: list[BaseException] = []

    async def put() -> None:
        try:
            await store.put_stream("k/v", source)
        except ConnectionResetError as exc:
            failures.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(put)
        await wait_until(lambda: parts_uploaded(bucket, "k/v") >= 1)
        source.release.set()
    assert len(failures) == 1, "the put failed with the stream's error"
    assert bucket.pending_uploads() == []
    assert bucket.object_names() == ["vv/k/v"]
    assert await store.read_all("k/v") == b"old"


async def test_a_cancelled_put_mid_upload_leaves_no_object_and_no_upload(
    store: S3BlobStore, bucket: S3Bucket
) -> None:
    source = HeldSource(os.urandom(13 * MiB), 11 * MiB)
    async with anyio.create_task_group() as group:
        group.start_soon(store.put_stream, "k/cancelled", source)
        await wait_until(lambda: parts_uploaded(bucket, "k/cancelled") >= 1)
        group.cancel_scope.cancel()
    assert bucket.pending_uploads() == []
    assert bucket.object_names() == []


async def test_the_size_limit_stops_a_multipart_put_and_leaves_nothing(
    store: S3BlobStore, bucket: S3Bucket
) -> None:
    with pytest.raises(PayloadTooLarge):
        await store.put_stream("k/big", chunks_of(os.urandom(20 * MiB)), max_bytes=12 * MiB)
    assert bucket.pending_uploads() == []
    assert bucket.object_names() == []


async def test_a_blob_replaced_during_a_long_read_is_not_mixed_with_its_successor(
    store: S3BlobStore,
) -> None:
    first = os.urandom(STREAM_WINDOW_BYTES + MiB)
    await store.put_bytes("k/replaced", first)
    stream = store.stream_range("k/replaced", 0, len(first), chunk_size=MiB)
    assert await anext(stream) == first[:MiB]
    await store.put_bytes("k/replaced", os.urandom(len(first)))
    with pytest.raises(Conflict):
        await drain(stream)


# ---- the bucket and its endpoint --------------------------------------------------------------


async def test_a_missing_bucket_is_unavailable_and_never_created(bucket: S3Bucket) -> None:
    name = f"voxvault-test-missing-{uuid.uuid4().hex[:12]}"
    store = S3BlobStore(name, "vv", endpoint_url=bucket.endpoint, region=REGION)
    with pytest.raises(BackendUnavailable, match="cannot be listed"):
        await store.check()
    with pytest.raises(BackendUnavailable):
        await store.put_bytes("k/v", b"data")
    with pytest.raises(BackendUnavailable):
        await store.put_stream("k/v", chunks_of(os.urandom(12 * MiB)))
    with pytest.raises(BackendUnavailable):
        await anext(store.list())
    buckets = [entry["Name"] for entry in bucket.client.list_buckets()["Buckets"]]
    assert name not in buckets


async def test_an_endpoint_that_is_down_makes_every_operation_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_test_credentials(monkeypatch)
    down = f"http://127.0.0.1:{free_port()}"
    store = S3BlobStore("voxvault-test-down", endpoint_url=down, region=REGION, part_size=PART)
    operations: list[Callable[[], Any]] = [
        store.check,
        lambda: store.put_bytes("k/v", b"small: one PUT at commit"),
        lambda: store.put_stream("k/v", chunks_of(os.urandom(6 * MiB))),
        lambda: store.stat("k/v"),
        lambda: store.read_range("k/v", 0, 10),
        lambda: store.delete("k/v"),
        lambda: anext(store.list()),
    ]
    for operation in operations:
        # Retried briefly, then reported: bounded well below a client's patience.
        with anyio.fail_after(15), pytest.raises(BackendUnavailable) as raised:
            await operation()
        assert down in str(raised.value)
        assert SECRET_ACCESS_KEY not in str(raised.value)


async def test_the_prefix_keeps_stores_in_one_bucket_apart(bucket: S3Bucket) -> None:
    stores = {
        prefix: open_blob_store(f"s3://{bucket.name}/{prefix}?endpoint_url={bucket.endpoint}")
        for prefix in ("one", "two/deeper", "")
    }
    await stores["one"].put_bytes("k/v", b"1")
    await stores["two/deeper"].put_bytes("k/v", b"2")
    assert sorted(bucket.object_names()) == ["one/k/v", "two/deeper/k/v"]
    assert [info.key async for info in stores["one"].list()] == ["k/v"]
    assert [info.key async for info in stores["two/deeper"].list("k/")] == ["k/v"]
    assert [info.key async for info in stores[""].list()] == ["one/k/v", "two/deeper/k/v"]
    assert await stores["two/deeper"].read_all("k/v") == b"2"
    for opened in stores.values():
        await opened.check()
        await opened.close()


# ---- presigned URLs ---------------------------------------------------------------------------


async def test_a_presigned_url_serves_the_blob_and_honours_range(
    store: S3BlobStore, bucket: S3Bucket
) -> None:
    data = os.urandom(100_000)
    await store.put_bytes("recordings/r1/playback.opus", data)
    url = await store.presigned_url("recordings/r1/playback.opus", 60)
    assert url.startswith(f"{bucket.endpoint}/{bucket.name}/vv/recordings/r1/playback.opus?")
    assert "X-Amz-Signature=" in url
    assert "X-Amz-Expires=60" in url
    assert SECRET_ACCESS_KEY not in url
    async with httpx.AsyncClient() as http:
        whole = await http.get(url)
        assert whole.status_code == 200
        assert whole.content == data
        part = await http.get(url, headers={"Range": "bytes=1000-1999"})
        assert part.status_code == 206
        assert part.content == data[1000:2000]
        assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"


async def test_a_presigned_url_for_a_public_endpoint_names_that_host(
    store: S3BlobStore, bucket: S3Bucket
) -> None:
    await store.put_bytes("k/v", b"public bytes")
    public = bucket.endpoint.replace("127.0.0.1", "localhost")
    url = await store.presigned_url("k/v", 300, public_endpoint=public)
    assert url.startswith(f"{public}/{bucket.name}/vv/k/v?")
    async with httpx.AsyncClient() as http:
        answer = await http.get(url, headers={"Range": "bytes=7-"})
    assert answer.status_code == 206
    assert answer.content == b"bytes"
    with pytest.raises(ValueError, match="ttl_s"):
        await store.presigned_url("k/v", 0)
    with pytest.raises(ValueError, match="ttl_s"):
        await store.presigned_url("k/v", 8 * 24 * 3600)
    with pytest.raises(ConfigurationError):
        await store.presigned_url("k/v", 60, public_endpoint="https://user:pw@media.example")


# ---- configuration ----------------------------------------------------------------------------


def test_describe_names_the_bucket_and_never_the_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_test_credentials(monkeypatch)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "voxvault-test-session-token")
    store = open_blob_store("s3://recordings/prod?endpoint_url=https://minio.internal:9000")
    described = store.describe()
    assert described == {
        "backend": "s3",
        "location": "s3://recordings/prod",
        "bucket": "recordings",
        "prefix": "prod",
        "endpoint": "https://minio.internal:9000",
        "region": "us-east-1",
    }
    shown = json.dumps(described)
    for secret in (ACCESS_KEY_ID, SECRET_ACCESS_KEY, "voxvault-test-session-token"):
        assert secret not in shown


def test_blob_urls_are_parsed_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    use_test_credentials(monkeypatch)
    store = S3BlobStore.from_url("s3://audio/a/b?endpoint_url=http://seaweed:8333/&region=auto")
    assert (store.bucket, store.prefix, store.region) == ("audio", "a/b", "auto")
    assert store.endpoint_url == "http://seaweed:8333"
    aws = S3BlobStore.from_url("s3://audio")
    assert aws.describe()["endpoint"] == "https://s3.us-east-1.amazonaws.com"
    assert aws.prefix == ""
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://acct.r2.cloudflarestorage.com")
    from_env = S3BlobStore.from_url("s3://audio/x")
    assert from_env.region == "eu-west-1"
    assert from_env.endpoint_url == "https://acct.r2.cloudflarestorage.com"
    refused = [
        "s3:///prefix",
        "s3://key:secret@audio/x",
        "s3://audio/x?endpoint=http://minio:9000",
        "s3://audio/x?endpoint_url=http://key:secret@minio:9000",
        "s3://audio/x?endpoint_url=ftp://minio",
        "s3://audio/x?region=a&region=b",
        "s3://audio/../x",
        "s3://audio/a//b",
        "s3://a/x",
    ]
    for url in refused:
        with pytest.raises(ConfigurationError):
            open_blob_store(url)


async def test_playback_links_are_presigned_by_the_store_and_follow_the_rendition(
    bucket: S3Bucket, tmp_path: Any
) -> None:
    from tests.media import wav_bytes
    from voxvault import Settings, Vault

    audio = wav_bytes(seconds=1.0)
    public = bucket.endpoint.replace("127.0.0.1", "localhost")
    settings = Settings(data_dir=tmp_path / "data", blob_url=bucket.url, blob_public_url=public)
    async with await Vault.open(settings) as vault:
        recording = await vault.create_recording(
            chunks_of(audio), filename="a.wav", transcribe=False
        )
        link = await vault.playback_link(recording.id, base_url="http://api.invalid", ttl=600)
        assert link.url.startswith(f"{public}/{bucket.name}/"), link.url
        assert "/original?" in link.url
        async with httpx.AsyncClient() as http:
            whole = await http.get(link.url)
            assert (whole.status_code, whole.content) == (200, audio)
            part = await http.get(link.url, headers={"Range": "bytes=10-19"})
            assert (part.status_code, part.content) == (206, audio[10:20])
        # Once the pipeline stored an Opus rendition, links point at it instead.
        rendition = b"OggS rendition bytes"
        stored = await vault.blobs.put_bytes(f"recordings/{recording.id}/playback.opus", rendition)
        await vault.metadata.set_playback(vault.workspace, recording.id, stored.sha256)
        link = await vault.playback_link(recording.id, base_url="http://api.invalid")
        assert "/playback.opus?" in link.url
        async with httpx.AsyncClient() as http:
            assert (await http.get(link.url)).content == rendition


# ---- joining parts inside S3 --------------------------------------------------------------------


async def test_chunk_sized_parts_are_joined_inside_s3(
    store: S3BlobStore, bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No byte of the parts is read back through the store: S3 copies them into the new
    object; and no pending multipart upload is left."""
    parts = [os.urandom(5 * 1024 * 1024), os.urandom(6 * 1024 * 1024), b"tail"]
    keys = [f"uploads/u/parts/{n}" for n in range(len(parts))]
    for key, data in zip(keys, parts, strict=True):
        await store.put_bytes(key, data)

    def no_reads(*_: object, **__: object) -> AsyncIterator[bytes]:
        raise AssertionError("a part was read through the store")

    monkeypatch.setattr(store, "stream_range", no_reads)
    digest = hashlib.sha256(b"".join(parts)).hexdigest()
    stored = await store.compose("recordings/r/original", keys, sha256=digest)
    monkeypatch.undo()
    assert (stored.size, stored.sha256) == (sum(map(len, parts)), digest)
    assert await store.read_all("recordings/r/original") == b"".join(parts)
    assert bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", []) == []


async def test_a_part_gone_during_the_join_is_not_found_and_leaves_nothing(
    store: S3BlobStore, bucket: S3Bucket
) -> None:
    await store.put_bytes("uploads/u/parts/0", os.urandom(5 * 1024 * 1024))
    joiner = S3Multipart(bucket.name, endpoint_url=bucket.endpoint, region=store.region)
    sources = [store.path_of("uploads/u/parts/0"), store.path_of("uploads/u/parts/gone")]
    with pytest.raises(NotFound):
        await anyio.to_thread.run_sync(joiner.join, store.path_of("recordings/r/original"), sources)
    assert not object_exists(bucket, "recordings/r/original")
    assert bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", []) == []


def test_which_parts_s3_can_join() -> None:
    big = 5 * 1024 * 1024
    assert joinable([big, big, 1])
    assert joinable([1])
    assert not joinable([big - 1, big])  # a part but the last under 5 MiB
    assert not joinable([big, 0])  # an empty part
    assert not joinable([])
    assert not joinable([big] * 10_001)

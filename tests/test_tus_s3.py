"""Resumable uploads on S3 (moto): chunks as the parts of one multipart upload of the recording's
own object, completed without copying a byte; the fallback to part objects for chunks S3 cannot
take as parts; racing chunks; termination, expiry and refusal aborting the multipart upload; a
completion cut short and taken over; and memory that stays flat whatever a chunk's size."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.media import riff_declaring
from tests.s3 import S3Bucket, s3_bucket
from tests.test_tus import (
    CHUNK,
    TUS,
    create,
    patch,
    race_at_start,
    set_upload_row,
    sha1_header,
)
from voxvault import Settings, Vault
from voxvault.blobs.s3 import S3BlobStore
from voxvault.blobs.s3_multipart import PartBody, S3Multipart
from voxvault.errors import BackendUnavailable, NotFound

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
PART = 5 * MiB  # the smallest part S3 takes but for the last


def wav_of(size: int) -> bytes:
    """A PCM WAV file of ``size`` bytes (noise: random samples)."""
    return riff_declaring(size - 44, os.urandom(size - 44))


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    with s3_bucket(monkeypatch) as made:
        yield made


@pytest.fixture
def settings(data_dir: Path, bucket: S3Bucket) -> Settings:
    return Settings(data_dir=data_dir, blob_url=bucket.url, max_upload_bytes=64 * MiB)


async def send(
    client: httpx.AsyncClient, url: str, data: bytes, sizes: Sequence[int], start: int = 0
) -> httpx.Response:
    """PATCH ``data`` from ``start`` in chunks of ``sizes`` (the last one takes the rest)."""
    offset = start
    for size in [*sizes, len(data) - start - sum(sizes)]:
        response = await patch(client, url, offset, data[offset : offset + size])
        assert response.status_code == 204, response.text
        offset += size
    return response


def upload_id_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def part_objects(bucket: S3Bucket, url: str) -> list[str]:
    return [n for n in bucket.object_names() if f"uploads/{upload_id_of(url)}/" in n]


def multipart_parts(bucket: S3Bucket) -> dict[str, list[int]]:
    """The part numbers of every pending multipart upload, by object name."""
    found: dict[str, list[int]] = {}
    listed = bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])
    for each in listed:
        parts = bucket.client.list_parts(
            Bucket=bucket.name, Key=each["Key"], UploadId=each["UploadId"]
        ).get("Parts", [])
        found.setdefault(each["Key"], []).extend(p["PartNumber"] for p in parts)
    return found


async def recording_of(client: httpx.AsyncClient, response: httpx.Response) -> dict[str, Any]:
    recording_id = response.headers["VoxVault-Recording-Id"]
    recording: dict[str, Any] = (await client.get(f"/v1/recordings/{recording_id}")).json()
    return recording


async def audio_of(client: httpx.AsyncClient, recording: dict[str, Any]) -> bytes:
    return (await client.get(f"/v1/recordings/{recording['id']}/audio")).content


@pytest.fixture
def completions(monkeypatch: pytest.MonkeyPatch, bucket: S3Bucket) -> list[list[str]]:
    """The bucket's objects at each completion of a multipart upload; no object is joined inside
    S3 (UploadPartCopy) and none put whole meanwhile."""
    seen: list[list[str]] = []
    real = S3BlobStore.complete_multipart

    async def complete(store: S3BlobStore, *args: Any) -> None:
        seen.append(await anyio.to_thread.run_sync(bucket.object_names))
        await real(store, *args)

    def no_join(*_: object) -> None:
        raise AssertionError("objects were joined inside S3")

    monkeypatch.setattr(S3BlobStore, "complete_multipart", complete)
    monkeypatch.setattr(S3Multipart, "join", no_join)
    return seen


# ---- chunks as parts of the recording's own multipart upload ------------------------------------


@pytest.mark.parametrize("seen_by_this_process", [True, False])
async def test_chunks_become_the_recording_without_part_objects_or_copies(
    client: httpx.AsyncClient,
    bucket: S3Bucket,
    completions: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
    seen_by_this_process: bool,
) -> None:
    from voxvault import uploads

    data = wav_of(2 * PART + 12_345)
    url = await create(client, len(data))
    checksum = {"Upload-Checksum": sha1_header(data[:PART])}
    first = await patch(client, url, 0, data[:PART], **checksum)
    assert first.status_code == 204
    assert part_objects(bucket, url) == []
    (pending,) = multipart_parts(bucket).items()
    assert pending[0].endswith("/original")
    assert pending[1] == [1]
    if not seen_by_this_process:
        # The next chunks come through another process: the recording is hashed by reading it.
        uploads._recent.forget(upload_id_of(url))

    def no_put(*_: object) -> None:
        raise AssertionError("a blob was put whole")

    with monkeypatch.context() as patched:
        patched.setattr(S3BlobStore, "_open_sink", no_put)
        last = await send(client, url, data, [PART], start=PART)

    recording = await recording_of(client, last)
    assert recording["sha256"] == hashlib.sha256(data).hexdigest()
    assert recording["size_bytes"] == len(data)
    assert await audio_of(client, recording) == data
    (at_completion,) = completions
    assert at_completion == []  # no part object, and the recording not there yet
    name = f"{bucket.prefix}/recordings/{recording['id']}/original"
    assert bucket.object_names() == [name]
    head = bucket.client.head_object(Bucket=bucket.name, Key=name)
    assert head["ETag"].strip('"').endswith("-3"), "the three chunks are its three parts"
    assert bucket.pending_uploads() == []
    row = await client.head(url, headers=TUS)
    assert row.headers["VoxVault-Recording-Id"] == recording["id"]


async def test_an_upload_in_one_chunk_is_one_part(
    client: httpx.AsyncClient, bucket: S3Bucket, completions: list[list[str]]
) -> None:
    data = wav_of(200_000)
    url = await create(client, len(data))
    response = await patch(client, url, 0, data)
    assert response.status_code == 204
    recording = await recording_of(client, response)
    assert await audio_of(client, recording) == data
    assert recording["sha256"] == hashlib.sha256(data).hexdigest()
    assert completions == [[]]
    assert bucket.pending_uploads() == []


# ---- the fallback to part objects ---------------------------------------------------------------


async def test_a_small_chunk_sends_the_rest_to_part_objects_and_completes_identical(
    client: httpx.AsyncClient, bucket: S3Bucket, vault: Vault
) -> None:
    data = wav_of(2 * PART + 5000)
    url = await create(client, len(data))
    assert (await patch(client, url, 0, data[:PART])).status_code == 204
    assert (await patch(client, url, PART, data[PART : PART + 1000])).status_code == 204
    assert len(part_objects(bucket, url)) == 1
    # At least 5 MiB, but after a part object: a part object too, as is the final chunk.
    assert (await patch(client, url, PART + 1000, data[PART + 1000 : 2 * PART])).status_code == 204
    assert len(part_objects(bucket, url)) == 2
    assert list(multipart_parts(bucket).values()) == [[1]]
    last = await patch(client, url, 2 * PART, data[2 * PART :])
    assert last.status_code == 204, last.text
    recording = await recording_of(client, last)
    assert recording["sha256"] == hashlib.sha256(data).hexdigest()
    assert await audio_of(client, recording) == data
    assert bucket.object_names() == [f"{bucket.prefix}/recordings/{recording['id']}/original"]
    assert bucket.pending_uploads() == []


async def test_chunks_before_the_first_part_sized_one_keep_to_part_objects(
    client: httpx.AsyncClient, bucket: S3Bucket
) -> None:
    data = wav_of(PART + 3000)
    url = await create(client, len(data))

    async def unsized() -> AsyncIterator[bytes]:  # no Content-Length: its size is not known
        yield data[1000:3000]

    assert (await patch(client, url, 0, data[:1000])).status_code == 204
    streamed = await client.patch(
        url, content=unsized(), headers={**CHUNK, "Upload-Offset": "1000"}
    )
    assert streamed.status_code == 204
    last = await patch(client, url, 3000, data[3000:])
    assert last.status_code == 204
    assert multipart_parts(bucket) == {}
    recording = await recording_of(client, last)
    assert await audio_of(client, recording) == data
    assert bucket.pending_uploads() == []


async def test_past_the_last_part_number_the_rest_are_part_objects(
    client: httpx.AsyncClient, bucket: S3Bucket, vault: Vault
) -> None:
    data = wav_of(2 * PART + 100)
    url = await create(client, len(data))
    await set_upload_row(vault, url, next_part_number=10_000)
    last = await send(client, url, data, [PART, PART])
    recording = await recording_of(client, last)
    assert recording["sha256"] == hashlib.sha256(data).hexdigest()
    assert await audio_of(client, recording) == data
    assert bucket.object_names() == [f"{bucket.prefix}/recordings/{recording['id']}/original"]
    assert bucket.pending_uploads() == []


# ---- races --------------------------------------------------------------------------------------


async def test_two_chunks_racing_at_one_offset_one_wins_one_is_409(
    client: httpx.AsyncClient, bucket: S3Bucket
) -> None:
    data = wav_of(2 * PART + 777)
    ours, theirs = data[:PART], data[:44] + os.urandom(PART - 44)
    url = await create(client, len(data))
    results = await race_at_start(
        client, url, ours, theirs, sent_before_stall=MiB, declare_length=True
    )
    assert sorted(r.status_code for r in results) == [204, 409]
    winner = ours if results[0].status_code == 204 else theirs
    # Both attempts' parts are in the multipart upload, under numbers of their own.
    assert sorted(*multipart_parts(bucket).values()) == [1, 2]
    last = await patch(client, url, PART, data[PART:])
    assert last.status_code == 204, last.text
    recording = await recording_of(client, last)
    stored = winner + data[PART:]
    assert await audio_of(client, recording) == stored
    assert recording["sha256"] == hashlib.sha256(stored).hexdigest()
    assert bucket.pending_uploads() == []


async def test_a_multipart_upload_started_by_a_loser_is_aborted(
    client: httpx.AsyncClient, bucket: S3Bucket, vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes saw no multipart upload and started one each: the first to claim a number
    keeps its own; the other's is aborted at once."""
    data = wav_of(PART + 10)
    url = await create(client, len(data))
    started: list[str] = []
    real = S3BlobStore.start_multipart

    async def start_after_another(store: S3BlobStore, key: str) -> str:
        if not started:
            started.append(await real(store, key))
            # Another process gets there first and records its own.
            await set_upload_row(vault, url, multipart_id=await real(store, key))
            return started[0]
        return await real(store, key)

    with monkeypatch.context() as patched:
        patched.setattr(S3BlobStore, "start_multipart", start_after_another)
        assert (await patch(client, url, 0, data[:PART])).status_code == 204
    pending = bucket.client.list_multipart_uploads(Bucket=bucket.name)["Uploads"]
    assert [each["UploadId"] for each in pending] != started
    assert len(pending) == 1
    last = await patch(client, url, PART, data[PART:])
    assert await audio_of(client, await recording_of(client, last)) == data
    assert bucket.pending_uploads() == []


# ---- checksums ----------------------------------------------------------------------------------


async def test_a_part_not_matching_its_checksum_is_460_and_never_stored(
    client: httpx.AsyncClient, bucket: S3Bucket
) -> None:
    data = wav_of(PART + 10)
    url = await create(client, len(data))
    wrong = sha1_header(data[: PART - 1] + b"\x00")
    response = await patch(client, url, 0, data[:PART], **{"Upload-Checksum": wrong})
    assert response.status_code == 460
    assert list(multipart_parts(bucket).values()) == [[]]  # started, but no part stored
    assert (await client.head(url, headers=TUS)).headers["Upload-Offset"] == "0"
    last = await send(client, url, data, [PART])
    assert await audio_of(client, await recording_of(client, last)) == data


# ---- termination, expiry, refusal ---------------------------------------------------------------


async def test_termination_aborts_the_multipart_upload(
    client: httpx.AsyncClient, bucket: S3Bucket
) -> None:
    data = wav_of(2 * PART)
    url = await create(client, len(data))
    assert (await patch(client, url, 0, data[:PART])).status_code == 204
    assert len(bucket.pending_uploads()) == 1
    assert (await client.delete(url, headers=TUS)).status_code == 204
    assert bucket.pending_uploads() == []
    assert bucket.object_names() == []
    assert (await patch(client, url, PART, data[PART:])).status_code == 410


async def test_an_upload_whose_multipart_upload_the_store_aborted_ends_gone(
    client: httpx.AsyncClient, bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = wav_of(3 * PART)
    url = await create(client, len(data))
    assert (await patch(client, url, 0, data[:PART])).status_code == 204
    # A bucket lifecycle rule aborting incomplete multipart uploads, too soon for this one.
    answer = bucket.client.list_multipart_uploads(Bucket=bucket.name)
    for pending in answer["Uploads"]:
        bucket.client.abort_multipart_upload(
            Bucket=bucket.name, Key=pending["Key"], UploadId=pending["UploadId"]
        )

    # S3 answers a part of an aborted upload with 404 NoSuchUpload (mapped to NotFound, see
    # test_a_part_of_an_upload_s3_no_longer_has_is_not_found); moto fails with a 500 instead.
    def no_such_upload(self: S3Multipart, name: str, upload_id: str, *_: object) -> str:
        raise NotFound(f"no multipart upload {upload_id!r} of {name!r}")

    monkeypatch.setattr(S3Multipart, "upload_part", no_such_upload)
    lost = await patch(client, url, PART, data[PART : 2 * PART])
    assert lost.status_code == 410, lost.text
    assert lost.json()["error"]["code"] == "gone"
    assert (await client.head(url, headers=TUS)).status_code == 410
    assert bucket.pending_uploads() == []
    assert bucket.object_names() == []


def test_a_part_of_an_upload_s3_no_longer_has_is_not_found(bucket: S3Bucket) -> None:
    from botocore.stub import Stubber

    multipart = S3Multipart(bucket.name, endpoint_url=bucket.endpoint, region="us-east-1")
    with Stubber(multipart.client) as stub:
        stub.add_client_error("upload_part", "NoSuchUpload", http_status_code=404)
        stub.add_client_error("upload_part", "InternalError", http_status_code=500)
        with pytest.raises(NotFound):
            multipart.upload_part("k", "gone-id", 2, PartBody(), 0)
        with pytest.raises(BackendUnavailable):
            multipart.upload_part("k", "gone-id", 2, PartBody(), 0)


async def test_a_termination_whose_abort_failed_is_aborted_at_expiry(
    client: httpx.AsyncClient, bucket: S3Bucket, vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = wav_of(2 * PART)
    url = await create(client, len(data))
    assert (await patch(client, url, 0, data[:PART])).status_code == 204

    async def away(*_: object) -> bool:
        raise BackendUnavailable("S3 is away")

    with monkeypatch.context() as patched:
        patched.setattr(S3BlobStore, "abort_multipart", away)
        assert (await client.delete(url, headers=TUS)).status_code == 204
    assert len(bucket.pending_uploads()) == 1
    later = datetime.now(UTC) + timedelta(seconds=vault.settings.upload_ttl + 1)
    assert await vault.uploads.expire_uploads(later) == 1
    assert bucket.pending_uploads() == []


async def test_expiry_aborts_the_multipart_upload(
    client: httpx.AsyncClient, bucket: S3Bucket, vault: Vault
) -> None:
    data = wav_of(3 * PART)
    url = await create(client, len(data))
    kept = await create(client, len(data))
    assert (await patch(client, url, 0, data[:PART])).status_code == 204
    assert (await patch(client, url, PART, data[PART : PART + 10])).status_code == 204
    assert (await patch(client, kept, 0, data[:PART])).status_code == 204
    assert len(bucket.pending_uploads()) == 2
    await set_upload_row(vault, url, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    report = await vault.collect_garbage(grace_s=0)  # what voxvault gc and the sweeper run
    assert report.expired_uploads == 1
    assert len(bucket.pending_uploads()) == 1
    assert part_objects(bucket, url) == []
    assert (await client.head(kept, headers=TUS)).headers["Upload-Offset"] == str(PART)
    last = await send(client, kept, data, [], start=PART)
    assert await audio_of(client, await recording_of(client, last)) == data


async def test_a_refused_upload_leaves_nothing(client: httpx.AsyncClient, bucket: S3Bucket) -> None:
    data = os.urandom(PART + 1000)  # not audio
    url = await create(client, len(data))
    assert (await patch(client, url, 0, data[:PART])).status_code == 204
    response = await patch(client, url, PART, data[PART:])
    assert response.status_code == 415
    assert bucket.object_names() == []
    assert bucket.pending_uploads() == []
    assert (await client.get("/v1/recordings")).json()["items"] == []
    assert (await client.head(url, headers=TUS)).status_code == 410


# ---- a completion cut short ---------------------------------------------------------------------


@pytest.mark.parametrize("retried_answer", ["completes-again", "no-such-upload"])
@pytest.mark.parametrize("mixed", [False, True])
async def test_a_completion_cut_short_after_the_multipart_upload_is_finished_by_a_later_head(
    client: httpx.AsyncClient,
    bucket: S3Bucket,
    vault: Vault,
    monkeypatch: pytest.MonkeyPatch,
    retried_answer: str,
    mixed: bool,
) -> None:
    """The multipart upload was completed, and the process died before the recording was made
    (or the answer was lost): the completion taken over by another process finds the object,
    hashes it (that process saw none of the chunks), and makes the recording once. S3 answers
    a second completion with NoSuchUpload; moto completes again."""
    from voxvault import uploads

    data = wav_of(PART + 4000)
    url = await create(client, len(data))
    assert (await patch(client, url, 0, data[:PART])).status_code == 204
    if mixed:  # a part object follows the multipart upload's part
        assert (await patch(client, url, PART, data[PART : PART + 1000])).status_code == 204
    real = S3BlobStore.complete_multipart
    calls: list[int] = []

    async def complete_then_die(store: S3BlobStore, *args: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            await real(store, *args)
            raise BackendUnavailable("the process died here")
        if retried_answer == "no-such-upload":
            raise NotFound("no such multipart upload")
        await real(store, *args)

    monkeypatch.setattr(S3BlobStore, "complete_multipart", complete_then_die)
    offset = PART + 1000 if mixed else PART
    response = await patch(client, url, offset, data[offset:])
    assert response.status_code == 503
    uploads._recent.forget(upload_id_of(url))  # another process takes over
    await set_upload_row(vault, url, updated_at=datetime.now(UTC) - timedelta(minutes=5))
    found = await client.head(url, headers=TUS)
    assert found.status_code == 200, found.text
    recording = await recording_of(client, found)
    assert recording["sha256"] == hashlib.sha256(data).hexdigest()
    assert await audio_of(client, recording) == data
    assert len(calls) == 2
    assert len((await client.get("/v1/recordings")).json()["items"]) == 1
    assert bucket.object_names() == [f"{bucket.prefix}/recordings/{recording['id']}/original"]
    assert bucket.pending_uploads() == []


# ---- memory -------------------------------------------------------------------------------------


async def test_a_part_is_streamed_not_gathered(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk of any size goes up as it arrives: the store holds a few megabytes of it at a
    time, not the chunk (tus chunks are bounded only by the upload's length)."""
    size = 96 * MiB
    received: list[int] = []

    class SlowS3:
        def upload_part(self, name: str, upload_id: str, number: int, body: Any, n: int) -> str:
            while piece := body.read(256 * 1024):
                received.append(len(piece))
            return '"etag"'

    store = S3BlobStore("bucket", endpoint_url="http://127.0.0.1:9", region="us-east-1")
    monkeypatch.setattr(store, "_multipart", lambda: SlowS3())

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(size // (64 * 1024)):
            yield os.urandom(64 * 1024)

    tracemalloc.start()
    try:
        stored = await store.put_part("recordings/r/original", "m", 1, chunks(), size=size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (stored.size, sum(received), stored.etag) == (size, size, '"etag"')
    assert peak < 24 * MiB, f"{peak / MiB:.1f} MiB held at once"

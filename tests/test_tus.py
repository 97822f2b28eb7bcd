"""Resumable uploads (tus 1.0) at /files/v1/uploads, request by request: one test per MUST of
the protocol and its extensions, completion into a recording, expiry, races, crashes, and an
upload carried on across two API processes over PostgreSQL and S3."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator, Iterator, MutableMapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import anyio
import google_crc32c
import httpx
import pytest

from tests.conftest import LiveServer, stored_files, within
from tests.media import wav_bytes
from tests.postgres import postgres_database
from tests.s3 import S3Bucket, new_bucket
from tests.stacks import child_environment
from voxvault import Settings, Vault
from voxvault.api import create_app
from voxvault.errors import BackendUnavailable
from voxvault.metadata.sql import SqlMetadataStore
from voxvault.metadata.tables import uploads as uploads_table
from voxvault.metadata.uploads import Upload, UploadStatus

pytestmark = pytest.mark.anyio

TUS = {"Tus-Resumable": "1.0.0"}
CHUNK = {**TUS, "Content-Type": "application/offset+octet-stream"}
UPLOADS = "/files/v1/uploads"
MAX_BYTES = 1024 * 1024
WAV = wav_bytes(seconds=1.0)


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, max_upload_bytes=MAX_BYTES)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def metadata_header(**values: str) -> str:
    return ",".join(f"{key} {b64(value)}" for key, value in values.items())


async def create(client: httpx.AsyncClient, length: int = len(WAV), **metadata: str) -> str:
    metadata.setdefault("transcribe", "false")
    response = await client.post(
        UPLOADS,
        headers={
            **TUS,
            "Upload-Length": str(length),
            "Upload-Metadata": metadata_header(**metadata),
        },
    )
    assert response.status_code == 201, response.text
    location: str = response.headers["Location"]
    return location


async def patch(
    client: httpx.AsyncClient, url: str, offset: int, data: bytes, **headers: str
) -> httpx.Response:
    return await client.patch(
        url, content=data, headers={**CHUNK, "Upload-Offset": str(offset), **headers}
    )


async def offset_of(client: httpx.AsyncClient, url: str) -> int:
    response = await client.head(url, headers=TUS)
    assert response.status_code == 200
    return int(response.headers["Upload-Offset"])


def upload_files(data_dir: Path) -> list[Path]:
    return [p for p in stored_files(data_dir) if "uploads" in p.relative_to(data_dir).parts]


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


async def set_upload_row(vault: Vault, url: str, **values: Any) -> None:
    """Move an upload's clock (the port has no way to: time passes by itself in production)."""
    assert isinstance(vault.metadata, SqlMetadataStore)
    async with vault.metadata.engine.begin() as conn:
        await conn.execute(
            uploads_table.update()
            .where(uploads_table.c.id == url.rsplit("/", 1)[1])
            .values(**values)
        )


# ---- core protocol ------------------------------------------------------------------------------


async def test_options_advertises_version_extensions_limit_and_checksums(
    client: httpx.AsyncClient,
) -> None:
    response = await client.options(UPLOADS)  # no Tus-Resumable needed for OPTIONS
    assert response.status_code == 204
    assert response.headers["Tus-Version"] == "1.0.0"
    assert set(response.headers["Tus-Extension"].split(",")) == {
        "creation",
        "creation-with-upload",
        "termination",
        "checksum",
        "expiration",
    }
    assert response.headers["Tus-Max-Size"] == str(MAX_BYTES)
    assert set(response.headers["Tus-Checksum-Algorithm"].split(",")) == {
        "sha1",
        "sha256",
        "md5",
        "crc32c",
    }


@pytest.mark.parametrize("version", [None, "0.2.2", "2.0.0", ""])
@pytest.mark.parametrize("method", ["POST", "HEAD", "PATCH", "DELETE"])
async def test_an_unsupported_or_missing_tus_version_is_412(
    client: httpx.AsyncClient, data_dir: Path, method: str, version: str | None
) -> None:
    url = await create(client)
    before = upload_files(data_dir)
    headers = {"Upload-Length": "10", "Upload-Offset": "0"}
    headers["Content-Type"] = "application/offset+octet-stream"
    if version is not None:
        headers["Tus-Resumable"] = version
    target = UPLOADS if method == "POST" else url
    response = await client.request(method, target, headers=headers, content=b"x" * 10)
    assert response.status_code == 412
    assert response.headers["Tus-Version"] == "1.0.0"
    assert response.headers["Tus-Resumable"] == "1.0.0"
    if method != "HEAD":
        assert error_code(response) == "precondition_failed"
    assert await offset_of(client, url) == 0
    assert upload_files(data_dir) == before


async def test_every_response_carries_tus_resumable(client: httpx.AsyncClient) -> None:
    url = await create(client)
    responses = [
        await client.head(url, headers=TUS),
        await patch(client, url, 0, b"RIFF"),
        await patch(client, url, 99, b"x"),  # 409
        await client.head(f"{UPLOADS}/{'0' * 32}", headers=TUS),  # 404
    ]
    assert [r.status_code for r in responses] == [200, 204, 409, 404]
    assert all(r.headers["Tus-Resumable"] == "1.0.0" for r in responses)


async def test_head_reports_offset_length_and_metadata_never_cached(
    client: httpx.AsyncClient,
) -> None:
    url = await create(client, filename="take.wav", title="Standup", tags="a,b")
    assert (await patch(client, url, 0, WAV[:100])).status_code == 204
    response = await client.head(url, headers=TUS)
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Upload-Offset"] == "100"
    assert response.headers["Upload-Length"] == str(len(WAV))
    sent = {
        pair.split(" ")[0]: base64.b64decode(pair.split(" ")[1]).decode()
        for pair in response.headers["Upload-Metadata"].split(",")
    }
    assert sent == {
        "filename": "take.wav",
        "title": "Standup",
        "tags": "a,b",
        "transcribe": "false",
    }


async def test_a_patch_at_the_wrong_offset_is_409_and_changes_nothing(
    client: httpx.AsyncClient, data_dir: Path
) -> None:
    url = await create(client)
    assert (await patch(client, url, 0, WAV[:100])).status_code == 204
    before = upload_files(data_dir)
    for wrong in (0, 50, 101, 5000):
        response = await patch(client, url, wrong, WAV[wrong : wrong + 10])
        assert response.status_code == 409
        assert error_code(response) == "conflict"
    assert await offset_of(client, url) == 100
    assert upload_files(data_dir) == before


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "audio/wav"])
async def test_a_patch_without_the_offset_octet_stream_type_is_415(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    url = await create(client)
    headers = {**TUS, "Upload-Offset": "0"}
    if content_type:
        headers["Content-Type"] = content_type
    response = await client.patch(url, content=WAV[:10], headers=headers)
    assert response.status_code == 415
    assert await offset_of(client, url) == 0


@pytest.mark.parametrize("offset", [None, "", "-1", "1.5", "x", "9" * 30])
async def test_a_patch_without_a_valid_upload_offset_is_400(
    client: httpx.AsyncClient, offset: str | None
) -> None:
    url = await create(client)
    headers = dict(CHUNK)
    if offset is not None:
        headers["Upload-Offset"] = offset
    response = await client.patch(url, content=b"x", headers=headers)
    assert response.status_code == 400
    assert await offset_of(client, url) == 0


async def test_a_chunk_past_the_upload_length_is_refused_and_nothing_is_kept(
    client: httpx.AsyncClient, data_dir: Path
) -> None:
    url = await create(client, length=100)

    async def unsized() -> AsyncIterator[bytes]:  # no Content-Length: caught while streaming
        yield b"x" * 60
        yield b"x" * 60

    sized = await patch(client, url, 0, b"x" * 101)
    streamed = await client.patch(url, content=unsized(), headers={**CHUNK, "Upload-Offset": "0"})
    assert (sized.status_code, streamed.status_code) == (413, 413)
    assert await offset_of(client, url) == 0
    assert upload_files(data_dir) == []


async def test_unknown_and_malformed_upload_urls_are_404(client: httpx.AsyncClient) -> None:
    for upload_id in ("0" * 32, "x", "../" + "0" * 32, "A" * 32):
        response = await client.head(f"{UPLOADS}/{upload_id}", headers=TUS)
        assert response.status_code == 404
        assert (await patch(client, f"{UPLOADS}/{upload_id}", 0, b"x")).status_code == 404


async def test_method_override_is_taken_as_the_method(client: httpx.AsyncClient) -> None:
    url = await create(client)
    response = await client.post(
        url,
        content=WAV[:10],
        headers={**CHUNK, "Upload-Offset": "0", "X-HTTP-Method-Override": "PATCH"},
    )
    assert response.status_code == 204
    assert await offset_of(client, url) == 10


# ---- creation -----------------------------------------------------------------------------------


async def test_creation_answers_201_with_location_offset_and_expiry(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(UPLOADS, headers={**TUS, "Upload-Length": str(len(WAV))})
    assert response.status_code == 201
    assert response.headers["Location"].startswith(f"http://testserver{UPLOADS}/")
    assert response.headers["Upload-Offset"] == "0"
    expires = parsedate_to_datetime(response.headers["Upload-Expires"])
    assert datetime.now(UTC) < expires <= datetime.now(UTC) + timedelta(days=1)


async def test_an_upload_longer_than_tus_max_size_is_413_and_not_created(
    client: httpx.AsyncClient, vault: Vault
) -> None:
    response = await client.post(UPLOADS, headers={**TUS, "Upload-Length": str(MAX_BYTES + 1)})
    assert response.status_code == 413
    assert error_code(response) == "too_large"
    assert await vault.uploads.store.list_expired_uploads(datetime.max.replace(tzinfo=UTC)) == []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Upload-Length": "-1"},
        {"Upload-Length": "abc"},
        {"Upload-Length": "0"},
        {"Upload-Length": "10", "Upload-Defer-Length": "1"},
        {"Upload-Length": "10", "Upload-Metadata": "filename !!!"},
        {"Upload-Length": "10", "Upload-Metadata": "filename a,filename b"},
        {"Upload-Length": "10", "Upload-Metadata": f"filename {b64('../x.wav')}"},
        {"Upload-Length": "10", "Upload-Metadata": f"transcribe {b64('maybe')}"},
    ],
)
async def test_creation_refuses_bad_lengths_and_metadata(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await client.post(UPLOADS, headers={**TUS, **headers})
    assert response.status_code == 400, response.text


async def test_creation_refuses_metadata_a_recording_cannot_have(
    client: httpx.AsyncClient,
) -> None:
    headers = {**TUS, "Upload-Length": "10", "Upload-Metadata": metadata_header(title="t" * 1000)}
    assert (await client.post(UPLOADS, headers=headers)).status_code == 422


async def test_creation_with_upload_stores_the_first_chunk(client: httpx.AsyncClient) -> None:
    response = await client.post(
        UPLOADS,
        content=WAV[:500],
        headers={
            **CHUNK,
            "Upload-Length": str(len(WAV)),
            "Upload-Checksum": sha1_header(WAV[:500]),
        },
    )
    assert response.status_code == 201
    assert response.headers["Upload-Offset"] == "500"
    url = response.headers["Location"]
    assert (await patch(client, url, 500, WAV[500:])).status_code == 204
    assert await offset_of(client, url) == len(WAV)


async def test_creation_with_the_whole_upload_makes_the_recording(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        UPLOADS,
        content=WAV,
        headers={
            **CHUNK,
            "Upload-Length": str(len(WAV)),
            "Upload-Metadata": metadata_header(transcribe="false"),
        },
    )
    assert response.status_code == 201
    recording = await client.get(f"/v1/recordings/{response.headers['VoxVault-Recording-Id']}")
    assert recording.json()["sha256"] == hashlib.sha256(WAV).hexdigest()


async def test_creation_with_a_bad_first_chunk_leaves_nothing(
    client: httpx.AsyncClient, vault: Vault, data_dir: Path
) -> None:
    response = await client.post(
        UPLOADS,
        content=WAV[:500],
        headers={**CHUNK, "Upload-Length": str(len(WAV)), "Upload-Checksum": sha1_header(b"no")},
    )
    assert response.status_code == 460
    assert upload_files(data_dir) == []
    await vault.uploads.expire_uploads(datetime.now(UTC) + timedelta(days=2))
    assert await vault.uploads.store.list_expired_uploads(datetime.max.replace(tzinfo=UTC)) == []


# ---- checksum -----------------------------------------------------------------------------------


def sha1_header(data: bytes) -> str:
    return checksum_header("sha1", data)


def checksum_header(algorithm: str, data: bytes) -> str:
    if algorithm == "crc32c":
        digest = google_crc32c.value(data).to_bytes(4, "big")  # computed apart from the server
    else:
        digest = hashlib.new(algorithm, data).digest()
    return f"{algorithm} {base64.b64encode(digest).decode()}"


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "md5", "crc32c"])
async def test_a_chunk_matching_its_checksum_is_kept(
    client: httpx.AsyncClient, algorithm: str
) -> None:
    url = await create(client)
    chunk = WAV[:1000]
    response = await patch(
        client, url, 0, chunk, **{"Upload-Checksum": checksum_header(algorithm, chunk)}
    )
    assert response.status_code == 204
    assert response.headers["Upload-Offset"] == "1000"


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "md5", "crc32c"])
async def test_a_chunk_not_matching_its_checksum_is_460_and_discarded(
    client: httpx.AsyncClient, data_dir: Path, algorithm: str
) -> None:
    url = await create(client)
    assert (await patch(client, url, 0, WAV[:100])).status_code == 204
    before = upload_files(data_dir)
    chunk = WAV[100:1000]
    wrong = checksum_header(algorithm, chunk[:-1] + b"\x00")
    response = await patch(client, url, 100, chunk, **{"Upload-Checksum": wrong})
    assert response.status_code == 460
    assert error_code(response) == "checksum_mismatch"
    assert await offset_of(client, url) == 100
    assert upload_files(data_dir) == before


@pytest.mark.parametrize("value", ["crc32 AAAAAA==", "sha1 !!!", "sha1", "sha1 AAAA"])
async def test_an_unsupported_or_malformed_checksum_is_400(
    client: httpx.AsyncClient, data_dir: Path, value: str
) -> None:
    url = await create(client)
    response = await patch(client, url, 0, WAV[:100], **{"Upload-Checksum": value})
    assert response.status_code == 400
    assert await offset_of(client, url) == 0
    assert upload_files(data_dir) == []


# ---- termination and expiration -----------------------------------------------------------------


async def test_termination_is_204_then_the_upload_is_gone(
    client: httpx.AsyncClient, data_dir: Path
) -> None:
    url = await create(client)
    assert (await patch(client, url, 0, WAV[:1000])).status_code == 204
    assert upload_files(data_dir) != []
    response = await client.delete(url, headers=TUS)
    assert response.status_code == 204
    assert upload_files(data_dir) == []
    assert (await client.head(url, headers=TUS)).status_code == 410
    after = await patch(client, url, 1000, WAV[1000:])
    assert after.status_code == 410
    assert error_code(after) == "gone"
    assert (await client.delete(url, headers=TUS)).status_code == 410


async def test_an_expired_upload_is_410_and_its_bytes_are_swept(
    client: httpx.AsyncClient, vault: Vault, data_dir: Path
) -> None:
    url = await create(client)
    kept = await create(client)
    assert (await patch(client, url, 0, WAV[:1000])).status_code == 204
    assert (await patch(client, kept, 0, WAV[:1000])).status_code == 204
    past = datetime.now(UTC) - timedelta(seconds=1)
    await set_upload_row(vault, url, expires_at=past)
    assert (await client.head(url, headers=TUS)).status_code == 410
    assert (await patch(client, url, 1000, WAV[1000:])).status_code == 410

    assert await vault.uploads.expire_uploads() == 1
    assert (await client.head(url, headers=TUS)).status_code == 404
    assert all(url.rsplit("/", 1)[1] not in str(p) for p in upload_files(data_dir))
    assert len(upload_files(data_dir)) == 1  # the live upload's part
    assert await offset_of(client, kept) == 1000


async def test_expire_uploads_sweeps_everything_once_its_time_is_up(
    client: httpx.AsyncClient, vault: Vault, data_dir: Path
) -> None:
    unfinished = await create(client)
    assert (await patch(client, unfinished, 0, WAV[:10])).status_code == 204
    terminated = await create(client)
    assert (await client.delete(terminated, headers=TUS)).status_code == 204
    finished = await create(client)
    assert (await patch(client, finished, 0, WAV)).status_code == 204

    assert await vault.uploads.expire_uploads(datetime.now(UTC)) == 0
    later = datetime.now(UTC) + timedelta(seconds=vault.settings.upload_ttl + 1)
    assert await vault.uploads.expire_uploads(later) == 3
    assert upload_files(data_dir) == []
    for url in (unfinished, terminated, finished):
        assert (await client.head(url, headers=TUS)).status_code == 404
    assert len((await client.get("/v1/recordings")).json()["items"]) == 1  # the recording stays


async def test_each_chunk_extends_the_expiry(client: httpx.AsyncClient, vault: Vault) -> None:
    url = await create(client)
    soon = datetime.now(UTC) + timedelta(seconds=30)
    await set_upload_row(vault, url, expires_at=soon)
    response = await patch(client, url, 0, WAV[:10])
    assert parsedate_to_datetime(response.headers["Upload-Expires"]) > soon + timedelta(hours=1)


# ---- completion ---------------------------------------------------------------------------------


async def test_the_final_chunk_makes_the_recording_and_head_finds_it_again(
    client: httpx.AsyncClient, data_dir: Path
) -> None:
    url = await create(client, filename="take.wav", title="Standup", tags="a,b")
    offset = 0
    for size in (1, 4000, 10_000, len(WAV)):
        chunk = WAV[offset : offset + size]
        response = await patch(client, url, offset, chunk)
        assert response.status_code == 204, response.text
        offset += len(chunk)
        if offset == len(WAV):
            break
    recording_id = response.headers["VoxVault-Recording-Id"]
    assert response.headers["Upload-Offset"] == str(len(WAV))

    again = await client.head(url, headers=TUS)  # a client that lost that response
    assert again.headers["VoxVault-Recording-Id"] == recording_id
    assert again.headers["Upload-Offset"] == str(len(WAV))
    recording = (await client.get(f"/v1/recordings/{recording_id}")).json()
    assert recording["sha256"] == hashlib.sha256(WAV).hexdigest()
    assert (recording["filename"], recording["title"], recording["tags"]) == (
        "take.wav",
        "Standup",
        ["a", "b"],
    )
    assert recording["status"] == "stored"  # transcribe=false
    assert (await client.get(f"/v1/recordings/{recording_id}/audio")).content == WAV
    assert upload_files(data_dir) == []
    # A retried final chunk (its response lost) changes nothing and names the recording.
    retry = await patch(client, url, len(WAV), b"")
    assert retry.status_code == 204
    assert retry.headers["VoxVault-Recording-Id"] == recording_id
    assert len((await client.get("/v1/recordings")).json()["items"]) == 1


async def test_transcribe_metadata_queues_the_pipeline(client: httpx.AsyncClient) -> None:
    url = await create(client, transcribe="true")
    response = await patch(client, url, 0, WAV)
    recording_id = response.headers["VoxVault-Recording-Id"]
    assert (await client.get(f"/v1/recordings/{recording_id}")).json()["status"] == "queued"


async def test_a_non_audio_upload_is_415_and_leaves_nothing(
    client: httpx.AsyncClient, data_dir: Path
) -> None:
    before = stored_files(data_dir)
    data = b"this is not audio at all " * 100
    url = await create(client, length=len(data))
    assert (await patch(client, url, 0, data[:1000])).status_code == 204
    response = await patch(client, url, 1000, data[1000:])
    assert response.status_code == 415
    assert response.headers["content-type"] == "application/json"
    assert error_code(response) == "unsupported_media"
    assert stored_files(data_dir) == before
    assert (await client.get("/v1/recordings")).json()["items"] == []
    assert (await client.head(url, headers=TUS)).status_code == 410


async def test_a_completion_cut_short_is_finished_once_by_a_later_head(
    client: httpx.AsyncClient, vault: Vault, monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    url = await create(client)
    assert (await patch(client, url, 0, WAV[:1000])).status_code == 204
    real_create = Vault.create_recording_from_blobs

    async def store_away(*args: Any, **kwargs: Any) -> Any:
        raise BackendUnavailable("the blob store is away")

    monkeypatch.setattr(Vault, "create_recording_from_blobs", store_away)
    response = await patch(client, url, 1000, WAV[1000:])
    assert response.status_code == 503
    monkeypatch.setattr(Vault, "create_recording_from_blobs", real_create)

    # Its process may still be at it: the offset is told, no recording yet.
    pending = await client.head(url, headers=TUS)
    assert pending.headers["Upload-Offset"] == str(len(WAV))
    assert "VoxVault-Recording-Id" not in pending.headers
    # Its lease ran out: the next HEAD takes the completion over.
    await set_upload_row(vault, url, updated_at=datetime.now(UTC) - timedelta(minutes=5))
    found = await client.head(url, headers=TUS)
    recording_id = found.headers["VoxVault-Recording-Id"]
    recording = (await client.get(f"/v1/recordings/{recording_id}")).json()
    assert recording["sha256"] == hashlib.sha256(WAV).hexdigest()
    assert (await client.head(url, headers=TUS)).headers["VoxVault-Recording-Id"] == recording_id
    assert len((await client.get("/v1/recordings")).json()["items"]) == 1
    assert upload_files(data_dir) == []


# ---- races and interruptions --------------------------------------------------------------------


async def race_at_start(
    client: httpx.AsyncClient,
    url: str,
    first: bytes,
    second: bytes,
    *,
    sent_before_stall: int,
    declare_length: bool = False,
) -> tuple[httpx.Response, httpx.Response]:
    """Two chunks at offset 0: ``first`` sends ``sent_before_stall`` bytes and stalls until
    ``second``, sent whole meanwhile, has its answer. The answers to both, in that order."""
    first_started, second_answered = anyio.Event(), anyio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield first[:sent_before_stall]
        first_started.set()
        await second_answered.wait()  # the second chunk comes while the first is on its way
        yield first[sent_before_stall:]

    headers = {**CHUNK, "Upload-Offset": "0"}
    if declare_length:
        headers["Content-Length"] = str(len(first))
    results: dict[str, httpx.Response] = {}

    async def send_first() -> None:
        results["first"] = await client.patch(url, content=stalled(), headers=headers)

    # A second chunk that waited for the first (which waits for its answer) would wait forever.
    with within(60, "both chunks' answers"):
        async with anyio.create_task_group() as group:
            group.start_soon(send_first)
            await first_started.wait()
            results["second"] = await patch(client, url, 0, second)
            second_answered.set()
    return results["first"], results["second"]


async def test_two_chunks_racing_at_one_offset_one_wins_one_is_409(
    client: httpx.AsyncClient, data_dir: Path
) -> None:
    url = await create(client)
    first, second = WAV[:1000], bytes(reversed(WAV[:1000]))
    results = await race_at_start(client, url, first, second, sent_before_stall=10)
    statuses = sorted(r.status_code for r in results)
    assert statuses == [204, 409]
    winner = first if results[0].status_code == 204 else second
    assert await offset_of(client, url) == 1000
    parts = upload_files(data_dir)
    assert [p.read_bytes() for p in parts] == [winner]


async def raw_patch(
    vault: Vault, url: str, offset: int, pieces: Sequence[bytes], headers: dict[str, str]
) -> None:
    """A PATCH whose client sends ``pieces`` and then goes away before the end of the body."""
    path = httpx.URL(url).path
    declared = sum(len(p) for p in pieces) + 1000
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "PATCH",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"content-length", str(declared).encode()),
            (b"upload-offset", str(offset).encode()),
            *((k.lower().encode(), v.encode()) for k, v in {**CHUNK, **headers}.items()),
        ],
        "client": ("127.0.0.1", 12345),
        "server": ("testserver", 80),
        "state": {},
    }
    messages = [{"type": "http.request", "body": p, "more_body": True} for p in pieces]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        pass

    await create_app(vault)(scope, receive, send)


async def test_a_chunk_cut_short_keeps_the_bytes_that_arrived(
    client: httpx.AsyncClient, vault: Vault
) -> None:
    url = await create(client)
    await raw_patch(vault, url, 0, [WAV[:300], WAV[300:700]], {})
    assert await offset_of(client, url) == 700
    assert (await patch(client, url, 700, WAV[700:])).status_code == 204


async def test_a_checksummed_chunk_cut_short_is_discarded(
    client: httpx.AsyncClient, vault: Vault, data_dir: Path
) -> None:
    url = await create(client)
    await raw_patch(vault, url, 0, [WAV[:300]], {"Upload-Checksum": sha1_header(WAV[:1300])})
    assert await offset_of(client, url) == 0
    assert upload_files(data_dir) == []


# ---- two API processes over PostgreSQL and S3 ---------------------------------------------------


@pytest.fixture
def two_api_processes(tmp_path: Path) -> Iterator[tuple[LiveServer, LiveServer, S3Bucket]]:
    with postgres_database() as database_url, new_bucket() as bucket:
        env = child_environment(
            {"VOXVAULT_DATABASE_URL": database_url, "VOXVAULT_BLOB_URL": bucket.url}
        )
        first = LiveServer(tmp_path / "api-1", env=env, args=["--workers", "0"])
        try:
            second = LiveServer(tmp_path / "api-2", env=env, args=["--workers", "0"])
            try:
                yield first, second, bucket
            finally:
                second.stop()
        finally:
            first.stop()


def test_an_upload_begun_on_one_process_continues_on_another(
    two_api_processes: tuple[LiveServer, LiveServer, S3Bucket],
) -> None:
    first, second, bucket = two_api_processes
    with httpx.Client(timeout=60) as http:
        created = http.post(
            f"{first.url}{UPLOADS}",
            headers={
                **TUS,
                "Upload-Length": str(len(WAV)),
                "Upload-Metadata": metadata_header(filename="two.wav", transcribe="false"),
            },
        )
        assert created.status_code == 201
        path = httpx.URL(created.headers["Location"]).path
        one = http.patch(
            f"{first.url}{path}", content=WAV[:5000], headers={**CHUNK, "Upload-Offset": "0"}
        )
        assert one.status_code == 204
        state = http.head(f"{second.url}{path}", headers=TUS)
        assert state.headers["Upload-Offset"] == "5000"
        stale = http.patch(
            f"{second.url}{path}", content=WAV[:5000], headers={**CHUNK, "Upload-Offset": "0"}
        )
        assert stale.status_code == 409
        last = http.patch(
            f"{second.url}{path}",
            content=WAV[5000:],
            headers={**CHUNK, "Upload-Offset": "5000", "Upload-Checksum": sha1_header(WAV[5000:])},
        )
        assert last.status_code == 204, last.text
        recording_id = last.headers["VoxVault-Recording-Id"]
        found = http.head(f"{first.url}{path}", headers=TUS)
        assert found.headers["VoxVault-Recording-Id"] == recording_id
        audio = http.get(f"{first.url}/v1/recordings/{recording_id}/audio")
        assert audio.content == WAV
        listed = http.get(f"{second.url}/v1/recordings/{recording_id}").json()
        assert (listed["sha256"], listed["filename"]) == (
            hashlib.sha256(WAV).hexdigest(),
            "two.wav",
        )
    # The parts are gone from the object store: only the recording's original is left.
    prefix = f"{bucket.prefix}/" if bucket.prefix else ""
    assert bucket.object_names() == [f"{prefix}recordings/{recording_id}/original"]
    assert bucket.pending_uploads() == []


# ---- the recording's sha256 -------------------------------------------------------------------


@pytest.mark.parametrize("seen_by_this_process", [True, False])
async def test_the_recording_is_hashed_as_chunks_arrive_or_from_its_parts(
    client: httpx.AsyncClient, seen_by_this_process: bool
) -> None:
    from voxvault import uploads

    url = await create(client)
    third = len(WAV) // 3
    assert (await patch(client, url, 0, WAV[:third])).status_code == 204
    if not seen_by_this_process:
        # The next chunk comes through another process: this one's running hash is of no use.
        uploads._recent.forget(url.rsplit("/", 1)[1])
    assert (await patch(client, url, third, WAV[third : 2 * third])).status_code == 204
    response = await patch(client, url, 2 * third, WAV[2 * third :])
    assert response.status_code == 204
    recording_id = response.headers["VoxVault-Recording-Id"]
    recording = (await client.get(f"/v1/recordings/{recording_id}")).json()
    assert recording["sha256"] == hashlib.sha256(WAV).hexdigest()
    assert recording["size_bytes"] == len(WAV)
    assert (await client.get(f"/v1/recordings/{recording_id}/audio")).content == WAV


async def test_bytes_past_the_offset_are_dropped_by_the_next_chunk(
    client: httpx.AsyncClient, data_dir: Path
) -> None:
    """What a process killed between writing a chunk and recording it leaves: bytes the offset
    does not cover. The next chunk goes at the offset, and the recording is exactly the file."""
    url = await create(client)
    half = len(WAV) // 2
    assert (await patch(client, url, 0, WAV[:half])).status_code == 204
    [grown] = upload_files(data_dir)
    with grown.open("ab") as handle:
        handle.write(b"never recorded" * 1000)
    assert await offset_of(client, url) == half
    response = await patch(client, url, half, WAV[half:])
    assert response.status_code == 204, response.text
    recording_id = response.headers["VoxVault-Recording-Id"]
    assert (await client.get(f"/v1/recordings/{recording_id}/audio")).content == WAV
    recording = (await client.get(f"/v1/recordings/{recording_id}")).json()
    assert recording["sha256"] == hashlib.sha256(WAV).hexdigest()


async def test_an_upload_whose_bytes_went_missing_is_503_not_stored(
    client: httpx.AsyncClient, data_dir: Path
) -> None:
    url = await create(client)
    half = len(WAV) // 2
    assert (await patch(client, url, 0, WAV[:half])).status_code == 204
    [grown] = upload_files(data_dir)
    grown.write_bytes(WAV[:100])  # the disk lost what the offset says is there
    response = await patch(client, url, half, WAV[half:])
    assert response.status_code == 503
    assert error_code(response) == "backend_unavailable"
    assert await offset_of(client, url) == half
    assert grown.read_bytes() == WAV[:100]


def recent_upload(upload_id: str, offset: int, workspace: str = "default") -> Upload:
    now = datetime.now(UTC)
    return Upload(
        id=upload_id,
        workspace=workspace,
        length=100,
        offset=offset,
        metadata={},
        status=UploadStatus.ACTIVE,
        recording_id="r",
        created_at=now,
        updated_at=now,
        expires_at=now + timedelta(hours=1),
    )


def test_a_running_hash_is_used_only_at_the_offset_it_was_made_for() -> None:
    from voxvault.uploads import _RecentUploads

    hashes = _RecentUploads(capacity=2)
    fresh = hashes.resume("u1", 0)
    assert fresh is not None
    fresh.update(b"abc")
    hashes.advance(recent_upload("u1", 3), fresh)
    assert hashes.sha256("u1", 3) == hashlib.sha256(b"abc").hexdigest()
    assert hashes.sha256("u1", 4) is None
    assert hashes.resume("u1", 5) is None  # another process stored bytes 3..5
    resumed = hashes.resume("u1", 3)
    assert resumed is not None
    resumed.update(b"lost race")  # a copy: the kept hash is untouched
    assert hashes.sha256("u1", 3) == hashlib.sha256(b"abc").hexdigest()
    hashes.advance(recent_upload("u1", 12), None)  # stored without a hash: none kept
    assert hashes.resume("u1", 12) is None
    for name in ("u2", "u3", "u4"):
        hashes.advance(recent_upload(name, 1), hashlib.sha256(b"x"))
    assert hashes.sha256("u2", 1) is None  # the least recently used went first
    assert hashes.sha256("u4", 1) is not None


def test_a_remembered_row_is_used_only_for_its_workspace_offset_and_while_live() -> None:
    from voxvault.uploads import _RecentUploads

    recent = _RecentUploads(capacity=4)
    row = recent_upload("u1", 10)
    recent.advance(row, None)
    assert recent.row("default", "u1", 10) == row
    assert recent.row("other", "u1", 10) is None
    assert recent.row("default", "u1", 11) is None
    recent.advance(replace(row, status=UploadStatus.COMPLETING), None)
    assert recent.row("default", "u1", 10) is None
    recent.advance(replace(row, expires_at=datetime.now(UTC) - timedelta(seconds=1)), None)
    assert recent.row("default", "u1", 10) is None
    recent.forget("u1")
    assert recent.row("default", "u1", 10) is None


async def test_a_chunk_after_another_process_terminated_the_upload_is_410(
    client: httpx.AsyncClient, vault: Vault, data_dir: Path
) -> None:
    """This process remembers the upload as active; the row, terminated elsewhere, decides."""
    url = await create(client)
    half = len(WAV) // 2
    assert (await patch(client, url, 0, WAV[:half])).status_code == 204
    await set_upload_row(vault, url, status="terminated", error="terminated by the client")
    response = await patch(client, url, half, WAV[half:])
    assert response.status_code == 410
    assert [p.stat().st_size for p in upload_files(data_dir)] == [half]


async def test_a_chunk_after_another_process_moved_the_upload_is_409(
    client: httpx.AsyncClient, vault: Vault, data_dir: Path
) -> None:
    url = await create(client)
    half = len(WAV) // 2
    assert (await patch(client, url, 0, WAV[:half])).status_code == 204
    [grown] = upload_files(data_dir)
    # Another process stored the next 100 bytes (the file and the row both moved on).
    with grown.open("ab") as handle:
        handle.write(WAV[half : half + 100])
    await set_upload_row(
        vault, url, upload_offset=half + 100, parts=[{"name": "grown", "size": half + 100}]
    )
    response = await patch(client, url, half, WAV[half:])
    assert response.status_code == 409
    assert response.json()["error"]["detail"]["upload_offset"] == half + 100
    assert grown.read_bytes() == WAV[: half + 100]
    rest = await patch(client, url, half + 100, WAV[half + 100 :])
    assert rest.status_code == 204
    recording_id = rest.headers["VoxVault-Recording-Id"]
    assert (await client.get(f"/v1/recordings/{recording_id}/audio")).content == WAV

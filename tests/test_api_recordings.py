"""/v1/recordings: upload (raw and multipart, audio and video), list, read, change, delete.

Every test runs on the embedded stack and on the scale-out one (``tests/stacks.py``).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from tests.conftest import LiveServer, stored_files
from tests.media import encode_audio, encode_video, wav_bytes
from tests.stacks import Stack, client, stack, wait_for_jobs_to_finish
from voxvault import RecordingStatus, Vault

pytestmark = pytest.mark.anyio
__all__ = ["client", "stack"]  # the fixtures that run each test on both stacks

RECORDING_FIELDS = {
    "id", "status", "title", "filename", "content_type", "size_bytes", "sha256", "duration_s",
    "sample_rate", "channels", "codec", "tags", "metadata", "created_at", "updated_at", "error",
}  # fmt: skip


async def upload(
    client: httpx.AsyncClient, data: bytes, content_type: str = "audio/wav", **params: Any
) -> dict[str, Any]:
    response = await client.post(
        "/v1/recordings", content=data, params=params, headers={"Content-Type": content_type}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_raw_upload_returns_the_record_with_exactly_the_contract_fields(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    before = stack.stored_keys()
    data = wav_bytes(seconds=2.0, rate=16000)
    body = await upload(
        client, data, filename="take one.wav", title="Take 1", tag=["a", "b"], transcribe="false"
    )
    assert set(body) == RECORDING_FIELDS
    assert (body["status"], body["error"]) == ("stored", None)
    assert (body["title"], body["filename"], body["tags"]) == ("Take 1", "take one.wav", ["a", "b"])
    assert body["size_bytes"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["duration_s"] == pytest.approx(2.0, abs=0.01)
    assert (body["sample_rate"], body["channels"], body["codec"]) == (16000, 1, "pcm_s16le")
    assert body["content_type"] == "audio/wav"
    assert body["metadata"] == {}
    # The bytes live under the server-made id, never under the client's filename.
    assert set(stack.stored_keys()) - set(before) == {f"recordings/{body['id']}/original"}
    assert (await client.get(f"/v1/recordings/{body['id']}")).json() == body


async def test_the_pipeline_is_queued_by_default(client: httpx.AsyncClient, stack: Stack) -> None:
    body = await upload(client, wav_bytes(seconds=1.0), filename="tone.wav")
    assert (body["status"], body["error"]) == ("queued", None)
    jobs = (await client.get(f"/v1/recordings/{body['id']}/jobs")).json()["items"]
    assert len(jobs) == 1
    if not stack.runs_jobs:
        assert jobs[0]["status"] == "queued"
        return
    (job,) = await wait_for_jobs_to_finish(client, body["id"])
    assert (job["id"], job["status"]) == (jobs[0]["id"], "succeeded"), job
    recording = (await client.get(f"/v1/recordings/{body['id']}")).json()
    assert recording["status"] == "ready"
    transcript = await client.get(f"/v1/recordings/{body['id']}/transcript")
    assert (transcript.status_code, transcript.json()["job_id"]) == (200, job["id"])


async def test_multipart_upload_with_fields_before_the_file(client: httpx.AsyncClient) -> None:
    data = wav_bytes()
    response = await client.post(
        "/v1/recordings",
        params={"transcribe": "false"},
        data={"title": "Board call", "tags": "board, q3", "metadata": json.dumps({"room": 4})},
        files={"file": ("call.wav", data, "audio/wav")},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["title"], body["filename"], body["tags"]) == (
        "Board call",
        "call.wav",
        ["board", "q3"],
    )
    assert body["metadata"] == {"room": 4}
    assert (await client.get(f"/v1/recordings/{body['id']}/audio")).content == data


@pytest.mark.parametrize(
    ("container", "codec", "expected_codec", "expected_type"),
    [
        ("mp3", "libmp3lame", "mp3", "audio/mpeg"),
        ("ogg", "libopus", "opus", "audio/ogg"),
        ("flac", "flac", "flac", "audio/flac"),
        ("ipod", "aac", "aac", "audio/mp4"),
    ],
)
async def test_compressed_audio_is_probed(
    client: httpx.AsyncClient, container: str, codec: str, expected_codec: str, expected_type: str
) -> None:
    data = encode_audio(container, codec, seconds=1.0, rate=48000)
    body = await upload(client, data, content_type="application/octet-stream", transcribe="false")
    assert body["codec"] == expected_codec
    assert body["content_type"] == expected_type  # from the probe, the client gave none
    assert body["sample_rate"] == 48000
    assert body["duration_s"] == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize(
    ("container", "codec"), [("mp4", "aac"), ("mov", "aac"), ("matroska", "aac"), ("webm", "opus")]
)
async def test_video_containers_are_accepted_by_their_audio_track(
    client: httpx.AsyncClient, container: str, codec: str
) -> None:
    data = encode_video(seconds=1.0, container=container)
    body = await upload(
        client, data, content_type="video/mp4", filename=f"clip.{container}", transcribe="false"
    )
    assert body["codec"] == codec
    assert body["sample_rate"] == 48000
    assert body["duration_s"] == pytest.approx(1.0, abs=0.1)
    assert body["content_type"] == "video/mp4"


async def test_video_without_audio_is_refused(client: httpx.AsyncClient, stack: Stack) -> None:
    before = stack.stored_blobs()
    response = await client.post("/v1/recordings", content=encode_video(with_audio=False))
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media"
    assert "no audio track" in response.json()["error"]["message"]
    assert stack.stored_blobs() == before


def own_tag() -> str:
    """A tag no other test uses: lists on a shared stack are filtered by it."""
    return f"t{uuid.uuid4().hex[:12]}"


async def test_list_pages_newest_first_with_cursor(client: httpx.AsyncClient) -> None:
    tag = own_tag()
    ids = [
        (await upload(client, wav_bytes(0.2), title=f"r{i}", tag=[tag], transcribe="false"))["id"]
        for i in range(7)
    ]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3, "tag": tag, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/recordings", params=params)).json()
        assert set(page) == {"items", "next_cursor"}
        assert len(page["items"]) <= 3
        seen += [item["id"] for item in page["items"]]
        assert len(seen) <= len(ids), f"the pages never end: {seen}"
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))


async def test_list_filters_by_tag_status_and_time(client: httpx.AsyncClient) -> None:
    alpha, beta = own_tag(), own_tag()
    first = await upload(client, wav_bytes(0.2), tag=[alpha], transcribe="false")
    second = await upload(client, wav_bytes(0.2), tag=[alpha, beta], transcribe="false")
    # A transcript makes the second one ready (no pipeline runs, so no status moves meanwhile).
    put = await client.put(f"/v1/recordings/{second['id']}/transcript", json={"segments": []})
    assert put.status_code == 201, put.text

    async def ids(**params: Any) -> list[str]:
        response = await client.get("/v1/recordings", params={"tag": alpha, **params})
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    assert await ids() == [second["id"], first["id"]]
    assert await ids(tag=beta) == [second["id"]]
    assert await ids(status="stored") == [first["id"]]
    assert await ids(status="ready") == [second["id"]]
    assert await ids(status="queued") == []
    boundary = first["created_at"]
    assert await ids(created_after=boundary) == [second["id"]]
    assert await ids(created_before=second["created_at"]) == [first["id"]]
    later = (datetime.fromisoformat(second["created_at"]) + timedelta(seconds=1)).isoformat()
    assert await ids(created_after=later) == []


@pytest.mark.parametrize(
    "params",
    [{"status": "nonsense"}, {"limit": 0}, {"limit": 501}, {"created_after": "yesterday"}],
)
async def test_bad_list_parameters_are_422(
    client: httpx.AsyncClient, params: dict[str, Any]
) -> None:
    response = await client.get("/v1/recordings", params=params)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_failed"


async def test_bad_cursor_is_400(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/recordings", params={"cursor": "not-a-cursor"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"


async def test_patch_changes_title_tags_and_metadata(client: httpx.AsyncClient) -> None:
    old_tag = own_tag()
    created = await upload(client, wav_bytes(0.2), title="old", tag=[old_tag], transcribe="false")
    url = f"/v1/recordings/{created['id']}"
    response = await client.patch(url, json={"title": "new", "metadata": {"speakers": 2}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["title"], body["tags"], body["metadata"]) == ("new", [old_tag], {"speakers": 2})
    assert body["updated_at"] > created["updated_at"]
    body = (await client.patch(url, json={"tags": ["y", "z", "y"]})).json()
    assert body["tags"] == ["y", "z"]
    assert (await client.get(url)).json() == body
    listed = (await client.get("/v1/recordings", params={"tag": old_tag})).json()["items"]
    assert listed == []


@pytest.mark.parametrize(
    "patch",
    [
        {"size_bytes": 1},
        {"metadata": [1, 2]},
        {"metadata": "text"},
        {"tags": ["has\nnewline"]},
        {"tags": "not-a-list"},
        {"title": ""},
        {"title": "x" * 501},
        {"metadata": {"big": "x" * 70_000}},
    ],
)
async def test_invalid_patch_is_422_and_changes_nothing(
    client: httpx.AsyncClient, patch: dict[str, Any]
) -> None:
    created = await upload(client, wav_bytes(0.2), title="kept", transcribe="false")
    url = f"/v1/recordings/{created['id']}"
    response = await client.patch(url, json=patch)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_failed"
    assert (await client.get(url)).json() == created


async def test_delete_removes_every_byte_transcript_and_artifact(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    tag = own_tag()
    before_keys = set(stack.stored_keys())
    before_usage = (await client.get("/v1/storage-info")).json()["usage"]
    kept = await upload(client, wav_bytes(0.2), tag=[tag], transcribe="false")
    gone = await upload(client, wav_bytes(0.3), tag=[tag], transcribe="false")
    url = f"/v1/recordings/{gone['id']}"
    segments = [{"start": 0, "end": 0.2, "text": "hi"}]
    assert (await client.put(f"{url}/transcript", json={"segments": segments})).status_code == 201
    assert (await client.put(f"{url}/artifacts/summary.json", content=b"{}")).status_code == 200

    response = await client.delete(url)
    assert response.status_code == 204
    assert response.content == b""
    for path in ("", "/audio", "/transcript", "/artifacts", "/artifacts/summary.json"):
        assert (await client.get(f"{url}{path}")).status_code == 404, path
    assert (await client.delete(url)).status_code == 404
    assert set(stack.stored_keys()) - before_keys == {f"recordings/{kept['id']}/original"}
    listed = (await client.get("/v1/recordings", params={"tag": tag})).json()["items"]
    assert [item["id"] for item in listed] == [kept["id"]]
    usage = (await client.get("/v1/storage-info")).json()["usage"]
    counted = ("recordings", "transcripts", "artifacts")
    assert [usage[k] - before_usage[k] for k in counted] == [1, 0, 0]


# Embedded only: it plays the crash through the test process's Vault on the data directory.
@pytest.mark.parametrize("stack", ["embedded"], indirect=True)
async def test_a_delete_cut_short_by_a_crash_is_finished_at_start(
    client: httpx.AsyncClient, vault: Vault, data_dir: Path
) -> None:
    kept = await upload(client, wav_bytes(0.2), transcribe="false")
    cut = await upload(client, wav_bytes(0.2), transcribe="false")
    # What a crash right after the tombstone leaves: an invisible row, its bytes still on disk.
    await vault.metadata.update_recording(
        vault.workspace, cut["id"], status=RecordingStatus.DELETING
    )
    assert (await client.get(f"/v1/recordings/{cut['id']}")).status_code == 404
    assert len(stored_files(data_dir)) == 2

    assert await vault.finish_interrupted_deletes() == 1
    assert stored_files(data_dir) == [data_dir / "blobs/recordings" / kept["id"] / "original"]
    assert await vault.metadata.list_tombstones() == []
    assert await vault.finish_interrupted_deletes() == 0


async def test_the_server_finishes_interrupted_deletes_when_it_starts(
    vault: Vault, data_dir: Path
) -> None:
    recording = await vault.add_file(_write(data_dir.parent / "a.wav", wav_bytes(0.2)))
    await vault.metadata.update_recording(
        vault.workspace, recording.id, status=RecordingStatus.DELETING
    )
    assert len(stored_files(data_dir)) == 1
    server = await anyio.to_thread.run_sync(LiveServer, data_dir)
    try:
        assert stored_files(data_dir) == []
        assert await vault.metadata.list_tombstones() == []
    finally:
        await anyio.to_thread.run_sync(server.stop)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path

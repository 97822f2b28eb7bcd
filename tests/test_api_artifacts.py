"""Artifacts: any bytes under a safe name, with their content type kept.

Every test runs on the embedded stack and on the scale-out one (``tests/stacks.py``).
"""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from tests.media import wav_bytes
from tests.stacks import Stack, client, stack

pytestmark = pytest.mark.anyio
__all__ = ["client", "stack"]  # the fixtures that run each test on both stacks


@pytest.fixture
async def recording_id(client: httpx.AsyncClient) -> str:
    response = await client.post(
        "/v1/recordings", params={"transcribe": "false"}, content=wav_bytes(0.3)
    )
    assert response.status_code == 201
    recording_id: str = response.json()["id"]
    return recording_id


async def test_put_get_list_delete(
    client: httpx.AsyncClient, recording_id: str, stack: Stack
) -> None:
    base = f"/v1/recordings/{recording_id}/artifacts"
    summary = b'{"summary": "short"}'
    put = await client.put(
        f"{base}/summary.json", content=summary, headers={"Content-Type": "application/json"}
    )
    assert put.status_code == 200, put.text
    record = put.json()
    assert set(record) == {"name", "content_type", "size_bytes", "sha256", "created_at"}
    assert (record["name"], record["content_type"]) == ("summary.json", "application/json")
    assert (record["size_bytes"], record["sha256"]) == (
        len(summary),
        hashlib.sha256(summary).hexdigest(),
    )

    blob = os.urandom(300_000)
    await client.put(f"{base}/scores.bin", content=blob)
    got = await client.get(f"{base}/summary.json")
    assert got.content == summary
    assert got.headers["content-type"] == "application/json"
    binary = await client.get(f"{base}/scores.bin")
    assert binary.content == blob
    assert binary.headers["content-type"] == "application/octet-stream"
    part = await client.get(f"{base}/scores.bin", headers={"Range": "bytes=1000-1999"})
    assert (part.status_code, part.content) == (206, blob[1000:2000])

    listed = (await client.get(base)).json()["items"]
    assert [a["name"] for a in listed] == ["scores.bin", "summary.json"]
    assert listed[1] == record

    assert (await client.delete(f"{base}/scores.bin")).status_code == 204
    assert (await client.get(f"{base}/scores.bin")).status_code == 404
    assert (await client.delete(f"{base}/scores.bin")).status_code == 404
    prefix = f"recordings/{recording_id}/artifacts/"
    assert [key for key in stack.stored_keys() if key.startswith(prefix)] == [
        f"{prefix}summary.json"
    ]


async def test_replace_keeps_created_at_and_serves_new_bytes(
    client: httpx.AsyncClient, recording_id: str
) -> None:
    url = f"/v1/recordings/{recording_id}/artifacts/notes.md"
    first = (
        await client.put(url, content=b"# v1", headers={"Content-Type": "text/markdown"})
    ).json()
    second = (
        await client.put(
            url, content=b"# version two", headers={"Content-Type": "text/markdown; charset=utf-8"}
        )
    ).json()
    assert second["created_at"] == first["created_at"]
    assert second["size_bytes"] == len(b"# version two")
    response = await client.get(url)
    assert response.content == b"# version two"
    assert response.headers["content-type"] == "text/markdown; charset=utf-8"


async def test_empty_artifact_is_allowed(client: httpx.AsyncClient, recording_id: str) -> None:
    url = f"/v1/recordings/{recording_id}/artifacts/empty.txt"
    assert (await client.put(url, content=b"")).json()["size_bytes"] == 0
    response = await client.get(url)
    assert (response.status_code, response.content) == (200, b"")


@pytest.mark.parametrize(
    "name",
    ["a%2Fb", "a/b", "%2E%2E", "...", ".hidden", "a..b", "x" * 129, "sp ace", "%00", "-dash"],
)
async def test_unsafe_names_are_400_and_store_nothing(
    client: httpx.AsyncClient, recording_id: str, stack: Stack, name: str
) -> None:
    before = stack.stored_blobs()
    response = await client.put(f"/v1/recordings/{recording_id}/artifacts/{name}", content=b"x")
    assert response.status_code == 400, (name, response.text)
    assert response.json()["error"]["code"] == "bad_request"
    assert stack.stored_blobs() == before
    assert (await client.get(f"/v1/recordings/{recording_id}/artifacts")).json()["items"] == []


async def test_invalid_content_type_is_400(client: httpx.AsyncClient, recording_id: str) -> None:
    url = f"/v1/recordings/{recording_id}/artifacts/a.txt"
    response = await client.put(url, content=b"x", headers={"Content-Type": "not a type"})
    assert response.status_code == 400


async def test_artifact_of_unknown_recording_is_404(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    before = stack.stored_blobs()
    response = await client.put(f"/v1/recordings/{'0' * 32}/artifacts/a.txt", content=b"x")
    assert response.status_code == 404
    assert stack.stored_blobs() == before

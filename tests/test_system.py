"""Health, readiness, storage accounting and the API's own documentation."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.media import wav_bytes
from voxvault import Vault
from voxvault.metadata.sql import SqlMetadataStore

pytestmark = pytest.mark.anyio


async def _upload(client: httpx.AsyncClient, data: bytes, filename: str) -> dict[str, Any]:
    response = await client.post(
        f"/v1/recordings?filename={filename}",
        content=data,
        headers={"Content-Type": "audio/wav"},
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def _usage(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/v1/storage-info")
    assert response.status_code == 200, response.text
    usage: dict[str, Any] = response.json()["usage"]
    return usage


def _assert_unavailable(response: httpx.Response, mentions: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == "5"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "detail"}
    assert body["error"]["code"] == "backend_unavailable"
    assert mentions in body["error"]["message"]


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_when_every_backend_answers(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


async def test_readyz_is_503_when_the_blob_store_cannot_be_written(
    client: httpx.AsyncClient, data_dir: Path
) -> None:
    staging = data_dir / "blobs" / ".staging"
    assert staging.is_dir()
    staging.rmdir()
    staging.write_bytes(b"in the way")
    response = await client.get("/readyz")
    _assert_unavailable(response, "blob directory")
    # /healthz speaks of the process only, so it stays 200.
    health = await client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    # The failed probe left nothing behind, and the service recovers once the directory is back.
    assert staging.read_bytes() == b"in the way"
    staging.unlink()
    staging.mkdir()
    recovered = await client.get("/readyz")
    assert recovered.status_code == 200
    assert recovered.json() == {"status": "ready"}
    assert list(staging.iterdir()) == []


async def test_readyz_is_503_when_the_database_cannot_be_opened(
    client: httpx.AsyncClient, vault: Vault, data_dir: Path
) -> None:
    assert (await client.get("/readyz")).status_code == 200
    # Drop pooled connections, then put a directory where the database file was: every new
    # connection now fails with "unable to open database file".
    assert isinstance(vault.metadata, SqlMetadataStore)
    await vault.metadata.engine.dispose()
    database = data_dir / "voxvault.db"
    for name in ("voxvault.db", "voxvault.db-wal", "voxvault.db-shm"):
        (data_dir / name).unlink(missing_ok=True)
    database.mkdir()
    response = await client.get("/readyz")
    _assert_unavailable(response, "database")
    # Let aiosqlite's worker thread of the failed connection finish while the loop still runs.
    await anyio.sleep(0.05)
    shutil.rmtree(database)
    recovered = await client.get("/readyz")
    assert recovered.status_code == 200
    assert recovered.json() == {"status": "ready"}


async def test_storage_info_names_the_backends(client: httpx.AsyncClient, data_dir: Path) -> None:
    response = await client.get("/v1/storage-info")
    assert response.status_code == 200
    info = response.json()
    assert set(info) == {"database", "blobs", "usage"}
    assert info["database"] == {
        "backend": "sqlite",
        "url": f"sqlite:///{data_dir.resolve()}/voxvault.db",
    }
    blobs = info["blobs"]
    assert blobs["backend"] == "local"
    assert blobs["location"] == str((data_dir / "blobs").resolve())
    assert isinstance(blobs["free_bytes"], int)
    assert blobs["free_bytes"] > 0
    assert blobs["total_bytes"] >= blobs["free_bytes"]
    assert info["usage"] == {
        "recordings": 0,
        "recording_bytes": 0,
        "transcripts": 0,
        "artifacts": 0,
        "artifact_bytes": 0,
    }


async def test_storage_info_counts_what_was_stored_and_deleted(client: httpx.AsyncClient) -> None:
    first_audio = wav_bytes(seconds=1.0)
    second_audio = wav_bytes(seconds=0.5, rate=8000)
    first = await _upload(client, first_audio, "a.wav")
    second = await _upload(client, second_audio, "b.wav")
    assert first["size_bytes"] == len(first_audio)
    assert second["size_bytes"] == len(second_audio)

    transcript = {"language": "en", "segments": [{"start": 0.0, "end": 0.9, "text": "hello"}]}
    for _ in range(2):  # two versions of one transcript
        put = await client.put(f"/v1/recordings/{first['id']}/transcript", json=transcript)
        assert put.status_code == 201, put.text
    notes = b"speaker 1 said hello\n"
    artifact = await client.put(
        f"/v1/recordings/{first['id']}/artifacts/notes.txt",
        content=notes,
        headers={"Content-Type": "text/plain"},
    )
    assert artifact.status_code == 200, artifact.text
    assert artifact.json()["size_bytes"] == len(notes)

    listed = (await client.get(f"/v1/recordings/{first['id']}/artifacts")).json()["items"]
    assert len(listed) == 6  # notes.txt and the five transcript files
    assert await _usage(client) == {
        "recordings": 2,
        "recording_bytes": len(first_audio) + len(second_audio),
        "transcripts": 2,
        "artifacts": 6,
        "artifact_bytes": sum(item["size_bytes"] for item in listed),
    }

    deleted = await client.delete(f"/v1/recordings/{first['id']}")
    assert deleted.status_code == 204
    assert await _usage(client) == {
        "recordings": 1,
        "recording_bytes": len(second_audio),
        "transcripts": 0,
        "artifacts": 0,
        "artifact_bytes": 0,
    }

    deleted = await client.delete(f"/v1/recordings/{second['id']}")
    assert deleted.status_code == 204
    assert await _usage(client) == {
        "recordings": 0,
        "recording_bytes": 0,
        "transcripts": 0,
        "artifacts": 0,
        "artifact_bytes": 0,
    }


async def test_docs_page_is_served(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<html" in response.text.lower()
    assert "swagger-ui" in response.text
    assert "/openapi.json" in response.text


async def test_openapi_lists_the_public_paths(client: httpx.AsyncClient) -> None:
    # Only the path listing is checked here; operation ids have their own test below.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Duplicate Operation ID", category=UserWarning)
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["info"]["title"] == "VoxVault"
    paths = schema["paths"]
    for path in (
        "/v1/recordings",
        "/v1/recordings/{recording_id}/audio",
        "/v1/recordings/{recording_id}/transcript",
        "/v1/storage-info",
        "/readyz",
        "/healthz",
    ):
        assert path in paths, f"{path} missing from the OpenAPI document"
    assert {"get", "post"} <= set(paths["/v1/recordings"])
    assert {"get", "put"} <= set(paths["/v1/recordings/{recording_id}/transcript"])
    assert "get" in paths["/v1/recordings/{recording_id}/audio"]


async def test_openapi_operation_ids_are_unique(client: httpx.AsyncClient) -> None:
    """OpenAPI requires unique operationIds; client generators break on duplicates.

    FastAPI also warns while building the document, which this suite turns into an error.
    """
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    operation_ids = [
        operation["operationId"]
        for path_item in response.json()["paths"].values()
        for operation in path_item.values()
    ]
    duplicates = sorted({oid for oid in operation_ids if operation_ids.count(oid) > 1})
    assert duplicates == []

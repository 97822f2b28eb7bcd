"""``voxvault ingest --server`` and ``VaultClient.upload_resumable`` against a real server: tus
uploads in small checksummed chunks, resumed by the next run after the server went away, a
damaged chunk refused and sent again, and the plain upload still there with ``--no-resumable``.

The interrupted upload goes through a TCP proxy whose address stays put while the server behind
it is restarted, so that the URL the first run stored still leads to the upload; the proxy also
counts the bytes the second run sent.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import LiveServer, run_voxvault, within
from tests.faults import TcpProxy
from tests.media import speak
from voxvault.client import VaultClient
from voxvault.tus_client import UploadUrlStore

CHUNK_BYTES = 32 * 1024
CHUNKS_BEFORE_THE_STOP = 4
# The client waits for each chunk's answer as long as the server takes: the test does not.
UPLOAD_TIMEOUT_S = 120
TEXT = (
    "An upload that stops half way is not lost. The next run finds the address it kept, "
    "asks the server how much arrived, and sends only the rest of the recording."
)


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = speak(TEXT, tmp_path_factory.mktemp("speech") / "resumable.wav")
    assert path.stat().st_size > (CHUNKS_BEFORE_THE_STOP + 3) * CHUNK_BYTES
    return path


@pytest.fixture
def server(data_dir: Path) -> Iterator[LiveServer]:
    started = LiveServer(data_dir, args=["--workers", "0"])
    try:
        yield started
    finally:
        started.stop()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_ingest(
    server_url: str, path: Path, store: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return run_voxvault(
        "--data-dir",
        str(store.parent / "unused"),
        "ingest",
        "--server",
        server_url,
        str(path),
        "--chunk-bytes",
        str(CHUNK_BYTES),
        "--upload-store",
        str(store),
        "--no-transcribe",
        "--json",
        *extra,
        timeout=UPLOAD_TIMEOUT_S,
    )


def ingest(server_url: str, path: Path, store: Path, *extra: str) -> list[dict[str, object]]:
    result = run_ingest(server_url, path, store, *extra)
    assert result.returncode == 0, (result.stdout, result.stderr)
    recordings: list[dict[str, object]] = json.loads(result.stdout)
    return recordings


def head(url: str) -> httpx.Response:
    response = httpx.head(url, headers={"Tus-Resumable": "1.0.0"}, timeout=30)
    assert response.status_code == 200, response.text
    return response


def test_ingest_uploads_over_tus_and_names_the_recording(
    server: LiveServer, speech: Path, tmp_path: Path
) -> None:
    store = tmp_path / "uploads.json"
    (recording,) = ingest(server.url, speech, store, "--title", "Chunked", "--tag", "tus")
    assert recording["sha256"] == sha256_of(speech)
    assert recording["size_bytes"] == speech.stat().st_size
    assert (recording["filename"], recording["title"]) == ("resumable.wav", "Chunked")
    assert recording["tags"] == ["tus"]
    assert recording["status"] == "stored"
    back = httpx.get(f"{server.url}/v1/recordings/{recording['id']}/audio", timeout=30)
    assert back.content == speech.read_bytes()
    # A finished upload leaves nothing to resume.
    assert json.loads(store.read_text()) == {}
    assert not (tmp_path / "unused").exists()


def test_an_interrupted_ingest_resumes_from_the_stored_url_without_resending(
    data_dir: Path, speech: Path, tmp_path: Path
) -> None:
    store = tmp_path / "uploads.json"
    size = speech.stat().st_size
    first = LiveServer(data_dir, args=["--workers", "0"])
    proxy = TcpProxy("127.0.0.1", first.port).start()
    servers = [first]
    try:
        endpoint = f"http://{proxy.address}"
        chunks: list[int] = []

        def stop_after_some(offset: int) -> None:
            chunks.append(offset)
            if len(chunks) == CHUNKS_BEFORE_THE_STOP:
                first.stop()

        async def upload_until_the_stop() -> None:
            async with VaultClient(endpoint) as client:
                with within(UPLOAD_TIMEOUT_S, "the upload to end with the server"):
                    await client.upload_resumable(
                        speech,
                        transcribe=False,
                        chunk_bytes=CHUNK_BYTES,
                        url_store=UploadUrlStore(store),
                        max_attempts=2,
                        on_chunk=stop_after_some,
                    )

        with pytest.raises(httpx.TransportError):
            anyio.run(upload_until_the_stop)
        held = CHUNKS_BEFORE_THE_STOP * CHUNK_BYTES
        assert chunks == [CHUNK_BYTES * n for n in range(1, CHUNKS_BEFORE_THE_STOP + 1)]
        (url,) = json.loads(store.read_text()).values()

        # A run while the server is away fails, and keeps the URL for the next one.
        away = run_ingest(endpoint, speech, store)
        assert away.returncode == 1, (away.stdout, away.stderr)
        assert "run the same command again to resume" in away.stderr
        assert list(json.loads(store.read_text()).values()) == [url]

        second = LiveServer(data_dir, args=["--workers", "0"])
        servers.append(second)
        proxy.cut()
        proxy.target = ("127.0.0.1", second.port)
        proxy.restore()
        before = head(url)
        assert int(before.headers["Upload-Offset"]) == held
        assert "VoxVault-Recording-Id" not in before.headers

        sent_before = proxy.bytes_to_target
        (recording,) = ingest(endpoint, speech, store)
        sent = proxy.bytes_to_target - sent_before

        assert recording["sha256"] == sha256_of(speech)
        assert recording["size_bytes"] == size
        # The same upload completed, and the run sent the rest of the file plus headers, not
        # the chunks the server already held.
        assert head(url).headers["VoxVault-Recording-Id"] == recording["id"]
        assert size - held <= sent < size - held + CHUNK_BYTES
        assert json.loads(store.read_text()) == {}
    finally:
        proxy.close()
        for server in servers:
            server.stop()


class DamagingTransport(httpx.AsyncBaseTransport):
    """Flips one byte of the second chunk once, as a faulty network would; records what the
    server answered to each chunk."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.chunks = 0
        self.answers: list[tuple[int, int]] = []
        """(Upload-Offset sent, status) of every PATCH."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "PATCH":
            return await self.inner.handle_async_request(request)
        self.chunks += 1
        if self.chunks == 2:
            body = bytearray(await request.aread())
            body[len(body) // 2] ^= 0xFF
            request = httpx.Request(
                request.method, request.url, headers=request.headers, content=bytes(body)
            )
        response = await self.inner.handle_async_request(request)
        self.answers.append((int(request.headers["Upload-Offset"]), response.status_code))
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_damaged_chunk_is_refused_with_460_and_sent_again(
    server: LiveServer, speech: Path, tmp_path: Path
) -> None:
    transport = DamagingTransport()

    async def upload() -> dict[str, object]:
        async with VaultClient(server.url, transport=transport) as client:
            with within(UPLOAD_TIMEOUT_S, "the upload of the damaged chunks"):
                return await client.upload_resumable(
                    speech,
                    transcribe=False,
                    chunk_bytes=CHUNK_BYTES,
                    url_store=UploadUrlStore(tmp_path / "uploads.json"),
                )

    recording = anyio.run(upload)
    assert transport.answers[:3] == [(0, 204), (CHUNK_BYTES, 460), (CHUNK_BYTES, 204)]
    assert [status for _, status in transport.answers[3:]] == [204] * (len(transport.answers) - 3)
    assert recording["sha256"] == sha256_of(speech)


def test_no_resumable_uploads_in_one_plain_request(
    server: LiveServer, speech: Path, tmp_path: Path
) -> None:
    store = tmp_path / "uploads.json"
    (recording,) = ingest(server.url, speech, store, "--no-resumable")
    assert recording["sha256"] == sha256_of(speech)
    assert not store.exists()

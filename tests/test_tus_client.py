"""The official tus client (tuspy) against a real ``voxvault serve``: it uploads speech in small
checksummed chunks, the server goes away mid-upload, another server process takes its place
(the same data directory restarted, or a second API process over PostgreSQL and S3), and the
client resumes from the URL it stored, to a recording with the file's exact bytes.

The client talks to the servers through a TCP proxy whose address stays put, as a load
balancer's would, so that the URL it stored still leads somewhere after the switch.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter
from tusclient.client import TusClient
from tusclient.exceptions import TusCommunicationError, TusUploadFailed
from tusclient.storage.interface import Storage
from tusclient.uploader.uploader import Uploader

from tests.conftest import LiveServer
from tests.faults import TcpProxy
from tests.media import speak
from tests.postgres import postgres_database
from tests.s3 import new_bucket
from tests.stacks import child_environment

CHUNK_BYTES = 16 * 1024
CHUNKS_BEFORE_THE_CUT = 4
REQUEST_TIMEOUT_S = 60
TEXT = (
    "Resumable uploads keep every chunk that reached the server. "
    "When the connection or the server goes away, the client asks where to go on, "
    "and sends only what is missing."
)


class MemoryStorage(Storage):
    """Where the client keeps upload URLs, by file fingerprint (an app would use a file)."""

    def __init__(self) -> None:
        self.urls: dict[str, str] = {}

    def get_item(self, key: str) -> str | None:
        return self.urls.get(key)

    def set_item(self, key: str, value: str) -> None:
        self.urls[key] = value

    def remove_item(self, key: str) -> None:
        self.urls.pop(key, None)


class KeptOpen(io.BytesIO):
    """The file's bytes for the client, which closes its stream after reading a fingerprint
    (and, given a path instead, leaves files open)."""

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def requests_time_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """tuspy sends its requests (through ``requests``) without a timeout, so a server that
    never answered would hold the test forever: here each one gives up after a minute."""
    send = HTTPAdapter.send

    def send_with_timeout(
        adapter: HTTPAdapter, request: PreparedRequest, *args: Any, **kwargs: Any
    ) -> Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = REQUEST_TIMEOUT_S
        return send(adapter, request, *args, **kwargs)

    monkeypatch.setattr(HTTPAdapter, "send", send_with_timeout)


# Starts the server process that serves the upload's second half, given the first one.
Successor = Callable[[LiveServer], LiveServer]


@pytest.fixture(params=["local-restart", "s3-second-process"])
def servers(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[LiveServer, Successor]]:
    with ExitStack() as resources:
        if request.param == "local-restart":
            data_dir = tmp_path / "data"
            env: dict[str, str] = {}
        else:
            database_url = resources.enter_context(postgres_database())
            bucket = resources.enter_context(new_bucket())
            env = child_environment(
                {"VOXVAULT_DATABASE_URL": database_url, "VOXVAULT_BLOB_URL": bucket.url}
            )
            data_dir = tmp_path / "api-1"
        started: list[LiveServer] = []

        @resources.callback
        def stop_all() -> None:
            for server in started:
                server.stop()

        def start(path: Path) -> LiveServer:
            server = LiveServer(path, env=env or None, args=["--workers", "0"])
            started.append(server)
            return server

        def successor(first: LiveServer) -> LiveServer:
            # Local: the same data directory, restarted. S3: another process, another directory.
            return start(data_dir if request.param == "local-restart" else tmp_path / "api-2")

        yield start(data_dir), successor


def test_tuspy_resumes_after_the_server_goes_away(
    servers: tuple[LiveServer, Successor], tmp_path: Path
) -> None:
    first, successor = servers
    audio = speak(TEXT, tmp_path / "speech.wav")
    data = audio.read_bytes()
    assert len(data) > (CHUNKS_BEFORE_THE_CUT + 2) * CHUNK_BYTES
    storage = MemoryStorage()
    proxy = TcpProxy("127.0.0.1", first.port).start()
    with ExitStack() as cleanup:
        cleanup.callback(proxy.close)
        endpoint = f"http://{proxy.address}/files/v1/uploads"

        def uploader(client: TusClient) -> Uploader:
            return client.uploader(
                file_stream=KeptOpen(data),
                chunk_size=CHUNK_BYTES,
                metadata={"filename": "speech.wav", "title": "Resumed", "transcribe": "false"},
                store_url=True,
                url_storage=storage,
                upload_checksum=True,
            )

        before = uploader(TusClient(endpoint))
        for _ in range(CHUNKS_BEFORE_THE_CUT):
            before.upload_chunk()  # type: ignore[no-untyped-call]
        assert before.offset == CHUNKS_BEFORE_THE_CUT * CHUNK_BYTES
        url = before.url
        assert url is not None
        assert list(storage.urls.values()) == [url]

        first.stop()
        with pytest.raises((TusCommunicationError, TusUploadFailed)):
            before.upload_chunk()

        second = successor(first)
        proxy.cut()
        proxy.target = ("127.0.0.1", second.port)
        proxy.restore()

        # A new client, as after a restart of the app: it finds the URL it stored and the
        # offset the server kept, and sends the rest.
        after = uploader(TusClient(endpoint))
        assert after.url == url
        assert after.offset == CHUNKS_BEFORE_THE_CUT * CHUNK_BYTES
        after.upload()
        assert after.offset == len(data)

        with httpx.Client(timeout=60) as http:
            state = http.head(url, headers={"Tus-Resumable": "1.0.0"})
            recording_id = state.headers["VoxVault-Recording-Id"]
            recording = http.get(f"{second.url}/v1/recordings/{recording_id}").json()
            assert recording["sha256"] == hashlib.sha256(data).hexdigest()
            assert (recording["filename"], recording["title"]) == ("speech.wav", "Resumed")
            assert recording["duration_s"] > 1
            audio_back = http.get(f"{second.url}/v1/recordings/{recording_id}/audio")
            assert audio_back.content == data

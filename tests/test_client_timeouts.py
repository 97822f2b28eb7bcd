"""``VaultClient`` gives up on a server that goes silent instead of waiting forever: an event
stream that stops sending (not even its keep-alives), and an upload whose answer never comes.

The server here is a loopback socket that answers as little as the case needs and then says
nothing; the client's limits are shortened for the test."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import within
from voxvault import client as client_module
from voxvault.client import VaultClient

pytestmark = pytest.mark.anyio

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-store\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def _reads_request_head(conn: socket.socket) -> None:
    seen = b""
    while b"\r\n\r\n" not in seen:
        data = conn.recv(65536)
        if not data:
            return
        seen += data


@pytest.fixture
def silent_server() -> Iterator[tuple[str, list[bytes]]]:
    """A server that reads a request's head, sends what the test queued (or nothing), and then
    keeps the connection open without a word, reading whatever comes."""
    listener = socket.create_server(("127.0.0.1", 0))
    replies: list[bytes] = []
    stop = threading.Event()
    connections: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            connections.append(conn)
            _reads_request_head(conn)
            if replies:
                conn.sendall(replies.pop(0))
            conn.settimeout(0.2)
            while not stop.is_set():
                try:
                    if not conn.recv(1 << 20):
                        break
                except TimeoutError:
                    continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", replies
    finally:
        stop.set()
        thread.join(timeout=10)
        for conn in connections:
            conn.close()
        listener.close()


async def test_an_event_stream_gone_silent_ends_with_a_read_timeout(
    silent_server: tuple[str, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, replies = silent_server
    replies.append(SSE_HEAD + b"e\r\n: keep-alive\n\n\r\n")
    monkeypatch.setattr(client_module, "EVENTS_SILENCE_TIMEOUT_S", 0.5)

    async def follow() -> None:
        async with VaultClient(url, transport=httpx.AsyncHTTPTransport()) as client:
            async for _ in client.events("any"):
                pass

    with within(30, "the event stream to time out"), pytest.raises(httpx.ReadTimeout):
        await follow()


async def test_an_upload_whose_answer_never_comes_ends_with_a_read_timeout(
    silent_server: tuple[str, list[bytes]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url, _ = silent_server
    audio = tmp_path / "a.wav"
    audio.write_bytes(b"RIFF" + bytes(4096))
    monkeypatch.setattr(client_module, "ANSWER_TIMEOUT_S", 0.5)

    async def upload() -> None:
        async with VaultClient(url, transport=httpx.AsyncHTTPTransport()) as client:
            await client.upload(audio, transcribe=False)

    with within(30, "the upload to time out"), pytest.raises(httpx.ReadTimeout):
        await upload()

"""The API suites run on two stacks: the embedded default and a scale-out layout.

``embedded``: the ASGI app in the test process over a Vault on a fresh data directory (SQLite,
local blobs, jobs queued in the database and never run: no worker).

``scaleout``: one PostgreSQL database (metadata and the procrastinate queue), a bucket on moto's
S3 server, Redis events under a key prefix of their own, two ``voxvault serve --workers 0`` and
two ``voxvault worker`` processes, all with one secret key. It starts once per session; the
client sends consecutive requests to the two API processes in turn, and every test's recordings
are deleted after it, so that tests stay independent on the shared stack. It skips when
PostgreSQL, Redis or moto is missing, and fails under CI.

A test module takes both by importing the ``stack`` and ``client`` fixtures from here. What a
test asks about the backends (which blobs are stored, a signature) it asks the ``Stack``, which
answers the same question for both.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import anyio
import anyio.to_thread
import httpx
import pytest
from starlette.types import ASGIApp, Message

from tests.conftest import LiveServer, stored_files
from tests.postgres import postgres_database
from tests.redis_server import redis_keys
from tests.s3 import S3Bucket, credentials_env, new_bucket
from tests.test_procrastinate_workers import worker_process
from voxvault import Vault
from voxvault.api import create_app
from voxvault.signing import PlaybackSigner

STACKS = ["embedded", "scaleout"]
API_HOST = "voxvault.test"  # the scale-out client's base host; its transport picks the process
WORKSPACE = "default"
JOB_LEASE_S = 10
FINISHED_JOBS = {"succeeded", "failed", "cancelled"}
CLEANUP_S = 120

RawResponse = tuple[int, dict[bytes, bytes], bytes]


class Stack:
    """One running VoxVault: the questions a test asks of its backends, for either layout."""

    name: str
    base_url: str
    runs_jobs: bool
    """Whether a worker runs the queued jobs (the embedded test stack has none)."""
    presigns_playback: bool
    """Whether playback links go to the object store (presigned) instead of ``/v1/playback``."""

    def client(self) -> httpx.AsyncClient:
        raise NotImplementedError

    def stored_blobs(self) -> dict[str, str]:
        """Every blob key with a fingerprint of its bytes, staging and unfinished uploads
        included: what a refused request must not leave behind."""
        raise NotImplementedError

    def stored_keys(self) -> list[str]:
        return sorted(self.stored_blobs())

    def sign(self, recording_id: str, expires: int) -> str:
        """A playback signature made with the stack's secret key."""
        raise NotImplementedError

    async def raw_request(
        self,
        method: str,
        raw_path: bytes,
        body: bytes = b"",
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> RawResponse:
        """One request with a path no HTTP client would normalize (``..`` kept as sent)."""
        raise NotImplementedError


@dataclass
class EmbeddedStack(Stack):
    data_dir: Path
    vault: Vault
    name: str = "embedded"
    base_url: str = "http://testserver"
    runs_jobs: bool = False
    presigns_playback: bool = False

    def client(self) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=create_app(self.vault))
        return httpx.AsyncClient(transport=transport, base_url=self.base_url)

    def stored_blobs(self) -> dict[str, str]:
        root = self.data_dir / "blobs"
        return {
            path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in stored_files(self.data_dir)
            if path.exists()
        }

    def sign(self, recording_id: str, expires: int) -> str:
        return self.vault.signer.sign(WORKSPACE, recording_id, expires)

    async def raw_request(
        self,
        method: str,
        raw_path: bytes,
        body: bytes = b"",
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> RawResponse:
        return await raw_asgi(create_app(self.vault), method, raw_path, body, headers)


class RoundRobinTransport(httpx.AsyncBaseTransport):
    """Requests for ``API_HOST`` go to the API processes in turn; others (presigned links to
    the object store) go where they say."""

    def __init__(self, ports: Sequence[int]) -> None:
        self._ports = itertools.cycle(ports)
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == API_HOST:
            request.url = request.url.copy_with(host="127.0.0.1", port=next(self._ports))
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class ScaleOutStack(Stack):
    database_url: str
    bucket: S3Bucket
    secret_key: str
    apis: list[LiveServer]
    name: str = "scaleout"
    base_url: str = f"http://{API_HOST}"
    runs_jobs: bool = True
    presigns_playback: bool = True
    _api_turn: Iterator[LiveServer] = field(init=False)

    def __post_init__(self) -> None:
        self._api_turn = itertools.cycle(self.apis)

    def client(self) -> httpx.AsyncClient:
        transport = RoundRobinTransport([api.port for api in self.apis])
        return httpx.AsyncClient(transport=transport, base_url=self.base_url, timeout=60)

    def stored_blobs(self) -> dict[str, str]:
        client, name = self.bucket.client, self.bucket.name
        start = f"{self.bucket.prefix}/" if self.bucket.prefix else ""
        blobs: dict[str, str] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for item in page.get("Contents", []):
                blobs[item["Key"].removeprefix(start)] = item["ETag"]
        for key in self.bucket.pending_uploads():
            blobs[f"(multipart upload) {key.removeprefix(start)}"] = "unfinished"
        return blobs

    def sign(self, recording_id: str, expires: int) -> str:
        return PlaybackSigner(self.secret_key.encode()).sign(WORKSPACE, recording_id, expires)

    async def raw_request(
        self,
        method: str,
        raw_path: bytes,
        body: bytes = b"",
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> RawResponse:
        port = next(self._api_turn).port
        return await anyio.to_thread.run_sync(
            _raw_http, port, method, raw_path.decode("ascii"), body, headers
        )

    def check_alive(self) -> None:
        """Both API processes still run and have logged no crash (a 500 logs a traceback)."""
        for api in self.apis:
            log = api.log.read_text()
            assert api.process.poll() is None, log
            assert "Traceback" not in log, log


def _raw_http(
    port: int, method: str, path: str, body: bytes, headers: Sequence[tuple[bytes, bytes]]
) -> RawResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        connection.putheader("Content-Length", str(len(body)))
        for name, value in headers:
            connection.putheader(name.decode(), value.decode())
        connection.endheaders(body)
        response = connection.getresponse()
        content = response.read()
        found = {k.lower().encode(): v.encode() for k, v in response.getheaders()}
        return response.status, found, content
    finally:
        connection.close()


async def raw_asgi(
    app: ASGIApp,
    method: str,
    raw_path: bytes,
    body: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> RawResponse:
    """One request straight into the ASGI app, with a path no HTTP client would normalize."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote_to_bytes(raw_path).decode("utf-8", "replace"),
        "raw_path": raw_path,
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
        "client": ("127.0.0.1", 12345),
        "server": ("testserver", 80),
        "state": {},
    }
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        if pending:
            return pending.pop()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), content


def child_environment(settings: dict[str, str]) -> dict[str, str]:
    """The test process's environment without any VOXVAULT_* or AWS_* of the developer's
    shell, plus the stack's settings."""
    kept = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("VOXVAULT_", "AWS_"))
    }
    return {**kept, **credentials_env(), **settings}


# The running scale-out stack's resources, so that it can stop once its last test is done.
_running: list[ExitStack] = []


def uses_scaleout(item: pytest.Item) -> bool:
    fixtures: Sequence[str] = getattr(item, "fixturenames", ())
    callspec = getattr(item, "callspec", None)
    on_stack = callspec is not None and callspec.params.get("stack") == "scaleout"
    return "scaleout_stack" in fixtures or ("stack" in fixtures and on_stack)


def stop_scaleout() -> None:
    """Stop the scale-out stack now, not at the end of the session: the tests after the last
    one that uses it need the CPU and memory of its four processes."""
    while _running:
        _running.pop().close()


@pytest.fixture(scope="session")
def scaleout_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaleOutStack]:
    with ExitStack() as resources:
        _running.append(resources)
        database_url = resources.enter_context(postgres_database())
        events = resources.enter_context(redis_keys())
        bucket = resources.enter_context(new_bucket())
        secret_key = secrets.token_urlsafe(32)
        env = child_environment(
            {
                "VOXVAULT_DATABASE_URL": database_url,
                "VOXVAULT_QUEUE_URL": database_url,
                "VOXVAULT_BLOB_URL": bucket.url,
                "VOXVAULT_EVENTS_URL": events.url,
                "VOXVAULT_SECRET_KEY": secret_key,
                "VOXVAULT_JOB_LEASE_S": str(JOB_LEASE_S),
                "VOXVAULT_WHISPER_CPU_THREADS": "1",
            }
        )
        root = tmp_path_factory.mktemp("scaleout")
        apis: list[LiveServer] = []
        for n in (1, 2):
            # One after the other: the first one creates the schema.
            api = LiveServer(root / f"api-{n}", env=env, args=["--workers", "0"])
            resources.callback(api.stop)
            apis.append(api)
        for n in (1, 2):
            resources.enter_context(worker_process(root / f"worker-{n}", env, f"worker-{n}"))
        yield ScaleOutStack(database_url, bucket, secret_key, apis)


@pytest.fixture(params=STACKS)
def stack(request: pytest.FixtureRequest) -> Stack:
    if request.param == "embedded":
        return EmbeddedStack(request.getfixturevalue("data_dir"), request.getfixturevalue("vault"))
    scaleout: ScaleOutStack = request.getfixturevalue("scaleout_stack")
    return scaleout


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """The API of the stack; on the shared scale-out stack the test's recordings are deleted
    afterwards."""
    async with stack.client() as http:
        yield http
        if isinstance(stack, ScaleOutStack):
            await delete_every_recording(http)
            stack.check_alive()


async def delete_every_recording(client: httpx.AsyncClient) -> None:
    async def delete(recording_id: str) -> None:
        response = await client.delete(f"/v1/recordings/{recording_id}")
        assert response.status_code in (204, 404), response.text

    deadline = time.monotonic() + CLEANUP_S
    while True:
        listing = await client.get("/v1/recordings", params={"limit": 500})
        assert listing.status_code == 200, listing.text
        page = listing.json()
        async with anyio.create_task_group() as deleting:
            for item in page["items"]:
                deleting.start_soon(delete, item["id"])
        if page["next_cursor"] is None:
            return
        assert time.monotonic() < deadline, (
            f"recordings still listed after {CLEANUP_S} s of deleting them: {page['items'][:5]}"
        )


async def wait_for_jobs_to_finish(
    client: httpx.AsyncClient, recording_id: str, *, timeout: float = 120
) -> list[dict[str, Any]]:
    """Poll the recording's jobs until none is queued or running; returns them."""
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get(f"/v1/recordings/{recording_id}/jobs")
        assert response.status_code == 200, response.text
        jobs: list[dict[str, Any]] = response.json()["items"]
        if all(job["status"] in FINISHED_JOBS for job in jobs):
            return jobs
        assert time.monotonic() < deadline, f"jobs still unfinished after {timeout} s: {jobs}"
        await anyio.sleep(0.1)


def error_code(content: bytes) -> str:
    code: str = json.loads(content)["error"]["code"]
    return code

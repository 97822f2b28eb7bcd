"""Backends going away and coming back, against a real ``voxvault serve`` on PostgreSQL, S3 and
Redis, each reached through a ``TcpProxy`` (tests/faults.py) that a test cuts and restores.

What every outage must look like from outside: clear 503s with ``Retry-After`` and the JSON error
body meanwhile, never a 500 and never a hang (every request here has a client timeout); nothing
half-written; no acknowledged upload lost; and the same server process answering again by
itself once the backend is back. Redis only carries progress events, so while it is away
uploads and reads go on and an event stream falls back on the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import LiveServer
from tests.faults import LOOPBACK, RELAY_CHUNK_BYTES, TcpProxy
from tests.media import wav_bytes
from tests.postgres import postgres_database
from tests.redis_server import RedisKeys, redis_keys
from tests.s3 import S3Bucket, s3_bucket
from voxvault.blobs.s3 import DEFAULT_PART_BYTES
from voxvault.errors import BackendUnavailable
from voxvault.events import ProgressEvent
from voxvault.events.redis import RedisEventBus
from voxvault.vault import STATE_POLL_SECONDS

pytestmark = pytest.mark.slow

REQUEST_TIMEOUT_S = 30.0
"""Any answer, a 503 included, must come within this: an outage must not hang a client."""
RECOVERY_DEADLINE_S = 60.0
"""How long the server may take to notice a backend is back (generous: not a speed test)."""
MiB = 1024 * 1024
# What the server log shows when a request became a 500 or broke after its response started.
SERVER_ERROR_MARKS = ("an unexpected error occurred", "Exception in ASGI application")


@dataclass(frozen=True)
class Deployment:
    """One API server on real backends, each behind a proxy the test can cut."""

    server: LiveServer
    http: httpx.Client
    bucket: S3Bucket
    keys: RedisKeys
    s3: TcpProxy
    postgres: TcpProxy
    redis: TcpProxy


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    with contextlib.ExitStack() as stack:
        database_url = stack.enter_context(postgres_database())
        keys = stack.enter_context(redis_keys())
        bucket = stack.enter_context(s3_bucket(monkeypatch))
        postgres = stack.enter_context(TcpProxy.for_url(database_url))
        redis = stack.enter_context(TcpProxy.for_url(keys.url))
        s3 = stack.enter_context(TcpProxy.for_url(bucket.endpoint))
        env = {
            "VOXVAULT_DATABASE_URL": postgres.url_for(database_url),
            "VOXVAULT_BLOB_URL": replace(bucket, endpoint=s3.url_for(bucket.endpoint)).url,
            "VOXVAULT_EVENTS_URL": redis.url_for(keys.url),
        }
        # No pipeline worker: recordings stay queued, and no engine competes for the CPU.
        server = LiveServer(tmp_path / "data", env=env, args=["--workers", "0"])
        stack.callback(server.stop)
        http = stack.enter_context(httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S))
        yield Deployment(server, http, bucket, keys, s3, postgres, redis)
        assert server.process.poll() is None, "the server exited: it recovered nothing itself"
        assert all(p.accepted for p in (s3, postgres, redis)), "a backend was reached directly"
        log = server.log.read_text()
        for mark in SERVER_ERROR_MARKS:
            assert mark not in log, log


# ---- the proxy itself ------------------------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(RELAY_CHUNK_BYTES):
                self.request.sendall(data)


def test_the_proxy_resets_connections_refuses_new_ones_and_comes_back_on_its_port() -> None:
    with socketserver.ThreadingTCPServer((LOOPBACK, 0), _Echo) as echo:
        echo.daemon_threads = True
        threading.Thread(target=echo.serve_forever, daemon=True).start()
        try:
            host, port = echo.server_address[:2]
            with TcpProxy(str(host), int(port)) as proxy:
                address = (proxy.host, proxy.port)
                with socket.create_connection(address, timeout=5) as link:
                    link.sendall(b"hello")
                    assert link.recv(5) == b"hello"
                    proxy.cut()
                    with pytest.raises(ConnectionResetError):
                        link.recv(5)
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(address, timeout=5).close()
                proxy.restore()
                assert (proxy.host, proxy.port) == address
                with socket.create_connection(address, timeout=5) as link:
                    link.sendall(b"again")
                    assert link.recv(5) == b"again"
                assert (proxy.accepted, proxy.bytes_to_target) == (2, 10)
        finally:
            echo.shutdown()


# ---- helpers ---------------------------------------------------------------------------------


def upload(http: httpx.Client, audio: bytes, name: str = "tone.wav") -> httpx.Response:
    return http.post(
        "/v1/recordings",
        params={"filename": name},
        content=audio,
        headers={"Content-Type": "audio/wav"},
    )


def acknowledged(http: httpx.Client, audio: bytes) -> str:
    """Upload and return the new recording's id: the client has been told it is stored."""
    response = upload(http, audio)
    assert response.status_code == 201, response.text
    recording: dict[str, Any] = response.json()
    assert recording["sha256"] == hashlib.sha256(audio).hexdigest()
    return str(recording["id"])


def assert_unavailable(response: httpx.Response) -> None:
    """A clear 503: the JSON error body, and when to try again."""
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["retry-after"]) > 0
    error = response.json()["error"]
    assert error["code"] == "backend_unavailable"
    assert error["message"]


def assert_reads_back(http: httpx.Client, originals: dict[str, bytes]) -> None:
    """Every recording is listed and its bytes come back identical."""
    listed = http.get("/v1/recordings", params={"limit": 500})
    assert listed.status_code == 200, listed.text
    assert {item["id"] for item in listed.json()["items"]} == set(originals)
    for recording_id, audio in originals.items():
        response = http.get(f"/v1/recordings/{recording_id}/audio")
        assert response.status_code == 200, response.text
        assert hashlib.sha256(response.content).digest() == hashlib.sha256(audio).digest()


def recording_ids(http: httpx.Client) -> set[str]:
    listed = http.get("/v1/recordings", params={"limit": 500})
    assert listed.status_code == 200, listed.text
    return {item["id"] for item in listed.json()["items"]}


def wait_until_ready(http: httpx.Client) -> None:
    """Poll /readyz until the server says every backend answers (no restart in between)."""
    deadline = time.monotonic() + RECOVERY_DEADLINE_S
    while True:
        response = http.get("/readyz")
        if response.status_code == 200:
            assert response.json() == {"status": "ready"}
            return
        assert_unavailable(response)
        assert time.monotonic() < deadline, f"not ready again: {response.text}"
        time.sleep(0.2)


def wait_until(condition: Any, what: str, deadline_s: float = RECOVERY_DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def tones(count: int) -> list[bytes]:
    """Distinct small WAV files (each a different length, so a different checksum)."""
    return [wav_bytes(0.5 + 0.25 * n) for n in range(count)]


# ---- S3 --------------------------------------------------------------------------------------


def test_s3_going_away_gives_503s_leaves_nothing_and_the_server_recovers_by_itself(
    deployment: Deployment,
) -> None:
    http, bucket = deployment.http, deployment.bucket
    first, second, refused = tones(3)
    stored = {acknowledged(http, first): first, acknowledged(http, second): second}
    objects = bucket.object_names()
    some_id = next(iter(stored))

    with deployment.s3.outage():
        assert http.get("/healthz").status_code == 200  # the process is up; it says no more
        assert_unavailable(http.get("/readyz"))
        assert_unavailable(upload(http, refused))
        assert_unavailable(http.get(f"/v1/recordings/{some_id}/audio"))
        # The database still answers: what needs no bytes still works.
        assert http.get(f"/v1/recordings/{some_id}").status_code == 200
        assert recording_ids(http) == set(stored)
        # Looked at on the S3 server itself, not through the proxy: nothing half-written.
        assert bucket.object_names() == objects
        assert bucket.pending_uploads() == []

    wait_until_ready(http)
    stored[acknowledged(http, refused)] = refused  # the same upload now goes through
    assert_reads_back(http, stored)


def test_s3_going_away_in_the_middle_of_an_upload_leaves_no_object_and_no_row(
    deployment: Deployment,
) -> None:
    http, bucket, s3 = deployment.http, deployment.bucket, deployment.s3
    kept = tones(1)[0]
    stored = {acknowledged(http, kept): kept}
    objects = bucket.object_names()
    first_part = b"\0" * (DEFAULT_PART_BYTES + MiB)  # past one part: a multipart upload begins

    def part_stored() -> bool:
        client = bucket.client
        uploads = client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])
        for each in uploads:
            parts = client.list_parts(
                Bucket=bucket.name, Key=each["Key"], UploadId=each["UploadId"]
            )
            if parts.get("Parts"):
                return True
        return False

    def body() -> Iterator[bytes]:
        for start in range(0, len(first_part), MiB):
            yield first_part[start : start + MiB]
        wait_until(part_stored, "the first part on the S3 server")
        s3.cut()  # the rest of the body arrives while S3 is away
        yield b"\0" * MiB

    response = http.post("/v1/recordings", content=body(), headers={"Content-Type": "audio/wav"})
    assert_unavailable(response)
    assert bucket.object_names() == objects
    assert recording_ids(http) == set(stored)
    # The abort of the multipart upload could not reach S3 either: the parts stay, invisible,
    # until the bucket's AbortIncompleteMultipartUpload lifecycle rule removes them
    # (voxvault/blobs/s3.py). They can only be those of the refused recording's original.
    assert all(
        re.fullmatch(rf"{bucket.prefix}/recordings/[^/]+/original", key)
        for key in bucket.pending_uploads()
    )

    s3.restore()
    wait_until_ready(http)
    assert_reads_back(http, stored)


# ---- PostgreSQL ------------------------------------------------------------------------------


def test_postgres_going_away_gives_503s_leaves_no_orphan_and_the_pool_recovers(
    deployment: Deployment,
) -> None:
    http, bucket, s3 = deployment.http, deployment.bucket, deployment.s3
    first, second, refused = tones(3)
    stored = {acknowledged(http, first): first, acknowledged(http, second): second}
    some_id = next(iter(stored))
    jobs = http.get(f"/v1/recordings/{some_id}/jobs")
    assert jobs.status_code == 200, jobs.text
    job_id = jobs.json()["items"][0]["id"]
    objects = bucket.object_names()

    with contextlib.ExitStack() as streams:
        follower = EventStream(streams, http, some_id)
        assert follower.next_event()[0] is None

        with deployment.postgres.outage():
            assert http.get("/healthz").status_code == 200
            assert_unavailable(http.get("/readyz"))
            assert_unavailable(http.get("/v1/recordings"))
            assert_unavailable(http.get(f"/v1/recordings/{some_id}"))
            assert_unavailable(http.get(f"/v1/recordings/{some_id}/audio"))
            assert_unavailable(http.get(f"/v1/recordings/{some_id}/events"))
            assert_unavailable(http.get(f"/v1/jobs/{job_id}"))  # the job queue's own queries
            sent_before = s3.bytes_to_target
            assert_unavailable(upload(http, refused))
            # The bytes did go to the blob store (they always go first), and were taken back.
            assert s3.bytes_to_target - sent_before >= len(refused)
            assert bucket.object_names() == objects
            assert bucket.pending_uploads() == []
            # Long enough for the open event stream to re-read the database, and fail to.
            time.sleep(3 * STATE_POLL_SECONDS)

        wait_until_ready(http)
        assert_reads_back(http, stored)
        stored[acknowledged(http, refused)] = refused
        assert_reads_back(http, stored)
        # The event stream opened before the outage stayed open through it, and goes on.
        published = publish(deployment.keys, some_id, 0.5)
        assert follower.wait_for(0.5) == published


# ---- Redis -----------------------------------------------------------------------------------


class EventStream:
    """A client of ``GET /v1/recordings/{id}/events``, read event by event."""

    def __init__(self, stack: contextlib.ExitStack, http: httpx.Client, recording_id: str) -> None:
        self.response = stack.enter_context(
            http.stream("GET", f"/v1/recordings/{recording_id}/events")
        )
        assert self.response.status_code == 200, self.response.read()
        assert self.response.headers["content-type"].startswith("text/event-stream")
        self._lines = self.response.iter_lines()

    def next_event(self, deadline: float | None = None) -> tuple[str | None, dict[str, Any]]:
        """The next event's id (None for a snapshot from the database) and data, by the
        deadline (the server's keep-alive comments come every few seconds meanwhile)."""
        if deadline is None:
            deadline = time.monotonic() + RECOVERY_DEADLINE_S
        event_id: str | None = None
        data: list[str] = []
        for line in self._lines:
            assert time.monotonic() < deadline, "the event stream sent no event by the deadline"
            if line.startswith("id:"):
                event_id = line[3:].strip() or None
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line and data:
                return event_id, json.loads("\n".join(data))
        raise AssertionError("the event stream ended")

    def wait_for(self, progress: float) -> str:
        """Skip database snapshots until the bus delivers the event with this progress."""
        deadline = time.monotonic() + RECOVERY_DEADLINE_S
        while time.monotonic() < deadline:
            event_id, data = self.next_event(deadline)
            if data.get("progress") == progress:
                assert event_id is not None, data  # it came through the bus
                return event_id
        raise AssertionError(f"no event with progress {progress}")


def publish(keys: RedisKeys, recording_id: str, progress: float) -> str:
    """Publish as a worker in another process would, straight to Redis (not through a proxy)."""

    async def send() -> str:
        async with RedisEventBus.from_url(keys.url) as bus:
            event = ProgressEvent(
                type="progress", status="processing", stage="transcribe", progress=progress
            )
            return await bus.publish(f"default:{recording_id}", event)

    return asyncio.run(send())


def test_redis_going_away_keeps_uploads_and_reads_working_and_events_flow_again(
    deployment: Deployment,
) -> None:
    http, keys = deployment.http, deployment.keys
    first, during = tones(2)
    stored = {acknowledged(http, first): first}
    followed = next(iter(stored))

    with contextlib.ExitStack() as streams:
        before = EventStream(streams, http, followed)
        event_id, snapshot = before.next_event()
        assert (event_id, snapshot["type"], snapshot["status"]) == (None, "snapshot", "queued")

        with deployment.redis.outage():
            # Not a readiness matter: events are progress only, the database is the record.
            assert http.get("/readyz").status_code == 200
            # Stored, and its job queued; only the "queued" notification is lost.
            added = acknowledged(http, during)
            stored[added] = during
            assert_reads_back(http, stored)
            with contextlib.ExitStack() as meanwhile:
                # A stream opened now follows the database alone: its state at once, no error.
                event_id, snapshot = EventStream(meanwhile, http, added).next_event()
                assert (event_id, snapshot["status"]) == (None, "queued")
            # A worker that still reaches Redis goes on publishing.
            published_meanwhile = publish(keys, followed, 0.25)

        # The server reconnects by itself: the stream opened before the outage gets what was
        # published meanwhile, then what comes next.
        assert before.wait_for(0.25) == published_meanwhile
        published_after = publish(keys, followed, 0.5)
        assert before.wait_for(0.5) == published_after
        # And a stream opened now is on the bus again.
        fresh = EventStream(streams, http, added)
        assert fresh.next_event()[0] is None
        published_fresh = publish(keys, added, 0.75)
        assert fresh.wait_for(0.75) == published_fresh

    assert_reads_back(http, stored)


# ``voxvault serve`` runs on uvloop, where writing to a connection the peer reset raises
# RuntimeError; the event bus must see a lost connection there, and a new one once Redis is back.
UVLOOP = pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [UVLOOP])
async def test_redis_connections_reset_while_idle_are_replaced_on_uvloop() -> None:
    progress = ProgressEvent(type="progress", status="processing", progress=0.5)
    with redis_keys() as keys, TcpProxy.for_url(keys.url) as proxy:
        async with RedisEventBus.from_url(proxy.url_for(keys.url)) as bus:
            await bus.publish("rec-1", progress)  # leaves a connection in the pool
            proxy.cut()
            proxy.restore()  # Redis is back at once, but the pooled connection was reset
            await anyio.sleep(0.2)  # the reset reaches the idle connection
            await bus.publish("rec-1", progress)
            with proxy.outage():
                await anyio.sleep(0.2)
                with pytest.raises(BackendUnavailable, match="Redis is unavailable"):
                    await bus.publish("rec-1", progress)
            await bus.publish("rec-1", progress)

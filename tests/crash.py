"""Crash harness: a real ``voxvault serve`` SIGKILLed at random moments under upload traffic.

Several client threads upload at once, each as a real client would: plain uploads (a raw body
streamed to ``POST /v1/recordings``) and resumable ones (tus 1.0 over raw httpx: creation,
sometimes with the first chunk, then PATCHes of random sizes, some with ``Upload-Checksum``, and
now and then a termination). Meanwhile the harness SIGKILLs the server after a random stretch
of traffic, restarts it on the same data (a new port: clients follow the current URL, as they
would behind a load balancer), checks what is visible, and goes on. After the last kill the
clients finish what they hold, and the caller sweeps and checks the store.

What a client is told is the ledger every check is judged by:

- an upload's bytes are known before they are sent, and every attempt carries its own title,
  so a recording found later names the attempt it came from and must hold exactly its bytes;
- a 201, a tus response with ``VoxVault-Recording-Id`` (PATCH or HEAD) is an acknowledgement:
  that recording must be listed and its bytes read back identical, after every later restart;
- a plain upload whose response the kill swallowed is retried under a new title: the lost
  attempt may have become a recording or not, but if it did, the recording is complete;
- a tus upload whose request the kill swallowed resumes where HEAD says, and must end in a
  recording with the sha256 of the whole file; a 404 or 410 for a live upload is a loss;
- an upload whose creation answer was lost is abandoned (the client never learnt its URL):
  its parts are the only bytes allowed to outlive the final sweep, until the upload expires.

The schedule (sizes, checksums, delays before each kill) comes from one seeded
``random.Random``; thread timing does not, so a seed replays the schedule, not every
interleaving. The seed is in every failure message.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import subprocess
import threading
import time
import wave
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tests.conftest import VOXVAULT_BIN, LiveServer
from voxvault.metadata.tables import uploads as uploads_table
from voxvault.uploads import COMPLETION_LEASE_S

SEED_ENV = "VOXVAULT_TEST_CRASH_SEED"
# Read once at import: conftest's autouse fixture clears every VOXVAULT_* variable per test.
SEED_FROM_ENV = os.environ.get(SEED_ENV)

TUS = {"Tus-Resumable": "1.0.0"}
CHUNK_TYPE = {"Content-Type": "application/offset+octet-stream"}
UPLOADS = "/files/v1/uploads"
RECORDING_ID = "VoxVault-Recording-Id"
STREAM_PIECE = 64 * 1024
KIB = 1024
MIB = 1024 * KIB
# Bounded waits only: a client that cannot make progress this long fails the run.
SERVER_DOWN_DEADLINE_S = 60.0
DRAIN_DEADLINE_S = 120.0
REQUEST_TIMEOUT_S = 60.0


def pick_seed() -> int:
    return int(SEED_FROM_ENV) if SEED_FROM_ENV else random.SystemRandom().randrange(2**32)


def noise_wav(rng: random.Random, size: int) -> bytes:
    """A valid 44.1 kHz stereo WAV of about ``size`` bytes of noise: unique bytes, a unique
    sha256, and audio the server's probe accepts."""
    frames = max(1, (size - 44) // 4)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(44100)
        out.writeframes(rng.randbytes(frames * 4))
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class ServerDown(Exception):
    """The server did not come back within the deadline."""


@dataclass(frozen=True)
class Attempt:
    """One upload attempt: its title names it on the server."""

    title: str
    kind: str  # "plain" or "tus"
    sha256: str
    size: int


@dataclass
class Ledger:
    """What the clients sent and were told; shared by the client threads (under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    attempts: dict[str, Attempt] = field(default_factory=dict)
    acknowledged: dict[str, Attempt] = field(default_factory=dict)
    """recording id → the attempt it was acknowledged for."""
    tus_uploads: dict[str, Attempt] = field(default_factory=dict)
    """upload id → attempt, for every upload whose URL a client learnt."""
    tus_finished: dict[str, str] = field(default_factory=dict)
    """upload id → recording id."""
    terminated: set[str] = field(default_factory=set)
    """upload ids terminated by their client (204 or, after a lost answer, 410)."""
    violations: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, by: int = 1) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + by

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(text)

    def attempt(self, attempt: Attempt) -> None:
        with self.lock:
            self.attempts[attempt.title] = attempt

    def acknowledge(self, recording_id: str, attempt: Attempt, answer: dict[str, Any]) -> None:
        with self.lock:
            known = self.acknowledged.get(recording_id)
            if known is not None and known != attempt:
                self.violations.append(
                    f"recording {recording_id} acknowledged for {known.title} and {attempt.title}"
                )
            self.acknowledged[recording_id] = attempt
        if answer and (answer.get("sha256"), answer.get("size_bytes")) != (
            attempt.sha256,
            attempt.size,
        ):
            self.violation(f"{attempt.title}: acknowledged as {answer}, sent {attempt}")


class CrashingServer:
    """``voxvault serve --workers 0`` on one data directory and backend, killed and restarted
    at will; clients wait for it through ``base_url``."""

    def __init__(self, data_dir: Path, env: dict[str, str], database_url: str) -> None:
        self.data_dir = data_dir
        self.env = env
        self.database_url = database_url
        self._lock = threading.Lock()
        self._up = threading.Event()
        self._server: LiveServer | None = None
        self.kills = 0
        self.start()

    def start(self) -> None:
        server = LiveServer(self.data_dir, env=self.env, args=["--workers", "0"])
        with self._lock:
            self._server = server
        self._up.set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return self._server.url

    def base_url(self) -> str:
        """The running server's URL, waiting while it is down."""
        if not self._up.wait(SERVER_DOWN_DEADLINE_S):
            raise ServerDown(f"the server stayed down for {SERVER_DOWN_DEADLINE_S} s")
        with self._lock:
            assert self._server is not None
            return self._server.url

    def kill(self) -> None:
        """SIGKILL: no shutdown handler, no flush, no lease given back."""
        self._up.clear()
        with self._lock:
            assert self._server is not None
            self._server.process.kill()
            self._server.process.wait()
        self.kills += 1

    def stop(self) -> None:
        self._up.clear()
        if self._server is not None and self._server.process.poll() is None:
            self._server.stop()

    def let_dead_leases_lapse(self) -> int:
        """While the server is dead, let the completion leases it held run out, as they would
        ``COMPLETION_LEASE_S`` later: the next HEAD takes those completions over. Moving the
        clock (not waiting a minute per kill) keeps the run short; no live process holds a
        lease here, since the only server is dead. Returns how many completions were cut."""
        assert not self._up.is_set()
        stale = datetime.now(UTC) - timedelta(seconds=COMPLETION_LEASE_S + 5)
        with self.engine() as engine, engine.begin() as conn:
            result = conn.execute(
                uploads_table.update()
                .where(uploads_table.c.status == "completing")
                .values(updated_at=stale)
            )
            return int(result.rowcount)

    def let_uploads_expire(self) -> int:
        """Time passes past every upload's expiry (``VOXVAULT_UPLOAD_TTL``); server stopped."""
        assert not self._up.is_set()
        past = datetime.now(UTC) - timedelta(seconds=1)
        with self.engine() as engine, engine.begin() as conn:
            return int(conn.execute(uploads_table.update().values(expires_at=past)).rowcount)

    def upload_rows(self) -> dict[str, str]:
        """upload id → status, straight from the database."""
        with self.engine() as engine, engine.connect() as conn:
            rows = conn.execute(sa.select(uploads_table.c.id, uploads_table.c.status))
            return {row.id: row.status for row in rows}

    @contextmanager
    def engine(self) -> Iterator[sa.Engine]:
        url = make_url(self.database_url)
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        engine = sa.create_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()

    def cli(self, *args: str) -> tuple[int, dict[str, Any]]:
        """``voxvault <args> --json`` on the data directory (the server should be stopped)."""
        done = subprocess.run(
            [str(VOXVAULT_BIN), "--data-dir", str(self.data_dir), *args, "--json"],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        try:
            report: dict[str, Any] = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise AssertionError(
                f"voxvault {' '.join(args)} exited {done.returncode}: {done.stdout}\n{done.stderr}"
            ) from None
        return done.returncode, report


# ---- the clients --------------------------------------------------------------------------------


class Clients:
    """Client threads uploading until ``stop_new`` is set, then finishing what they hold."""

    def __init__(self, server: CrashingServer, ledger: Ledger, seed: int) -> None:
        self.server = server
        self.ledger = ledger
        self.seed = seed
        self.stop_new = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, plain: int, tus: int) -> None:
        for index in range(plain):
            self._spawn(f"plain{index}", self._plain_client)
        for index in range(tus):
            self._spawn(f"tus{index}", self._tus_client)

    def _spawn(self, name: str, target: Callable[[str, random.Random], None]) -> None:
        rng = random.Random(f"{self.seed}-{name}")

        def run() -> None:
            try:
                target(name, rng)
            except Exception as exc:  # judged by the caller, with the seed
                self.ledger.violation(f"client {name} failed: {exc!r}")

        thread = threading.Thread(target=run, name=f"crash-{name}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def join(self, deadline_s: float) -> None:
        self.stop_new.set()
        until = time.monotonic() + deadline_s
        for thread in self.threads:
            thread.join(max(0.0, until - time.monotonic()))
            if thread.is_alive():
                self.ledger.violation(f"client {thread.name} still busy after {deadline_s} s")

    def _pause(self) -> None:
        """After a cut request: a moment, so a server that is still up is not hammered."""
        time.sleep(0.02)

    # ---- plain uploads ----------------------------------------------------------------------

    def _plain_client(self, name: str, rng: random.Random) -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
            item = 0
            while not self.stop_new.is_set():
                data = noise_wav(rng, rng.randint(1 * MIB, 3 * MIB))
                self._plain_upload(http, f"{name}-{item}", data, streamed=rng.random() < 0.7)
                item += 1

    def _plain_upload(self, http: httpx.Client, label: str, data: bytes, streamed: bool) -> None:
        digest = sha256(data)
        for number in range(1000):
            attempt = Attempt(f"{label}-a{number}", "plain", digest, len(data))
            self.ledger.attempt(attempt)
            try:
                response = http.post(
                    f"{self.server.base_url()}/v1/recordings",
                    params={
                        "title": attempt.title,
                        "filename": f"{label}.wav",
                        "transcribe": "false",
                    },
                    # Streamed: chunked, no length known beforehand; else with Content-Length.
                    content=_pieces(data) if streamed else data,
                    headers={"Content-Type": "audio/wav"},
                )
            except httpx.TransportError:
                self.ledger.count("plain requests cut")
                self._pause()
                continue
            if response.status_code == 201:
                answer = response.json()
                self.ledger.acknowledge(answer["id"], attempt, answer)
                self.ledger.count("plain stored")
                if number:
                    self.ledger.count("plain stored after a retry")
                return
            if response.status_code == 503:
                self.ledger.count("plain 503")
                self._pause()
                continue
            self.ledger.violation(f"{attempt.title}: {response.status_code} {response.text[:300]}")
            return
        self.ledger.violation(f"{label}: no attempt was stored")

    # ---- tus uploads ------------------------------------------------------------------------

    def _tus_client(self, name: str, rng: random.Random) -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
            item = 0
            while not self.stop_new.is_set():
                data = noise_wav(rng, rng.randint(1 * MIB, 2 * MIB))
                terminate_at = rng.randint(1, len(data) // 2) if rng.random() < 0.15 else None
                TusUpload(self, http, rng, f"{name}-{item}", data, terminate_at).run()
                item += 1


def _pieces(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), STREAM_PIECE):
        yield data[start : start + STREAM_PIECE]


def checksum_header(rng: random.Random, chunk: bytes) -> dict[str, str]:
    """Upload-Checksum for about half of the chunks, with one of the advertised algorithms."""
    if rng.random() < 0.5:
        return {}
    algorithm = rng.choice(("sha256", "sha1", "md5"))
    digest = base64.b64encode(hashlib.new(algorithm, chunk).digest()).decode()
    return {"Upload-Checksum": f"{algorithm} {digest}"}


class TusUpload:
    """One file sent as a resumable upload, carried through kills until it is a recording (or
    terminated, when ``terminate_at`` says the client gives up at that offset)."""

    def __init__(
        self,
        clients: Clients,
        http: httpx.Client,
        rng: random.Random,
        label: str,
        data: bytes,
        terminate_at: int | None,
    ) -> None:
        self.server = clients.server
        self.ledger = clients.ledger
        self.pause = clients._pause
        self.http = http
        self.rng = rng
        self.label = label
        self.data = data
        self.terminate_at = terminate_at
        self.deleting = False

    def run(self) -> None:
        created = self._create()
        if created is None:
            return
        attempt, path, offset = created
        self._carry_on(attempt, path, offset)

    def _chunk_size(self) -> int:
        return self.rng.randint(128 * KIB, 1 * MIB)

    def _create(self) -> tuple[Attempt, str, int] | None:
        digest = sha256(self.data)
        for number in range(1000):
            attempt = Attempt(f"{self.label}-a{number}", "tus", digest, len(self.data))
            self.ledger.attempt(attempt)
            headers = {
                **TUS,
                "Upload-Length": str(len(self.data)),
                "Upload-Metadata": f"filename {b64(self.label + '.wav')},"
                f"title {b64(attempt.title)},transcribe {b64('false')}",
            }
            first: bytes | None = None
            if self.rng.random() < 0.3:  # creation-with-upload
                first = self.data[: self._chunk_size()]
                headers |= CHUNK_TYPE | checksum_header(self.rng, first)
            try:
                response = self.http.post(
                    f"{self.server.base_url()}{UPLOADS}", headers=headers, content=first
                )
            except httpx.TransportError:
                # The upload may exist now, but its URL was never told: it is abandoned.
                self.ledger.count("tus creations cut")
                self.pause()
                continue
            if response.status_code == 503:
                self.pause()
                continue
            if response.status_code != 201:
                self.ledger.violation(
                    f"{attempt.title}: creation {response.status_code} {response.text[:300]}"
                )
                return None
            path = httpx.URL(response.headers["Location"]).path
            with self.ledger.lock:
                self.ledger.tus_uploads[path.rsplit("/", 1)[1]] = attempt
            return attempt, path, int(response.headers["Upload-Offset"])
        self.ledger.violation(f"{self.label}: never created")
        return None

    def _carry_on(self, attempt: Attempt, path: str, offset: int) -> None:
        upload_id = path.rsplit("/", 1)[1]
        need_head = False
        cut = False
        for _ in range(100_000):
            try:
                base = self.server.base_url()
                if need_head:
                    state = self.http.head(f"{base}{path}", headers=TUS)
                    if state.status_code == 200:
                        offset = int(state.headers["Upload-Offset"])
                        if RECORDING_ID in state.headers:
                            self._finished(attempt, upload_id, state.headers[RECORDING_ID], cut)
                            return
                        if offset == len(self.data):
                            # Completing: on the server now, or by a dead one until its lease
                            # lapses; HEAD again takes it over then.
                            self.ledger.count("tus completions awaited")
                            time.sleep(0.1)
                            continue
                        need_head = False
                    elif state.status_code == 410 and self.deleting:
                        self._terminated(upload_id)
                        return
                    elif state.status_code == 503:
                        self.pause()
                        continue
                    else:
                        self.ledger.violation(
                            f"{attempt.title}: upload {upload_id} at {offset} lost: "
                            f"HEAD {state.status_code} {state.text[:300]}"
                        )
                        return
                if self.terminate_at is not None and offset >= self.terminate_at:
                    self.deleting = True
                    gone = self.http.delete(f"{base}{path}", headers=TUS)
                    if gone.status_code == 204 or (gone.status_code == 410 and cut):
                        self._terminated(upload_id)
                    else:
                        self.ledger.violation(
                            f"{attempt.title}: DELETE {gone.status_code} {gone.text[:300]}"
                        )
                    return
                chunk = self.data[offset : offset + self._chunk_size()]
                response = self.http.patch(
                    f"{base}{path}",
                    content=chunk,
                    headers={
                        **TUS,
                        **CHUNK_TYPE,
                        "Upload-Offset": str(offset),
                        **checksum_header(self.rng, chunk),
                    },
                )
            except httpx.TransportError:
                self.ledger.count("tus requests cut")
                cut = need_head = True
                self.pause()
                continue
            if response.status_code == 204:
                offset = int(response.headers["Upload-Offset"])
                if RECORDING_ID in response.headers:
                    self._finished(attempt, upload_id, response.headers[RECORDING_ID], cut)
                    return
            elif response.status_code in (409, 503):
                need_head = True
                self.pause()
            else:
                self.ledger.violation(
                    f"{attempt.title}: PATCH at {offset} {response.status_code} "
                    f"{response.text[:300]}"
                )
                return
        self.ledger.violation(f"{attempt.title}: never finished")

    def _finished(self, attempt: Attempt, upload_id: str, recording_id: str, cut: bool) -> None:
        self.ledger.acknowledge(recording_id, attempt, {})
        with self.ledger.lock:
            self.ledger.tus_finished[upload_id] = recording_id
        self.ledger.count("tus stored")
        if cut:
            self.ledger.count("tus stored after a cut")

    def _terminated(self, upload_id: str) -> None:
        with self.ledger.lock:
            self.ledger.terminated.add(upload_id)
        self.ledger.count("tus terminated")


# ---- the run ------------------------------------------------------------------------------------


@dataclass
class CrashRun:
    """Clients against a server that is killed ``kills`` times, each after up to
    ``max_delay_s`` of traffic; every restart is followed by a check of what is visible."""

    server: CrashingServer
    seed: int
    ledger: Ledger = field(default_factory=Ledger)
    verified: set[str] = field(default_factory=set)
    """Recordings whose bytes were read back and matched."""
    listed: list[dict[str, Any]] = field(default_factory=list)
    """The recordings the last check found."""

    def fail_message(self, what: str) -> str:
        return (
            f"{what}\nseed {self.seed} (replay the schedule with {SEED_ENV}={self.seed}); "
            f"{self.server.kills} kills; {self.summary()}"
        )

    def summary(self) -> str:
        with self.ledger.lock:
            return ", ".join(f"{k}: {v}" for k, v in sorted(self.ledger.counts.items()))

    def assert_no_violations(self) -> None:
        with self.ledger.lock:
            violations = list(self.ledger.violations)
        assert not violations, self.fail_message("\n".join(violations[:20]))

    def run(self, *, kills: int, max_delay_s: float, plain: int, tus: int) -> None:
        schedule = random.Random(self.seed)
        clients = Clients(self.server, self.ledger, self.seed)
        clients.start(plain, tus)
        try:
            for _ in range(kills):
                time.sleep(schedule.uniform(0, max_delay_s))
                self.server.kill()
                self.ledger.count("completions cut by a kill", self.server.let_dead_leases_lapse())
                self.server.start()
                self.check_visible(reread=False)
        finally:
            clients.join(DRAIN_DEADLINE_S)
        self.check_visible(reread=True)

    def list_recordings(self, http: httpx.Client) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 500}
            if cursor:
                params["cursor"] = cursor
            page = http.get(f"{self.server.url}/v1/recordings", params=params)
            assert page.status_code == 200, self.fail_message(page.text)
            body = page.json()
            items += body["items"]
            cursor = body["next_cursor"]
            if cursor is None:
                return items

    def check_visible(self, *, reread: bool) -> None:
        """Every acknowledged recording is listed; every listed one is an attempt's complete
        bytes (read back: new ones always, all of them when ``reread``)."""
        with self.ledger.lock:
            acknowledged = dict(self.ledger.acknowledged)
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
            listed = self.list_recordings(http)
            with self.ledger.lock:  # after the listing: every listed attempt was begun before
                attempts = dict(self.ledger.attempts)
            problems: list[str] = []
            for item in listed:
                attempt = attempts.get(item.get("title") or "")
                if attempt is None:
                    problems.append(f"recording {item['id']} is no attempt of a client: {item}")
                    continue
                if (item["sha256"], item["size_bytes"], item["status"]) != (
                    attempt.sha256,
                    attempt.size,
                    "stored",
                ):
                    problems.append(f"recording {item['id']} is not {attempt}: {item}")
                    continue
                if reread or item["id"] not in self.verified:
                    digest = hashlib.sha256()
                    with http.stream(
                        "GET", f"{self.server.url}/v1/recordings/{item['id']}/audio"
                    ) as audio:
                        if audio.status_code != 200:
                            problems.append(f"recording {item['id']}: audio {audio.status_code}")
                            continue
                        for block in audio.iter_bytes():
                            digest.update(block)
                    if digest.hexdigest() != attempt.sha256:
                        problems.append(f"recording {item['id']} reads back other bytes")
                        continue
                    self.verified.add(item["id"])
            self.listed = listed
            ids = {item["id"] for item in listed}
            for recording_id, attempt in acknowledged.items():
                if recording_id not in ids:
                    problems.append(f"acknowledged recording {recording_id} ({attempt}) is gone")
        assert not problems, self.fail_message("\n".join(problems[:20]))

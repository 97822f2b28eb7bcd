"""SSE fan-out across two API processes over Redis vs reading the same events from Redis directly.

Two ``voxvault serve --workers 0`` processes share one PostgreSQL database (fresh, dropped
afterwards), one data directory (local blobs) and Redis (``VOXVAULT_EVENTS_URL=redis://…
?prefix=<unique>``, every key under it deleted afterwards). A recording is uploaded with
``transcribe=true``; with no worker anywhere it stays ``queued``, so its event stream stays open.
A client process opens ``SUBSCRIBERS`` streams of ``GET /v1/recordings/{id}/events``, half on
each server (raw asyncio streams on uvloop, one process), and waits until every one has its
first snapshot. Then this process publishes ``EVENTS`` progress events through the Redis event
bus (``voxvault.events.open_event_bus``), ``RATE`` per second, noting the monotonic clock before
each publish; the event's ``progress`` field carries its sequence number. Each subscriber notes
when each event arrives; latency is arrival minus publish, on the one machine-wide monotonic
clock. Baseline, in the same run: a bare redis-py reader in a process of its own, ``XREAD
BLOCK`` on the same stream, timing the same events.

Run alone: ``.venv/bin/python -m bench.sse_fanout [--subscribers N] [--events N] [--rate N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench.backends import (
    Skipped,
    Unavailable,
    postgres_database,
    redis_prefix,
    with_query,
)
from bench.common import (
    BenchError,
    Server,
    clean_env,
    log,
    managed_process,
    process_cpu_s,
    raise_on_sigterm,
    scratch_dir,
    tail,
    voxvault_server,
    wav_header,
)
from bench.report import Row, Table, render_text

TITLE = "SSE fan-out over two API processes and Redis vs a bare Redis reader"
SUBSCRIBERS = 1000
EVENTS = 50
RATE = 2.0  # events per second
SERVERS = 2
CONNECTS_AT_ONCE = 50
READY_TIMEOUT_S = 300.0
GRACE_S = 10.0  # after the last publish, for the last arrivals
POLL_S = 0.1
WAV_DATA_BYTES = 96_000  # one second of 48 kHz 16-bit mono
FD_HEADROOM = 256
IDLE_S = 5.0  # watching the servers while every stream waits
STATS_FLUSH_S = 1.5
STARTUP_S = 60.0


def _now_ns() -> int:
    """CLOCK_MONOTONIC: one clock for every process of the machine, never stepped."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _progress_of(sequence: int, events: int) -> float:
    """The ``progress`` that carries event number ``sequence`` of ``events``."""
    return (sequence + 1) / (events + 1)


def _sequence_of(progress: float, events: int) -> int:
    return round(progress * (events + 1)) - 1


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        if wanted < needed:
            raise BenchError(f"{needed} file descriptors are needed; the hard limit is {hard}")


# ---- the result --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FanoutResult:
    subscribers: int
    events: int
    rate: float
    latencies_ms: Sequence[float]
    """Every (subscriber, event) arrival through the API, publish to arrival."""
    last_arrival_ms: Sequence[float]
    """Per event: when the last subscriber had it."""
    reader_ms: Sequence[float]
    """Per event: the bare Redis reader."""
    missing: int
    failed_streams: Sequence[str]
    """Subscribers whose stream broke or ended before every event came (client's view)."""
    server_errors: Sequence[str]
    """The exception of each traceback the servers logged."""
    per_server_p50_ms: Sequence[float]
    streams_per_server: Sequence[int]
    redis_connections_per_server: Sequence[int]
    publish_ms: float
    """Median time of one publish call (XADD + PEXPIRE in one transaction)."""
    connect_s: float
    idle_cores: float
    idle_transactions_per_s: float
    busy_server_cores: float
    busy_client_cores: float
    per_event_ms: Sequence[Sequence[float]]
    """Per event, in publish order: its latency at each subscriber that had it."""

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_ms)

    @property
    def p99_ms(self) -> float:
        return _percentile(self.latencies_ms, 0.99)

    @property
    def reader_p50_ms(self) -> float:
        return statistics.median(self.reader_ms)

    @property
    def reader_p99_ms(self) -> float:
        return _percentile(self.reader_ms, 0.99)

    def _later_half_row(self) -> Row:
        """p50 / p99 of the second half of the events, after the start-up of the flow."""
        half = len(self.per_event_ms) // 2
        api = [ms for event in self.per_event_ms[half:] for ms in event]
        reader = list(self.reader_ms[half:]) or list(self.reader_ms)
        api_p99, reader_p99 = _percentile(api, 0.99), _percentile(reader, 0.99)
        return Row(
            "Second half of the events only, p50 / p99 (ms; ratio of p99)",
            f"{statistics.median(reader):.2f} / {reader_p99:.2f}",
            f"{statistics.median(api):.2f} / {api_p99:.2f}",
            api_p99 / reader_p99,
        )

    def _load_note(self) -> str:
        tenth = max(1, len(self.per_event_ms) // 10)
        first = [ms for event in self.per_event_ms[:tenth] for ms in event]
        last = [ms for event in self.per_event_ms[-tenth:] for ms in event]
        return (
            f"While the events were published, the two servers kept {self.busy_server_cores:.2f} "
            f"CPU cores busy and the client {self.busy_client_cores:.2f}. Latency p50 / p99 of "
            f"the first {tenth} event(s): {statistics.median(first):.1f} / "
            f"{_percentile(first, 0.99):.1f} ms; of the last {tenth}: "
            f"{statistics.median(last):.1f} / {_percentile(last, 0.99):.1f} ms. A stream's loop "
            "either waits for an event or re-reads the database (after a second without one); "
            "an event that comes during that read waits for it to end."
        )

    def _failure_notes(self) -> list[str]:
        notes = []
        if self.failed_streams:
            kinds = Counter(error.partition(": ")[2] for error in self.failed_streams)
            shown = "; ".join(f"{count} × {kind}" for kind, count in kinds.most_common(3))
            notes.append(
                f"{len(self.failed_streams)} stream(s) broke or ended early, as the client saw "
                f"them: {shown}."
            )
        if self.server_errors:
            kinds = Counter(error.partition(": ")[2] for error in self.server_errors)
            shown = "; ".join(f"{count} × `{kind}`" for kind, count in kinds.most_common(3))
            notes.append(
                f"The servers logged {len(self.server_errors)} traceback(s) meanwhile: {shown}."
            )
        return notes

    def table(self) -> Table:
        last_p50 = statistics.median(self.last_arrival_ms)
        last_p99 = _percentile(self.last_arrival_ms, 0.99)
        expected = self.subscribers * self.events
        return Table(
            title=TITLE,
            baseline_name="bare Redis reader",
            intro=(
                f"{self.subscribers:,} SSE subscribers of one recording's "
                f"`GET /v1/recordings/{{id}}/events`, spread evenly over {SERVERS} `voxvault "
                "serve --workers 0` processes that share one PostgreSQL database and Redis "
                "(`VOXVAULT_EVENTS_URL=redis://…`); the recording stays `queued` (no worker), "
                f"so the streams stay open. {self.events} progress events are published at "
                f"{self.rate:g}/s from a third process through the Redis event bus; latency "
                "runs from just before each publish to its arrival at a subscriber (one "
                "client process, asyncio on uvloop). Baseline: a bare redis-py reader (`XREAD "
                "BLOCK` on the same stream) in its own process, timing the same events. Lower "
                "is better."
            ),
            rows=[
                Row(
                    "Event latency p50 (ms)",
                    f"{self.reader_p50_ms:.2f}",
                    f"{self.p50_ms:.2f}",
                    self.p50_ms / self.reader_p50_ms,
                ),
                Row(
                    "Event latency p99 (ms)",
                    f"{self.reader_p99_ms:.2f}",
                    f"{self.p99_ms:.2f}",
                    self.p99_ms / self.reader_p99_ms,
                ),
                Row(
                    "Event latency max (ms)",
                    f"{max(self.reader_ms):.2f}",
                    f"{max(self.latencies_ms):.2f}",
                    max(self.latencies_ms) / max(self.reader_ms),
                ),
                self._later_half_row(),
                Row(
                    f"Until all {self.subscribers:,} have an event, p50 / p99 (ms; ratio of p99)",
                    f"{self.reader_p50_ms:.2f} / {self.reader_p99_ms:.2f}",
                    f"{last_p50:.2f} / {last_p99:.2f}",
                    last_p99 / self.reader_p99_ms,
                ),
                Row(
                    "Events delivered",
                    f"{len(self.reader_ms):,} of {self.events:,}",
                    f"{expected - self.missing:,} of {expected:,}",
                    (expected - self.missing) / expected,
                ),
                Row(
                    "Streams that broke or ended before the last event",
                    "—",
                    f"{len(self.failed_streams):,} of {self.subscribers:,}",
                    None,
                ),
            ],
            notes=[
                "Ratios are VoxVault / bare reader; the p99 and max ratios compare "
                f"{expected:,} arrivals with {self.events}. Every arrival through the API "
                "passes Redis, the server's one reader task, the subscription's buffer, the "
                "SSE encoder, the socket, and the client's event loop, which itself takes "
                f"in the {self.subscribers:,} copies of each event one after another: the "
                "later ones wait in its queue, which is part of the figures.",
                "Per server: "
                + "; ".join(
                    f"process {i + 1} held {streams:,} connections on its HTTP port and "
                    f"{redis} to Redis, p50 {p50:.2f} ms"
                    for i, (streams, redis, p50) in enumerate(
                        zip(
                            self.streams_per_server,
                            self.redis_connections_per_server,
                            self.per_server_p50_ms,
                            strict=True,
                        )
                    )
                )
                + " (connections counted from /proc while every stream was open).",
                *self._failure_notes(),
                f"While every stream was open and no event came ({IDLE_S:.0f} s), the two "
                f"servers kept {self.idle_cores:.2f} CPU cores busy and the database served "
                f"{self.idle_transactions_per_s:,.0f} transactions/s: each open stream re-reads "
                "the recording and its latest job every second (`Vault.watch`), Redis or not.",
                self._load_note(),
                f"One publish (XADD and PEXPIRE in one transaction) took {self.publish_ms:.2f} ms "
                f"(median). Opening the {self.subscribers:,} streams until each had its "
                f"first snapshot took {self.connect_s:.1f} s.",
                "All processes (two servers, PostgreSQL, Redis, client, reader, publisher) "
                f"share the machine's {len(os.sched_getaffinity(0))} CPUs.",
            ],
        )


# ---- the client process: many SSE streams ------------------------------------------------------


async def _request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int, path: str
) -> bool:
    """Send the GET and read the answer's head; whether the body is chunked."""
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
        "Cache-Control: no-cache\r\n\r\n".encode()
    )
    status = await reader.readline()
    if b" 200 " not in status:
        raise BenchError(f"the events stream answered {status!r}")
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "transfer-encoding":
            chunked = "chunked" in value.lower()
    return chunked


async def _body(reader: asyncio.StreamReader, *, chunked: bool) -> AsyncIterator[bytes]:
    """The body's bytes as they come, without the chunked framing."""
    while True:
        if chunked:
            line = await reader.readline()
            if not line:
                raise BenchError("the server closed the stream without its last chunk")
            size = int(line.split(b";")[0], 16)
            if size == 0:
                return
            data = (await reader.readexactly(size + 2))[:-2]
        else:
            data = await reader.read(65536)
            if not data:
                return
        yield data


def _split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The complete SSE events in ``buffer`` (a blank line ends one), and the rest."""
    blocks: list[bytes] = []
    while True:
        ends = [i for i in (buffer.find(b"\r\n\r\n"), buffer.find(b"\n\n")) if i >= 0]
        if not ends:
            return blocks, buffer
        cut = min(ends)
        blocks.append(buffer[:cut])
        buffer = buffer[cut:].lstrip(b"\r\n")


class _Client:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.events: int = spec["events"]
        self.subscribers: int = spec["subscribers"]
        self.arrivals: list[list[int | None]] = [
            [None] * self.events for _ in range(self.subscribers)
        ]
        self.errors: list[str] = []
        self.ready = 0
        self.all_ready = asyncio.Event()
        self.gate = asyncio.Semaphore(CONNECTS_AT_ONCE)

    async def subscriber(self, index: int) -> None:
        host, port = self.spec["servers"][index % len(self.spec["servers"])]
        got_snapshot = False
        writer = None
        try:
            async with self.gate:
                reader, writer = await asyncio.open_connection(host, port)
                chunked = await _request(reader, writer, host, port, self.spec["path"])
            remaining = self.events
            buffer = b""
            async for data in _body(reader, chunked=chunked):
                arrived = _now_ns()
                blocks, buffer = _split_events(buffer + data)
                for block in blocks:
                    kind, sequence = self._parse(block)
                    if kind == "snapshot" and not got_snapshot:
                        got_snapshot = True
                        self._one_ready()
                    elif kind == "progress" and self.arrivals[index][sequence] is None:
                        self.arrivals[index][sequence] = arrived
                        remaining -= 1
                if not remaining:
                    break
            if remaining:
                raise BenchError(f"the stream ended with {remaining} event(s) still to come")
        except (OSError, asyncio.IncompleteReadError, ValueError, BenchError) as exc:
            self.errors.append(f"subscriber {index}: {type(exc).__name__}: {exc}")
        finally:
            if not got_snapshot:
                self._one_ready()  # counted, so that the others do not wait for it forever
            if writer is not None:
                writer.close()

    def _parse(self, block: bytes) -> tuple[str, int]:
        """(the event's ``type`` or "", its sequence number or -1) of one SSE event."""
        data = [
            line[5:].strip() for line in block.decode().splitlines() if line.startswith("data:")
        ]
        if not data:
            return "", -1  # a keep-alive comment
        event = json.loads("\n".join(data))
        if event.get("type") == "progress" and event.get("stage") == "transcribe":
            sequence = _sequence_of(float(event["progress"]), self.events)
            if 0 <= sequence < self.events:
                return "progress", sequence
        return str(event.get("type", "")), -1

    def _one_ready(self) -> None:
        self.ready += 1
        if self.ready >= self.subscribers:
            self.all_ready.set()

    async def run(self) -> None:
        started = time.monotonic()
        tasks = [asyncio.create_task(self.subscriber(i)) for i in range(self.subscribers)]
        try:
            await asyncio.wait_for(self.all_ready.wait(), READY_TIMEOUT_S)
        except TimeoutError:
            self.errors.append(f"only {self.ready} subscribers had a snapshot in time")
        Path(self.spec["ready"]).write_text(json.dumps({"seconds": time.monotonic() - started}))
        published = Path(self.spec["published"])
        deadline: float | None = None
        while not all(task.done() for task in tasks):
            if deadline is None and published.exists():
                deadline = time.monotonic() + GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_S)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        staging = Path(self.spec["out"] + ".tmp")
        staging.write_text(json.dumps({"arrivals": self.arrivals, "errors": self.errors}))
        staging.replace(self.spec["out"])


def _client_main(spec_path: Path) -> None:
    import uvloop

    spec = json.loads(spec_path.read_text())
    _raise_fd_limit(spec["subscribers"] + FD_HEADROOM)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_Client(spec).run())


# ---- the baseline process: a bare Redis reader -------------------------------------------------


def _reader_main(spec_path: Path) -> None:
    import redis

    spec = json.loads(spec_path.read_text())
    events: int = spec["events"]
    arrivals: list[int | None] = [None] * events
    client = redis.Redis.from_url(spec["redis"], decode_responses=True)
    try:
        client.ping()
        Path(spec["ready"]).write_text("ready")
        published = Path(spec["published"])
        deadline: float | None = None
        last = "0-0"
        while any(a is None for a in arrivals):
            if deadline is None and published.exists():
                deadline = time.monotonic() + GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                break
            reply: Any = client.xread({spec["key"]: last}, count=1000, block=200)
            arrived = _now_ns()
            for _key, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    event = json.loads(fields["data"])
                    sequence = _sequence_of(float(event["progress"]), events)
                    if 0 <= sequence < events and arrivals[sequence] is None:
                        arrivals[sequence] = arrived
    finally:
        client.close()
    staging = Path(spec["out"] + ".tmp")
    staging.write_text(json.dumps({"arrivals": arrivals}))
    staging.replace(spec["out"])


# ---- the orchestration -------------------------------------------------------------------------


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _tcp_connections(pid: int) -> list[tuple[int, int]]:
    """(local port, remote port) of every established TCP connection process ``pid`` holds."""
    mine = _socket_inodes(pid)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                # local, remote, state (01 = established), ..., inode is field 9
                if fields[3] == "01" and int(fields[9]) in mine:
                    local_port = int(fields[1].rpartition(":")[2], 16)
                    remote_port = int(fields[2].rpartition(":")[2], 16)
                    found.append((local_port, remote_port))
    return found


def _wait_for_file(path: Path, proc: Any, log_path: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise BenchError(f"the {what} process exited with {proc.returncode}:\n{tail(log_path)}")
        if time.monotonic() > deadline:
            raise BenchError(f"the {what} process was not done in {timeout:.0f} s")
        time.sleep(POLL_S)


async def _publish(
    events_url: str, channel: str, events: int, rate: float, job_id: str | None
) -> tuple[list[int], list[float]]:
    """Publish the events through the bus; (send time of each, duration of each publish)."""
    from voxvault.events import ProgressEvent, open_event_bus

    sent: list[int] = []
    durations: list[float] = []
    async with open_event_bus(events_url) as bus:
        # Connected before the first timed event, on a channel of its own (its key goes with
        # the prefix's).
        await bus.publish(f"{channel}-warmup", ProgressEvent(type="progress", status="queued"))
        started = time.monotonic()
        for sequence in range(events):
            await asyncio.sleep(max(0.0, started + sequence / rate - time.monotonic()))
            event = ProgressEvent(
                type="progress",
                status="processing",
                stage="transcribe",
                progress=_progress_of(sequence, events),
                job_id=job_id,
            )
            before = _now_ns()
            await bus.publish(channel, event)
            sent.append(before)
            durations.append((_now_ns() - before) / 1e6)
    return sent, durations


def _queued_recording(server: Server) -> tuple[str, str | None]:
    """Upload a short WAV for transcription; with no worker it stays queued. (id, job id)"""
    wav = wav_header(WAV_DATA_BYTES) + os.urandom(WAV_DATA_BYTES)
    with httpx.Client(base_url=server.base_url, timeout=60.0, trust_env=False) as client:
        answer = client.post(
            "/v1/recordings",
            params={"filename": "fanout.wav", "transcribe": "true"},
            content=wav,
            headers={"Content-Type": "audio/wav"},
        )
        if answer.status_code != 201:
            raise BenchError(f"the upload answered {answer.status_code}: {answer.text[:300]}")
        recording = answer.json()
        if recording["status"] != "queued":
            raise BenchError(f"the recording is {recording['status']}, not queued")
        jobs = client.get(f"/v1/recordings/{recording['id']}/jobs").json()["items"]
    return recording["id"], jobs[0]["id"] if jobs else None


@dataclass(frozen=True, slots=True)
class _Busy:
    """CPU time per wall-clock second while the events were published."""

    servers: float
    client: float


@dataclass(frozen=True, slots=True)
class _Idle:
    """What the servers did while every stream was open and no event came."""

    cores: float
    """CPU time of both servers per wall-clock second."""
    transactions_per_s: float
    """Transactions per second on the benchmark's PostgreSQL database."""


def _database_transactions(database_url: str) -> int:
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as connection:
        row = connection.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


def _idle_cost(servers: Sequence[Server], database_url: str) -> _Idle:
    """Watch the servers for ``IDLE_S`` while the streams wait for events."""
    cpu_before = sum(process_cpu_s(s.pid) for s in servers)
    transactions_before = _database_transactions(database_url)
    started = time.monotonic()
    time.sleep(IDLE_S)
    # PostgreSQL flushes a backend's counters at most once a second: let them arrive.
    cpu = sum(process_cpu_s(s.pid) for s in servers) - cpu_before
    elapsed = time.monotonic() - started
    time.sleep(STATS_FLUSH_S)
    transactions = _database_transactions(database_url) - transactions_before
    return _Idle(cpu / elapsed, transactions / (elapsed + STATS_FLUSH_S))


def _spawn(
    stack: contextlib.ExitStack, role: str, spec: dict[str, Any], workdir: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    """This module as the ``role`` process (client or reader), stopped with the stack."""
    spec_path = workdir / f"{role}-spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = workdir / f"{role}.log"
    argv = [sys.executable, "-m", "bench.sse_fanout", f"--{role}", str(spec_path)]
    return stack.enter_context(managed_process(argv, log_path=log_path)), log_path


def _server_errors(workdir: Path) -> list[str]:
    """The exception of each error the servers logged with a traceback (uvicorn's
    ``ERROR:`` records), in order."""
    found = []
    for number in range(SERVERS):
        text = (workdir / f"server-{number}.log").read_text(errors="replace")
        for record in re.split(r"\n(?=[A-Z]+: )", text):
            if not record.startswith("ERROR:") or "Traceback" not in record:
                continue
            lines = [line for line in record.splitlines() if line and not line[0].isspace()]
            found.append(f"server {number + 1}: {lines[-1]}")
    return found


def _measure(
    workdir: Path,
    database_url: str,
    redis_url: str,
    prefix: str,
    subscribers: int,
    events: int,
    rate: float,
) -> FanoutResult:
    from voxvault.metadata import DEFAULT_WORKSPACE

    _raise_fd_limit(subscribers + FD_HEADROOM)  # inherited by the servers
    events_url = with_query(redis_url, prefix=prefix)
    data_dir = workdir / "data"
    env = {
        **clean_env(),
        "VOXVAULT_DATABASE_URL": database_url,
        "VOXVAULT_EVENTS_URL": events_url,
        "VOXVAULT_BLOB_URL": (data_dir / "blobs").as_uri(),
    }
    files = {
        name: workdir / f"{name}.json"
        for name in ("client-ready", "reader-ready", "published", "client-out", "reader-out")
    }
    with contextlib.ExitStack() as stack:
        servers: list[Server] = []
        for number in range(SERVERS):  # one after another: the first one migrates the database
            server_log = workdir / f"server-{number}.log"
            serve = voxvault_server(data_dir, server_log, serve_args=["--workers", "0"], env=env)
            servers.append(stack.enter_context(serve))
        recording_id, job_id = _queued_recording(servers[0])
        # The channel and stream key as the vault and the Redis bus name them.
        channel = f"{DEFAULT_WORKSPACE}:{recording_id}"
        log(f"[sse] opening {subscribers:,} event streams over {SERVERS} servers")
        client, client_log = _spawn(
            stack,
            "client",
            {
                "servers": [("127.0.0.1", s.port) for s in servers],
                "path": f"/v1/recordings/{recording_id}/events",
                "subscribers": subscribers,
                "events": events,
                "ready": str(files["client-ready"]),
                "published": str(files["published"]),
                "out": str(files["client-out"]),
            },
            workdir,
        )
        _wait_for_file(files["client-ready"], client, client_log, READY_TIMEOUT_S + 30, "client")
        connect_s = float(json.loads(files["client-ready"].read_text())["seconds"])
        redis_port = urlsplit(redis_url).port or 6379
        connections = [_tcp_connections(s.pid) for s in servers]
        streams = [
            sum(1 for local, _ in held if local == s.port)
            for s, held in zip(servers, connections, strict=True)
        ]
        to_redis = [sum(1 for _, remote in held if remote == redis_port) for held in connections]
        log(f"[sse] streams open after {connect_s:.1f} s: {streams} per server")
        idle = _idle_cost(servers, database_url)
        log(
            f"[sse] idle, waiting for events: servers {idle.cores:.2f} cores busy, PostgreSQL "
            f"{idle.transactions_per_s:,.0f} transactions/s"
        )
        reader, reader_log = _spawn(
            stack,
            "reader",
            {
                "redis": redis_url,
                "key": f"{prefix}:{channel}",
                "events": events,
                "ready": str(files["reader-ready"]),
                "published": str(files["published"]),
                "out": str(files["reader-out"]),
            },
            workdir,
        )
        _wait_for_file(files["reader-ready"], reader, reader_log, STARTUP_S, "reader")
        log(f"[sse] publishing {events} events at {rate:g}/s")
        cpu_before = [process_cpu_s(pid) for pid in (*(s.pid for s in servers), client.pid)]
        started = time.monotonic()
        sent, durations = asyncio.run(_publish(events_url, channel, events, rate, job_id))
        elapsed = time.monotonic() - started
        cpu = [
            process_cpu_s(pid) - before
            for pid, before in zip((*(s.pid for s in servers), client.pid), cpu_before, strict=True)
        ]
        busy = _Busy(sum(cpu[:-1]) / elapsed, cpu[-1] / elapsed)
        files["published"].write_text("published")
        _wait_for_file(files["client-out"], client, client_log, GRACE_S + STARTUP_S, "client")
        _wait_for_file(files["reader-out"], reader, reader_log, GRACE_S + STARTUP_S, "reader")
    client_out = json.loads(files["client-out"].read_text())
    reader_out = json.loads(files["reader-out"].read_text())
    return _result(
        subscribers,
        events,
        rate,
        sent,
        client_out,
        reader_out["arrivals"],
        server_errors=_server_errors(workdir),
        streams=streams,
        to_redis=to_redis,
        publish_ms=statistics.median(durations),
        connect_s=connect_s,
        idle=idle,
        busy=busy,
    )


def _result(
    subscribers: int,
    events: int,
    rate: float,
    sent: Sequence[int],
    client_out: dict[str, Any],
    reader_arrivals: Sequence[int | None],
    *,
    server_errors: Sequence[str],
    streams: Sequence[int],
    to_redis: Sequence[int],
    publish_ms: float,
    connect_s: float,
    idle: _Idle,
    busy: _Busy,
) -> FanoutResult:
    latencies: list[float] = []
    per_server: list[list[float]] = [[] for _ in range(SERVERS)]
    last: list[float] = []
    per_event: list[list[float]] = []
    missing = 0
    for sequence, sent_ns in enumerate(sent):
        slowest = 0.0
        this_event: list[float] = []
        for index, arrivals in enumerate(client_out["arrivals"]):
            arrived = arrivals[sequence]
            if arrived is None:
                missing += 1
                continue
            latency = (arrived - sent_ns) / 1e6
            latencies.append(latency)
            this_event.append(latency)
            per_server[index % SERVERS].append(latency)
            slowest = max(slowest, latency)
        last.append(slowest)
        per_event.append(this_event)
    reader_ms = [
        (arrived - sent_ns) / 1e6
        for arrived, sent_ns in zip(reader_arrivals, sent, strict=True)
        if arrived is not None
    ]
    if not latencies or not reader_ms:
        shown = "; ".join([*client_out["errors"][:3], *server_errors[:3]])
        raise BenchError(f"no event arrived through the API or from Redis: {shown}")
    return FanoutResult(
        subscribers=subscribers,
        events=events,
        rate=rate,
        latencies_ms=latencies,
        last_arrival_ms=last,
        reader_ms=reader_ms,
        missing=missing,
        failed_streams=client_out["errors"],
        server_errors=server_errors,
        per_server_p50_ms=[statistics.median(v) if v else math.nan for v in per_server],
        streams_per_server=streams,
        redis_connections_per_server=to_redis,
        publish_ms=publish_ms,
        connect_s=connect_s,
        idle_cores=idle.cores,
        idle_transactions_per_s=idle.transactions_per_s,
        busy_server_cores=busy.servers,
        busy_client_cores=busy.client,
        per_event_ms=per_event,
    )


def run(
    subscribers: int = SUBSCRIBERS, events: int = EVENTS, rate: float = RATE
) -> FanoutResult | Skipped:
    with scratch_dir("sse") as workdir, contextlib.ExitStack() as stack:
        try:
            database_url = stack.enter_context(postgres_database("sse"))
            redis_url, prefix = stack.enter_context(redis_prefix("sse"))
        except Unavailable as exc:
            log(f"[sse] skipped: {exc}")
            return Skipped(TITLE, str(exc))
        return _measure(workdir, database_url, redis_url, prefix, subscribers, events, rate)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--subscribers", type=int, default=SUBSCRIBERS, help="SSE streams")
    parser.add_argument("--events", type=int, default=EVENTS, help="events published")
    parser.add_argument("--rate", type=float, default=RATE, help="events per second")
    parser.add_argument("--client", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reader", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client is not None:
        _client_main(args.client)
        return
    if args.reader is not None:
        _reader_main(args.reader)
        return
    if args.subscribers < SERVERS or args.events < 1 or not 0 < args.rate <= 1000:
        parser.error(f"at least {SERVERS} subscribers, 1 event, and a rate in (0, 1000]")
    raise_on_sigterm()
    print(render_text(run(args.subscribers, args.events, args.rate).table()))


if __name__ == "__main__":
    main()

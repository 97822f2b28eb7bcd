"""API latency while a transcription runs in the same server, vs the same server idle.

A real ``voxvault serve --workers 1`` process. A short recording is uploaded and transcribed
first (so the model is loaded and the server warm); it is the target of every request: one
keep-alive httpx client sends sequential ``GET /v1/recordings/{id}`` and times each. Three
phases, measured in ``BLOCKS`` interleaved blocks so that a change in the machine's other load
hits all of them alike:

- idle: nothing else runs;
- busy: the server's worker transcribes a long speech MP3 (a new job of a stored recording per
  block; the block starts once the job is in the ``transcribe`` stage and is refused if the
  job left that stage before the block ended; the job is cancelled after it);
- control: the server idles while the same transcription (same model and settings) runs in
  *another* process (``--engine-only``, paused with SIGSTOP between blocks). That takes CPU
  time from the server but not its GIL, so busy vs control is what sharing the server's
  interpreter with the engine costs.

Run alone: ``.venv/bin/python -m bench.api_latency [--requests N] [--seconds N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    BenchError,
    Server,
    log,
    managed_process,
    raise_on_sigterm,
    scratch_dir,
    tail,
    voxvault_server,
    wait_until_quiet,
)
from bench.report import Row, Table, render_text
from bench.speech import check, job_of, make_speech_mp3, succeeded, upload, wait_for_job

REQUESTS = 1500
BLOCKS = 3
WARMUP_REQUESTS = 100
SPEECH_SECONDS = 120.0
ENGINE_SETTLE_S = 0.5
TARGET_SECONDS = 10.0
P99_GOAL = 2.0
WAIT_TIMEOUT_S = 300.0
POLL_S = 0.1
ENGINE_READY = "engine: transcribing"


@dataclass(frozen=True, slots=True)
class Phase:
    latencies_s: Sequence[float]
    seconds: float

    def __add__(self, other: Phase) -> Phase:
        return Phase([*self.latencies_s, *other.latencies_s], self.seconds + other.seconds)

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies_s)
        index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
        return ordered[index]

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_s) * 1000

    @property
    def p99_ms(self) -> float:
        return self.percentile(0.99) * 1000

    @property
    def max_ms(self) -> float:
        return max(self.latencies_s) * 1000

    @property
    def per_second(self) -> float:
        return len(self.latencies_s) / self.seconds


@dataclass(frozen=True, slots=True)
class LatencyResult:
    idle: Phase
    busy: Phase
    other_process: Phase
    audio_seconds: float
    blocks: int

    @property
    def p99_ratio(self) -> float:
        return self.busy.p99_ms / self.idle.p99_ms

    def _idle_note(self) -> list[str]:
        if self.busy.p50_ms >= self.idle.p50_ms:
            return []
        return [
            "The median request was faster while the server transcribed than while it "
            f"idled ({self.busy.p50_ms:.2f} against {self.idle.p50_ms:.2f} ms): medians this "
            "close move with the machine's other load; compare them over several runs."
        ]

    def table(self) -> Table:
        met = self.p99_ratio <= P99_GOAL
        n = len(self.idle.latencies_s)
        return Table(
            title="API latency while a transcription runs vs idle",
            baseline_name="idle server",
            intro=(
                "A `voxvault serve --workers 1` process; one keep-alive httpx client sends "
                f"sequential `GET /v1/recordings/{{id}}` (a recording the server has already "
                f"transcribed, so the model is loaded), {n:,} per phase in {self.blocks} "
                "interleaved blocks: with the server idle (baseline), and while its worker "
                f"transcribes {self.audio_seconds:.0f} s of speech (VoxVault column; each "
                "block runs while a job of that MP3 is in the `transcribe` stage, checked "
                "before and after). Client, server and the speech engine share the machine's "
                "CPUs. Latency: lower is better."
            ),
            rows=[
                Row(
                    "p50 latency (ms)",
                    f"{self.idle.p50_ms:.2f}",
                    f"{self.busy.p50_ms:.2f}",
                    self.busy.p50_ms / self.idle.p50_ms,
                ),
                Row(
                    "p99 latency (ms)",
                    f"{self.idle.p99_ms:.2f}",
                    f"{self.busy.p99_ms:.2f}",
                    self.p99_ratio,
                    f"busy ≤ {P99_GOAL:.0f}× idle",
                    "met" if met else "**missed**",
                ),
                Row(
                    "max latency (ms)",
                    f"{self.idle.max_ms:.2f}",
                    f"{self.busy.max_ms:.2f}",
                    self.busy.max_ms / self.idle.max_ms,
                ),
                Row(
                    "Control: p50 / p99 (ms) while the engine runs in another process",
                    f"{self.idle.p50_ms:.2f} / {self.idle.p99_ms:.2f}",
                    f"{self.other_process.p50_ms:.2f} / {self.other_process.p99_ms:.2f}",
                    self.other_process.p99_ms / self.idle.p99_ms,
                ),
                Row(
                    "Requests/s (one sequential client)",
                    f"{self.idle.per_second:,.0f}",
                    f"{self.busy.per_second:,.0f}",
                    self.busy.per_second / self.idle.per_second,
                ),
            ],
            notes=[
                "The VoxVault column is the same server while it transcribes; the ratio is "
                "busy / idle (for latency, lower is better).",
                "Control row: the same requests to the idle server while the same "
                "transcription (same model and settings) runs in a separate process: the "
                "server then competes for CPU time but not for its GIL. Busy p99 "
                f"{self.busy.p99_ms:.1f} ms with the engine in the server against "
                f"{self.other_process.p99_ms:.1f} ms with it in another process.",
                f"The engine beside the API runs on {_engine_threads()} CPU thread(s) of "
                f"{len(os.sched_getaffinity(0))} cores (`VOXVAULT_WHISPER_CPU_THREADS` unset: "
                "all cores but one), so requests keep a core of their own; with the engine on "
                "every core, p99 while transcribing measured about 3× idle on 2 cores.",
                *self._idle_note(),
            ],
        )


def _engine_threads() -> int:
    from voxvault import Settings
    from voxvault.transcription import engine_threads

    return engine_threads(Settings(), beside_api=True)


def _measure(client: httpx.Client, url: str, count: int) -> Phase:
    latencies = []
    started = time.perf_counter()
    for _ in range(count):
        sent = time.perf_counter()
        response = client.get(url)
        latencies.append(time.perf_counter() - sent)
        if response.status_code != 200:
            raise BenchError(f"GET {url} answered {response.status_code}: {response.text[:300]}")
    return Phase(latencies, time.perf_counter() - started)


def _in_transcribe(job: dict[str, Any]) -> bool:
    return bool(job["status"] == "running" and job["stage"] == "transcribe")


def _engine_only(source: Path) -> None:
    """Transcribe ``source`` over and over as the pipeline's engine would, until killed."""
    from voxvault import Settings
    from voxvault.transcription import open_transcriber

    settings = Settings(data_dir=source.parent / "engine")
    transcriber = open_transcriber(settings, beside_api=True)  # the server's engine settings
    print(ENGINE_READY, flush=True)
    while True:
        transcriber.transcribe(source)


@contextlib.contextmanager
def _paused_engine(source: Path, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``_engine_only`` on ``source`` in another process, started and then paused (SIGSTOP)."""
    log_path = workdir / "engine.log"
    argv = [sys.executable, "-m", "bench.api_latency", "--engine-only", str(source)]
    with managed_process(argv, log_path=log_path) as proc:
        try:
            deadline = time.monotonic() + WAIT_TIMEOUT_S
            while ENGINE_READY not in tail(log_path):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"the engine process did not start:\n{tail(log_path)}")
                time.sleep(POLL_S)
            time.sleep(ENGINE_SETTLE_S)  # into the transcription proper
            os.kill(proc.pid, signal.SIGSTOP)
            yield proc
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # so that it can take the SIGTERM


def _beside_engine(
    client: httpx.Client, url: str, count: int, engine: subprocess.Popen[bytes]
) -> Phase:
    os.kill(engine.pid, signal.SIGCONT)
    try:
        time.sleep(ENGINE_SETTLE_S)
        phase = _measure(client, url, count)
    finally:
        os.kill(engine.pid, signal.SIGSTOP)
    if engine.poll() is not None:
        raise BenchError("the engine process ended during the measurement")
    return phase


def _during_job(
    server: Server, client: httpx.Client, url: str, count: int, recording_id: str
) -> Phase:
    job = check(client.post(f"/v1/recordings/{recording_id}/transcribe"), 202)
    try:
        wait_for_job(client, job["id"], _in_transcribe, "reach the transcribe stage")
        time.sleep(ENGINE_SETTLE_S)
        phase = _measure(client, url, count)
        after = check(client.get(f"/v1/jobs/{job['id']}"))
        if not _in_transcribe(after):
            raise BenchError(
                f"the job left the transcribe stage during the measurement ({after['status']}, "
                f"{after['stage']}); use a longer file (--seconds)"
            )
    finally:
        check(client.post(f"/v1/jobs/{job['id']}/cancel"))
        # The worker stops within a segment of the engine: wait for it, so the next block
        # measures an idle server.
        wait_until_quiet(server.pid)
    return phase


def run(requests: int = REQUESTS, seconds: float = SPEECH_SECONDS) -> LatencyResult:
    per_block = -(-requests // BLOCKS)
    idle = busy = other = Phase([], 0.0)
    with scratch_dir("latency") as workdir:
        target = workdir / "short.mp3"
        make_speech_mp3(target, TARGET_SECONDS, seed=3)
        speech = workdir / "long.mp3"
        audio_seconds = make_speech_mp3(speech, seconds, seed=4)
        with (
            voxvault_server(
                workdir / "data", workdir / "server.log", serve_args=["--workers", "1"]
            ) as server,
            httpx.Client(base_url=server.base_url, timeout=60.0, trust_env=False) as client,
            _paused_engine(speech, workdir) as engine,
        ):
            recording = upload(client, target, transcribe=True)
            wait_for_job(client, job_of(client, recording["id"])["id"], succeeded, "succeed")
            long = upload(client, speech, transcribe=False)
            url = f"/v1/recordings/{recording['id']}"
            _measure(client, url, WARMUP_REQUESTS)
            for number in range(1, BLOCKS + 1):
                block_idle = _measure(client, url, per_block)
                block_busy = _during_job(server, client, url, per_block, long["id"])
                block_other = _beside_engine(client, url, per_block, engine)
                log(
                    f"[latency] block {number}: p50 / p99 ms idle {block_idle.p50_ms:.2f} / "
                    f"{block_idle.p99_ms:.2f}, transcribing {block_busy.p50_ms:.2f} / "
                    f"{block_busy.p99_ms:.2f}, engine in another process "
                    f"{block_other.p50_ms:.2f} / {block_other.p99_ms:.2f}"
                )
                idle, busy, other = idle + block_idle, busy + block_busy, other + block_other
    return LatencyResult(idle, busy, other, audio_seconds, BLOCKS)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=REQUESTS, help="requests per phase")
    parser.add_argument("--seconds", type=float, default=SPEECH_SECONDS, help="speech length")
    parser.add_argument("--engine-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine_only is not None:
        _engine_only(args.engine_only)
        return
    if args.requests < 100:
        parser.error("--requests must be at least 100")
    raise_on_sigterm()
    print(render_text(run(args.requests, args.seconds).table()))


if __name__ == "__main__":
    main()

"""Pipeline throughput of ``voxvault serve --workers 2`` vs ``--workers 1`` on this machine.

``RECORDINGS`` different speech MP3s of about ``SPEECH_SECONDS`` each are uploaded at once to
a fresh server, which has first transcribed a short clip (so the model is loaded); the time
runs from the first upload to the last job's success. Rounds alternate 1 2 2 1 ...; a fresh
server and data directory each time. The server's CPU time (its own and its decoder
children's, from ``/proc``) says how many cores it kept busy.

Run alone: ``.venv/bin/python -m bench.worker_throughput [--recordings N] [--seconds N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from bench.common import (
    BenchError,
    log,
    process_cpu_s,
    raise_on_sigterm,
    scratch_dir,
    voxvault_server,
)
from bench.report import Row, Table, render_text
from bench.speech import job_of, make_speech_mp3, succeeded, upload, wait_for_job

RECORDINGS = 4
SPEECH_SECONDS = 45.0
WARMUP_SECONDS = 8.0
ROUNDS = 2
WORKER_COUNTS = (1, 2)


@dataclass(frozen=True, slots=True)
class Batch:
    workers: int
    wall_s: float
    cpu_s: float
    job_seconds: Sequence[float]
    """Each job's own time, from its start (claim) to its end."""


@dataclass(frozen=True, slots=True)
class ThroughputResult:
    audio_seconds: Sequence[float]
    batches: Sequence[Batch]
    cpus: int

    def _batches(self, workers: int) -> list[Batch]:
        return [b for b in self.batches if b.workers == workers]

    def wall_s(self, workers: int) -> float:
        return statistics.median(b.wall_s for b in self._batches(workers))

    def per_minute(self, workers: int) -> float:
        return len(self.audio_seconds) / self.wall_s(workers) * 60

    def audio_per_second(self, workers: int) -> float:
        return sum(self.audio_seconds) / self.wall_s(workers)

    def cores_busy(self, workers: int) -> float:
        return statistics.median(b.cpu_s / b.wall_s for b in self._batches(workers))

    def job_s(self, workers: int) -> float:
        return statistics.median(s for b in self._batches(workers) for s in b.job_seconds)

    def table(self) -> Table:
        one, two = WORKER_COUNTS
        count = len(self.audio_seconds)
        audio = sum(self.audio_seconds)
        rounds = len(self._batches(one))
        per_batch = "; ".join(
            f"{b.workers} worker{'s' if b.workers > 1 else ''}: {b.wall_s:.1f} s, "
            f"{b.cpu_s / b.wall_s:.2f} cores busy"
            for b in self.batches
        )
        return Table(
            title=f"Pipeline throughput: `--workers {two}` vs `--workers {one}`",
            baseline_name=f"--workers {one}",
            intro=(
                f"{count} different speech MP3s ({audio:.0f} s of audio in all, "
                f"{min(self.audio_seconds):.0f}–{max(self.audio_seconds):.0f} s each) uploaded "
                "at once to a fresh `voxvault serve` process that has already transcribed a "
                "short clip (model loaded); timed from the first upload to the last job's "
                f"success. {rounds} rounds each, alternating; medians. Higher is better, except "
                f"for times. The machine has {self.cpus} CPUs."
            ),
            rows=[
                Row(
                    "Recordings per minute",
                    f"{self.per_minute(one):.2f}",
                    f"{self.per_minute(two):.2f}",
                    self.per_minute(two) / self.per_minute(one),
                ),
                Row(
                    "Audio seconds per wall-clock second",
                    f"{self.audio_per_second(one):.2f}",
                    f"{self.audio_per_second(two):.2f}",
                    self.audio_per_second(two) / self.audio_per_second(one),
                ),
                Row(
                    f"Wall time for the {count} recordings (s)",
                    f"{self.wall_s(one):.1f}",
                    f"{self.wall_s(two):.1f}",
                    self.wall_s(two) / self.wall_s(one),
                ),
                Row(
                    "One job, claim to end (s, median)",
                    f"{self.job_s(one):.1f}",
                    f"{self.job_s(two):.1f}",
                    self.job_s(two) / self.job_s(one),
                ),
                Row(
                    "Server CPU cores kept busy (CPU s / wall s)",
                    f"{self.cores_busy(one):.2f}",
                    f"{self.cores_busy(two):.2f}",
                    self.cores_busy(two) / self.cores_busy(one),
                ),
            ],
            notes=[
                f"Two workers on {self.cpus} cores are not expected to double throughput: "
                "CTranslate2 already runs each transcription on several intra-op threads (two "
                "here, one per core), so one worker can keep more than one core busy; "
                "the normalize step's decoder is a process of its own; and both workers share "
                "the one model loaded per process, a CTranslate2 replica with faster-whisper's "
                "default `num_workers=1`, which runs one batch at a time, so the two jobs "
                "overlap only outside the model. The job-time and CPU rows show what the "
                "second worker bought on this machine.",
                f"Per batch: {per_batch}.",
            ],
        )


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _batch(workers: int, files: Sequence[Path], warmup: Path, workdir: Path, name: str) -> Batch:
    data_dir = workdir / f"data-{name}"
    with (
        voxvault_server(
            data_dir, workdir / f"server-{name}.log", serve_args=["--workers", str(workers)]
        ) as server,
        httpx.Client(base_url=server.base_url, timeout=60.0, trust_env=False) as client,
    ):
        first = upload(client, warmup, transcribe=True)
        wait_for_job(client, job_of(client, first["id"])["id"], succeeded, "succeed")
        cpu_before = process_cpu_s(server.pid)
        started = time.perf_counter()
        recordings = [upload(client, path, transcribe=True) for path in files]
        jobs = [job_of(client, recording["id"])["id"] for recording in recordings]
        finished = [wait_for_job(client, job_id, succeeded, "succeed") for job_id in jobs]
        wall = time.perf_counter() - started
        cpu = process_cpu_s(server.pid) - cpu_before
    job_seconds = []
    for job in finished:
        if not job["started_at"] or not job["finished_at"]:
            raise BenchError(f"job {job['id']} has no start or end time: {job}")
        took = _parse_time(job["finished_at"]) - _parse_time(job["started_at"])
        job_seconds.append(took.total_seconds())
    return Batch(workers, wall, cpu, job_seconds)


def run(
    recordings: int = RECORDINGS, seconds: float = SPEECH_SECONDS, rounds: int = ROUNDS
) -> ThroughputResult:
    batches: list[Batch] = []
    with scratch_dir("workers") as workdir:
        files = [workdir / f"speech-{i}.mp3" for i in range(recordings)]
        audio = [make_speech_mp3(path, seconds, seed=10 + i) for i, path in enumerate(files)]
        warmup = workdir / "warmup.mp3"
        make_speech_mp3(warmup, WARMUP_SECONDS, seed=9)
        for number in range(rounds):
            order = WORKER_COUNTS if number % 2 == 0 else tuple(reversed(WORKER_COUNTS))
            for workers in order:
                batch = _batch(workers, files, warmup, workdir, f"{number}-{workers}")
                batches.append(batch)
                log(
                    f"[workers] round {number + 1}, --workers {workers}: {batch.wall_s:.1f} s, "
                    f"{batch.cpu_s / batch.wall_s:.2f} cores busy, jobs "
                    + ", ".join(f"{s:.1f}" for s in batch.job_seconds)
                    + " s"
                )
    return ThroughputResult(audio, batches, len(os.sched_getaffinity(0)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--recordings", type=int, default=RECORDINGS, choices=range(2, 21))
    parser.add_argument("--seconds", type=float, default=SPEECH_SECONDS, help="speech per file")
    parser.add_argument("--rounds", type=int, default=ROUNDS, choices=range(1, 11))
    args = parser.parse_args(argv)
    if args.seconds < 5:
        parser.error("--seconds must be at least 5")
    raise_on_sigterm()
    print(render_text(run(args.recordings, args.seconds, args.rounds).table()))


if __name__ == "__main__":
    main()

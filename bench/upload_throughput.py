"""Streaming upload throughput vs raw disk, and the server's peak memory while it streams.

Baseline: ``dd bs=1M conv=fdatasync`` copies the file to the same disk. VoxVault: a real
``voxvault serve`` process receives the same file from ``curl -T`` (streamed from disk) and
answers 201 only after the bytes are fsynced and probed, so both timings end when the data is
durable. The source file is in the page cache for both. Each side runs ``ROUNDS`` times,
alternating, with a fresh server and data directory per round; the best of each is reported.

Run alone: ``.venv/bin/python -m bench.upload_throughput [--size-mib N] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    MB,
    BenchError,
    MiB,
    fmt,
    log,
    mb_per_s,
    proc_status_bytes,
    raise_on_sigterm,
    require_tools,
    run_tool,
    scratch_dir,
    voxvault_server,
    write_wav,
)
from bench.report import Row, Table, render_text

FILE_BYTES = 2048 * MiB
ROUNDS = 2
RATIO_GOAL = 0.80
PEAK_RSS_GOAL_MB = 150.0
TOOL_TIMEOUT_S = 300.0
SPREAD_WARNING = 1.3  # max/min time between rounds worth a note


@dataclass(frozen=True, slots=True)
class Round:
    dd_seconds: float
    api_seconds: float
    rss_before_bytes: int
    rss_peak_bytes: int


@dataclass(frozen=True, slots=True)
class UploadResult:
    file_bytes: int
    rounds: Sequence[Round]

    @property
    def dd_mb_s(self) -> float:
        return mb_per_s(self.file_bytes, min(r.dd_seconds for r in self.rounds))

    @property
    def api_mb_s(self) -> float:
        return mb_per_s(self.file_bytes, min(r.api_seconds for r in self.rounds))

    @property
    def ratio(self) -> float:
        return self.api_mb_s / self.dd_mb_s

    @property
    def best_peak_rss_mb(self) -> float:
        return min(r.rss_peak_bytes for r in self.rounds) / MB

    @property
    def worst_peak_rss_mb(self) -> float:
        return max(r.rss_peak_bytes for r in self.rounds) / MB

    @property
    def idle_rss_mb(self) -> float:
        return max(r.rss_before_bytes for r in self.rounds) / MB

    def _spread_note(self) -> list[str]:
        """Say so when a side varied a lot between rounds: one run is then not enough."""
        notes = []
        for side, seconds in (
            ("dd", [r.dd_seconds for r in self.rounds]),
            ("VoxVault", [r.api_seconds for r in self.rounds]),
        ):
            if len(seconds) > 1 and max(seconds) > SPREAD_WARNING * min(seconds):
                notes.append(
                    f"{side} varied by {max(seconds) / min(seconds):.1f}× between rounds (a "
                    "noisy disk or a busy machine); compare the ratio over several runs."
                )
        return notes

    def table(self) -> Table:
        size_mib = self.file_bytes // MiB
        per_round = "; ".join(
            f"round {i}: dd {fmt(mb_per_s(self.file_bytes, r.dd_seconds))} MB/s, "
            f"API {fmt(mb_per_s(self.file_bytes, r.api_seconds))} MB/s, server RSS "
            f"{fmt(r.rss_before_bytes / MB)} MB before / {fmt(r.rss_peak_bytes / MB)} MB peak"
            for i, r in enumerate(self.rounds, 1)
        )
        rss_goal_met = self.worst_peak_rss_mb < PEAK_RSS_GOAL_MB
        return Table(
            title=f"Streaming upload of a {size_mib:,} MiB WAV vs raw disk",
            baseline_name="dd",
            intro=(
                f"A {size_mib:,} MiB WAV (16-bit mono 48 kHz PCM) is copied to the same disk by "
                "`dd bs=1M conv=fdatasync` (baseline), and uploaded to a `voxvault serve` "
                "process with `curl -X POST -T file` (streamed from disk). Both timings end "
                "when the bytes are durable: VoxVault answers 201 only after it has fsynced "
                "the blob and probed it as audio. The source is in the page cache for both. "
                f"Best of {len(self.rounds)} alternating rounds; a fresh server per round."
            ),
            rows=[
                Row(
                    "Throughput (MB/s)",
                    fmt(self.dd_mb_s),
                    fmt(self.api_mb_s),
                    self.ratio,
                    f"ratio ≥ {RATIO_GOAL:.2f}",
                    "met" if self.ratio >= RATIO_GOAL else "**missed**",
                ),
                Row(
                    "Server peak RSS (VmHWM, MB)",
                    "—",
                    f"{fmt(self.best_peak_rss_mb)} (worst round {fmt(self.worst_peak_rss_mb)}; "
                    f"idle before the upload {fmt(self.idle_rss_mb)})",
                    None,
                    f"< {PEAK_RSS_GOAL_MB:.0f} MB",
                    "met" if rss_goal_met else "**missed**",
                ),
            ],
            notes=[f"Per round: {per_round}.", *self._spread_note()],
        )


def _time_dd(source: Path, target: Path) -> float:
    os.sync()  # nothing else's write-back inside the timing
    started = time.perf_counter()
    run_tool(
        ["dd", f"if={source}", f"of={target}", "bs=1M", "conv=fdatasync", "status=none"],
        timeout=TOOL_TIMEOUT_S,
    )
    elapsed = time.perf_counter() - started
    size = target.stat().st_size
    target.unlink()
    if size != source.stat().st_size:
        raise BenchError(f"dd wrote {size} bytes, expected {source.stat().st_size}")
    return elapsed


def _time_upload(source: Path, sha256: str, workdir: Path, number: int) -> tuple[float, int, int]:
    """Upload ``source`` to a fresh server: (seconds, server RSS before, server peak RSS)."""
    data_dir = workdir / f"data-{number}"
    response = workdir / f"response-{number}.json"
    size = source.stat().st_size
    try:
        with voxvault_server(data_dir, workdir / f"server-{number}.log") as server:
            rss_before = proc_status_bytes(server.pid, "VmRSS")
            os.sync()
            started = time.perf_counter()
            out = run_tool(
                [
                    "curl",
                    "-sS",
                    "--noproxy",
                    "*",
                    "--max-time",
                    str(int(TOOL_TIMEOUT_S)),
                    "-X",
                    "POST",
                    "-T",
                    str(source),
                    "-H",
                    "Content-Type: audio/wav",
                    "-o",
                    str(response),
                    "-w",
                    "%{http_code} %{size_upload}",
                    f"{server.base_url}/v1/recordings?filename=big.wav",
                ],
                timeout=TOOL_TIMEOUT_S + 30,
            )
            elapsed = time.perf_counter() - started
            rss_peak = proc_status_bytes(server.pid, "VmHWM")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    status, uploaded = out.split()
    body = response.read_text(errors="replace")
    if status != "201":
        raise BenchError(f"upload answered {status}: {body[:500]}")
    recording = json.loads(body)
    if int(uploaded) != size or recording["size_bytes"] != size or recording["sha256"] != sha256:
        raise BenchError(f"the server stored something else than was sent: {body[:500]}")
    return elapsed, rss_before, rss_peak


def run(file_bytes: int = FILE_BYTES, rounds: int = ROUNDS) -> UploadResult:
    require_tools("dd", "curl")
    results: list[Round] = []
    with scratch_dir("upload") as workdir:
        source = workdir / "big.wav"
        log(f"[upload] writing a {file_bytes // MiB} MiB WAV to {source}")
        sha256 = write_wav(source, file_bytes)
        for number in range(1, rounds + 1):
            dd_seconds = _time_dd(source, workdir / "dd.out")
            log(f"[upload] round {number}: dd {fmt(mb_per_s(file_bytes, dd_seconds))} MB/s")
            api_seconds, rss_before, rss_peak = _time_upload(source, sha256, workdir, number)
            log(
                f"[upload] round {number}: API {fmt(mb_per_s(file_bytes, api_seconds))} MB/s, "
                f"server RSS {fmt(rss_before / MB)} MB before, {fmt(rss_peak / MB)} MB peak"
            )
            results.append(Round(dd_seconds, api_seconds, rss_before, rss_peak))
    return UploadResult(file_bytes, results)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=FILE_BYTES // MiB, help="file size")
    parser.add_argument("--rounds", type=int, default=ROUNDS, choices=range(1, 11))
    args = parser.parse_args(argv)
    if args.size_mib < 1:
        parser.error("--size-mib must be at least 1")
    raise_on_sigterm()
    print(render_text(run(args.size_mib * MiB, args.rounds).table()))


if __name__ == "__main__":
    main()

"""Upload throughput to S3 through the API vs a direct obstore put, and the server's memory.

Both sides write the same WAV to the same bucket of moto's standalone S3 server (a child process
on a loopback port). Baseline: ``obstore.put`` of the file, a multipart upload with the part size
VoxVault's S3 adapter uses and, like the adapter, one part in flight. VoxVault: a ``voxvault
serve --workers 0`` process with ``VOXVAULT_BLOB_URL=s3://...`` receives the file from ``curl
-T`` (``transcribe=false``) and answers 201 once the multipart upload is complete and the object
probed as audio. A direct put with obstore's default concurrency (12 parts in flight) is measured
alongside, to show what more parts in flight would buy against this endpoint. Rounds alternate
the order of the three; a fresh server per upload, the bucket emptied after each; best of each.

Memory: the server's peak RSS (``VmHWM``, and ``VmRSS`` of the server and its children sampled
every ``SAMPLE_S``) while it streams a ``BIG_BYTES`` upload, against the peak of the smaller
uploads of the rounds: flat memory means the two peaks match.

Run alone: ``.venv/bin/python -m bench.s3_upload [--size-mib N] [--rounds N] [--big-mib N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.backends import (
    S3_CREDENTIALS,
    S3_REGION,
    S3Endpoint,
    Skipped,
    Unavailable,
    moto_s3,
    s3_client_env,
)
from bench.common import (
    MB,
    BenchError,
    GiB,
    MiB,
    curl_post,
    fmt,
    log,
    mb_per_s,
    proc_status_bytes,
    process_cpu_s,
    raise_on_sigterm,
    require_tools,
    scratch_dir,
    voxvault_server,
    write_wav,
)
from bench.report import Row, Table, render_text

if TYPE_CHECKING:
    from obstore.store import S3Store

TITLE = "Upload to S3 (moto) through the API vs a direct obstore put"
FILE_BYTES = 256 * MiB
BIG_BYTES = 2 * GiB
ROUNDS = 3
RATIO_GOAL = 0.80
FLAT_GOAL = 1.10  # peak RSS of the big upload / of the smaller ones
SAMPLE_S = 0.05
TOOL_TIMEOUT_S = 1800.0  # moto takes its time with gigabytes
DEFAULT_CONCURRENCY = 12  # obstore.put's own default
SPREAD_WARNING = 1.3


@dataclass(frozen=True, slots=True)
class Memory:
    before_bytes: int
    """The server's VmRSS, idle, just before the upload."""
    hwm_bytes: int
    """The server's VmHWM after the upload: its peak RSS since it started."""
    tree_peak_bytes: int
    """The highest sum of VmRSS over the server and its children, sampled during the upload."""


@dataclass(frozen=True, slots=True)
class Cpu:
    """CPU seconds spent during one upload, by who."""

    store_s: float
    """moto's S3 server."""
    sender_s: float
    """The VoxVault server (API side), or this process's obstore threads (direct side)."""


@dataclass(frozen=True, slots=True)
class Round:
    api_s: float
    direct_s: float
    parallel_s: float
    memory: Memory
    api_cpu: Cpu
    direct_cpu: Cpu


@dataclass(frozen=True, slots=True)
class S3UploadResult:
    file_bytes: int
    big_bytes: int
    part_bytes: int
    rounds: Sequence[Round]
    big_s: float
    big_memory: Memory

    def _mb_s(self, seconds: Sequence[float]) -> float:
        return mb_per_s(self.file_bytes, min(seconds))

    @property
    def api_mb_s(self) -> float:
        return self._mb_s([r.api_s for r in self.rounds])

    @property
    def direct_mb_s(self) -> float:
        return self._mb_s([r.direct_s for r in self.rounds])

    @property
    def parallel_mb_s(self) -> float:
        return self._mb_s([r.parallel_s for r in self.rounds])

    @property
    def ratio(self) -> float:
        return self.api_mb_s / self.direct_mb_s

    @property
    def small_hwm_bytes(self) -> float:
        return statistics.median(r.memory.hwm_bytes for r in self.rounds)

    @property
    def small_tree_bytes(self) -> float:
        return statistics.median(r.memory.tree_peak_bytes for r in self.rounds)

    @property
    def flat_ratio(self) -> float:
        return self.big_memory.hwm_bytes / self.small_hwm_bytes

    def _cpu_note(self) -> str:
        gb = self.file_bytes / 1e9
        api = [r.api_cpu for r in self.rounds]
        direct = [r.direct_cpu for r in self.rounds]

        def per_gb(values: Sequence[float]) -> str:
            return f"{statistics.median(values) / gb:.1f}"

        return (
            "CPU seconds per GB uploaded (medians; 2 CPUs shared by all): moto "
            f"{per_gb([c.store_s for c in direct])} for the direct put and "
            f"{per_gb([c.store_s for c in api])} for the API upload; the obstore client "
            f"{per_gb([c.sender_s for c in direct])}; the VoxVault server "
            f"{per_gb([c.sender_s for c in api])} (curl not counted). What the server spends "
            "is CPU that moto, on the same CPUs, cannot use."
        )

    def _spread_notes(self) -> list[str]:
        notes = []
        for side, seconds in (
            ("The direct put", [r.direct_s for r in self.rounds]),
            ("The API upload", [r.api_s for r in self.rounds]),
        ):
            if len(seconds) > 1 and max(seconds) > SPREAD_WARNING * min(seconds):
                notes.append(
                    f"{side} varied by {max(seconds) / min(seconds):.1f}× between rounds (a "
                    "busy machine); compare the ratio over several runs."
                )
        return notes

    def table(self) -> Table:
        size = self.file_bytes // MiB
        big = self.big_bytes // MiB
        part = self.part_bytes // MiB
        per_round = "; ".join(
            f"round {i}: direct {fmt(mb_per_s(self.file_bytes, r.direct_s))}, API "
            f"{fmt(mb_per_s(self.file_bytes, r.api_s))}, direct ×{DEFAULT_CONCURRENCY} "
            f"{fmt(mb_per_s(self.file_bytes, r.parallel_s))} MB/s, server RSS "
            f"{fmt(r.memory.before_bytes / MB)} MB before / {fmt(r.memory.hwm_bytes / MB)} MB "
            "peak"
            for i, r in enumerate(self.rounds, 1)
        )
        big_memory = self.big_memory
        flat = self.flat_ratio <= FLAT_GOAL
        return Table(
            title=TITLE,
            baseline_name="direct obstore put",
            intro=(
                f"A {size:,} MiB WAV goes to one bucket of moto's standalone S3 server on "
                f"loopback: by `obstore.put` from the benchmark process (baseline: multipart, "
                f"{part} MiB parts as VoxVault's S3 adapter uses, one part in flight as the "
                "adapter has it), and through a `voxvault serve --workers 0` process with "
                "`VOXVAULT_BLOB_URL=s3://…` from `curl -T` (`transcribe=false`; 201 once the "
                f"multipart upload is complete and the object probed). Best of "
                f"{len(self.rounds)} rounds in alternating order, a fresh server per upload. "
                f"Memory: the server's peak RSS during a {big:,} MiB upload against its peak "
                f"during the {size:,} MiB ones."
            ),
            rows=[
                Row(
                    "Throughput (MB/s)",
                    fmt(self.direct_mb_s),
                    fmt(self.api_mb_s),
                    self.ratio,
                    f"ratio ≥ {RATIO_GOAL:.2f}",
                    "met" if self.ratio >= RATIO_GOAL else "**missed**",
                ),
                Row(
                    f"Reference: direct put with {DEFAULT_CONCURRENCY} parts in flight (MB/s)",
                    fmt(self.direct_mb_s),
                    fmt(self.parallel_mb_s),
                    self.parallel_mb_s / self.direct_mb_s,
                ),
                Row(
                    f"Server peak RSS (VmHWM, MB): {size:,} MiB upload → {big:,} MiB upload",
                    fmt(self.small_hwm_bytes / MB),
                    fmt(big_memory.hwm_bytes / MB),
                    self.flat_ratio,
                    f"flat: ratio ≤ {FLAT_GOAL:.2f}",
                    "met" if flat else "**missed**",
                ),
                Row(
                    "Server and children, sampled VmRSS peak (MB), same uploads",
                    fmt(self.small_tree_bytes / MB),
                    fmt(big_memory.tree_peak_bytes / MB),
                    big_memory.tree_peak_bytes / self.small_tree_bytes,
                ),
                Row(
                    "Server RSS idle before the upload (MB)",
                    fmt(statistics.median(r.memory.before_bytes for r in self.rounds) / MB),
                    fmt(big_memory.before_bytes / MB),
                    None,
                ),
            ],
            notes=[
                "moto's S3 server (written in Python) sets the ceiling here: the "
                f"direct put reached {fmt(self.direct_mb_s)} MB/s against it "
                f"({fmt(self.parallel_mb_s)} MB/s with {DEFAULT_CONCURRENCY} parts in flight), "
                "far below what the API's streaming path sustains to local disk "
                "(the streaming upload table). The ratio says what VoxVault costs on top of the "
                "store; against a faster store (MinIO, S3) the figures and the ratio differ.",
                "The API side also receives the body over HTTP, hashes it (SHA-256) and probes "
                "the stored object (a ranged GET) before answering; the direct put does none "
                "of that. Both run on the machine's shared CPUs with moto.",
                f"The {big:,} MiB upload through the API took {self.big_s:.1f} s "
                f"({fmt(mb_per_s(self.big_bytes, self.big_s))} MB/s); server RSS "
                f"{fmt(big_memory.before_bytes / MB)} MB idle before, "
                f"{fmt(big_memory.hwm_bytes / MB)} MB peak (VmHWM).",
                self._cpu_note(),
                f"Per round: {per_round}.",
                *self._spread_notes(),
            ],
        )


# ---- memory of a process tree ------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from ``/proc/<pid>/task/*/children``)."""
    found = [pid]
    index = 0
    while index < len(found):
        current = found[index]
        index += 1
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def _tree_rss_bytes(pid: int) -> int:
    total = 0
    for member in _tree(pid):
        with contextlib.suppress(OSError, BenchError):  # it may have just exited
            total += proc_status_bytes(member, "VmRSS")
    return total


@contextlib.contextmanager
def _sampled_peak(pid: int) -> Iterator[list[int]]:
    """Sample the tree's RSS every ``SAMPLE_S`` in a thread; the peak is in the list after."""
    peak = [_tree_rss_bytes(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_S):
            peak[0] = max(peak[0], _tree_rss_bytes(pid))

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], _tree_rss_bytes(pid))


# ---- the two sides -----------------------------------------------------------------------------


def _store(endpoint: S3Endpoint) -> S3Store:
    """An obstore S3 client for the bucket, configured as the adapter's (path-style, http)."""
    from obstore.store import S3Store

    return S3Store(
        endpoint.bucket,
        endpoint=endpoint.url,
        region=S3_REGION,
        access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )


def _empty_bucket(store: S3Store) -> None:
    import obstore

    paths = [meta["path"] for batch in obstore.list(store) for meta in batch]
    if paths:
        obstore.delete(store, paths)


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _time_direct(
    store: S3Store, moto_pid: int, source: Path, part_bytes: int, concurrency: int
) -> tuple[float, Cpu]:
    import obstore

    path = f"direct/{source.name}"
    with source.open("rb") as handle:
        moto_before, own_before = process_cpu_s(moto_pid), _own_cpu_s()
        started = time.perf_counter()
        obstore.put(
            store,
            path,
            handle,
            use_multipart=True,
            chunk_size=part_bytes,
            max_concurrency=concurrency,
        )
        elapsed = time.perf_counter() - started
        cpu = Cpu(process_cpu_s(moto_pid) - moto_before, _own_cpu_s() - own_before)
    size = obstore.head(store, path)["size"]
    _empty_bucket(store)
    if size != source.stat().st_size:
        raise BenchError(f"the direct put stored {size} bytes of {source.stat().st_size}")
    return elapsed, cpu


def _time_api(
    source: Path, sha256: str, endpoint: S3Endpoint, store: S3Store, workdir: Path, name: str
) -> tuple[float, Memory, Cpu]:
    """Upload ``source`` through a fresh server: (seconds, its memory, CPU time)."""
    data_dir = workdir / f"data-{name}"
    response = workdir / f"response-{name}.json"
    size = source.stat().st_size
    env = {
        **s3_client_env(),
        "VOXVAULT_BLOB_URL": endpoint.blob_url,
        "VOXVAULT_MAX_UPLOAD_BYTES": str(max(size, 1) * 2),
    }
    try:
        with voxvault_server(
            data_dir, workdir / f"server-{name}.log", serve_args=["--workers", "0"], env=env
        ) as server:
            before = proc_status_bytes(server.pid, "VmRSS")
            with _sampled_peak(server.pid) as peak:
                moto_before, server_before = process_cpu_s(endpoint.pid), process_cpu_s(server.pid)
                started = time.perf_counter()
                status, uploaded = curl_post(
                    source,
                    f"{server.base_url}/v1/recordings?filename={source.name}&transcribe=false",
                    response,
                    timeout_s=TOOL_TIMEOUT_S,
                )
                elapsed = time.perf_counter() - started
                cpu = Cpu(
                    process_cpu_s(endpoint.pid) - moto_before,
                    process_cpu_s(server.pid) - server_before,
                )
            hwm = proc_status_bytes(server.pid, "VmHWM")
    finally:
        _empty_bucket(store)
    body = response.read_text(errors="replace")
    response.unlink(missing_ok=True)
    if status != "201":
        raise BenchError(f"the upload answered {status}: {body[:500]}")
    recording = json.loads(body)
    if uploaded != size or recording["size_bytes"] != size or recording["sha256"] != sha256:
        raise BenchError(f"the server stored something else than was sent: {body[:500]}")
    return elapsed, Memory(before, hwm, peak[0]), cpu


def _measure(
    endpoint: S3Endpoint, workdir: Path, file_bytes: int, rounds: int, big_bytes: int
) -> S3UploadResult:
    from voxvault.blobs.s3 import DEFAULT_PART_BYTES

    store = _store(endpoint)
    source = workdir / "upload.wav"
    log(f"[s3] writing a {file_bytes // MiB} MiB WAV")
    sha256 = write_wav(source, file_bytes)
    results: list[Round] = []
    for number in range(1, rounds + 1):

        def api(name: str = str(number)) -> tuple[float, Memory, Cpu]:
            return _time_api(source, sha256, endpoint, store, workdir, name)

        def direct(concurrency: int) -> tuple[float, Cpu]:
            return _time_direct(store, endpoint.pid, source, DEFAULT_PART_BYTES, concurrency)

        # Alternating order, so that a drift of the machine's load hits both sides alike.
        if number % 2:
            api_s, memory, api_cpu = api()
            direct_s, direct_cpu = direct(1)
            parallel_s, _ = direct(DEFAULT_CONCURRENCY)
        else:
            parallel_s, _ = direct(DEFAULT_CONCURRENCY)
            direct_s, direct_cpu = direct(1)
            api_s, memory, api_cpu = api()
        log(
            f"[s3] round {number}: direct {fmt(mb_per_s(file_bytes, direct_s))} MB/s, "
            f"API {fmt(mb_per_s(file_bytes, api_s))} MB/s, direct with "
            f"{DEFAULT_CONCURRENCY} in flight {fmt(mb_per_s(file_bytes, parallel_s))} "
            f"MB/s; server RSS {fmt(memory.before_bytes / MB)} MB before, "
            f"{fmt(memory.hwm_bytes / MB)} MB peak"
        )
        results.append(Round(api_s, direct_s, parallel_s, memory, api_cpu, direct_cpu))
    source.unlink()
    big = workdir / "big.wav"
    log(f"[s3] writing a {big_bytes // MiB} MiB WAV")
    big_sha256 = write_wav(big, big_bytes)
    big_s, big_memory, _ = _time_api(big, big_sha256, endpoint, store, workdir, "big")
    big.unlink()
    log(
        f"[s3] {big_bytes // MiB} MiB through the API: {fmt(mb_per_s(big_bytes, big_s))} MB/s; "
        f"server RSS {fmt(big_memory.before_bytes / MB)} MB before, "
        f"{fmt(big_memory.hwm_bytes / MB)} MB peak, server and children "
        f"{fmt(big_memory.tree_peak_bytes / MB)} MB sampled peak"
    )
    return S3UploadResult(file_bytes, big_bytes, DEFAULT_PART_BYTES, results, big_s, big_memory)


def run(
    file_bytes: int = FILE_BYTES, rounds: int = ROUNDS, big_bytes: int = BIG_BYTES
) -> S3UploadResult | Skipped:
    require_tools("curl")
    with scratch_dir("s3") as workdir, contextlib.ExitStack() as stack:
        try:
            endpoint = stack.enter_context(moto_s3(workdir))
        except Unavailable as exc:
            log(f"[s3] skipped: {exc}")
            return Skipped(TITLE, str(exc))
        return _measure(endpoint, workdir, file_bytes, rounds, big_bytes)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=FILE_BYTES // MiB, help="file size")
    parser.add_argument("--rounds", type=int, default=ROUNDS, choices=range(1, 11))
    parser.add_argument(
        "--big-mib", type=int, default=BIG_BYTES // MiB, help="size of the memory test's upload"
    )
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.big_mib < 1:
        parser.error("sizes must be at least 1 MiB")
    raise_on_sigterm()
    print(render_text(run(args.size_mib * MiB, args.rounds, args.big_mib * MiB).table()))


if __name__ == "__main__":
    main()

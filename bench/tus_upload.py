"""Resumable (tus) upload throughput vs a plain streaming upload, and the server's memory.

Both sides send the same WAV to a fresh ``voxvault serve --workers 0`` process with
``transcribe=false``, on the local backend and on S3 (moto's standalone server, a child process
on a loopback port, as in ``bench.s3_upload``). Baseline: the plain streaming upload, ``curl -T``
to ``POST /v1/recordings`` (201 once the bytes are durable, hashed and probed). VoxVault: the
same file over tus with ``VaultClient.upload_resumable`` (the client ``voxvault ingest
--server`` uses): a POST, then ``CHUNK_BYTES`` PATCHes, each with the client's default
``Upload-Checksum`` (crc32c), until the final one answers with the recording id — so the
timing includes the completion, where the server turns the stored chunks into the recording.
Rounds alternate the order; best of each side.

Memory: the server's peak RSS (``VmHWM``; a fresh server per upload, so its peak is that
upload's) for a ``BIG_BYTES`` tus upload against the median of the smaller ones: flat memory
means the two match.

Run alone: ``.venv/bin/python -m bench.tus_upload [--size-mib N] [--rounds N] [--big-mib N]
[--backend local|s3]``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx

from bench.backends import Unavailable, moto_s3, s3_client_env
from bench.common import (
    MB,
    BenchError,
    GiB,
    MiB,
    clean_env,
    curl_post,
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
from bench.s3_upload import _empty_bucket as empty_bucket
from bench.s3_upload import _store as s3_store
from voxvault.api.routers.tus import PREFIX as TUS_PREFIX
from voxvault.api.routers.tus import RECORDING_ID_HEADER, TUS_VERSION
from voxvault.checksums import new_digest
from voxvault.client import VaultClient
from voxvault.tus_client import DEFAULT_CHUNK_BYTES, UploadUrlStore

TITLE = "Resumable (tus) upload vs a plain streaming upload"
BACKENDS = ("local", "s3")
FILE_BYTES = 256 * MiB
BIG_BYTES = 2 * GiB
CHUNK_BYTES = DEFAULT_CHUNK_BYTES
ROUNDS = 5
RATIO_GOAL = 0.70
FLAT_GOAL = 1.10  # peak RSS of the big upload / of the smaller ones
TOOL_TIMEOUT_S = 1800.0  # moto takes its time with gigabytes
SPREAD_WARNING = 1.3


@dataclass(frozen=True, slots=True)
class Upload:
    seconds: float
    hwm_bytes: int
    """The server's VmHWM after the upload (a fresh server: the upload's peak)."""
    final_seconds: float = 0.0
    """tus: from the answer to the last but one chunk to the answer to the final one, which
    the server gives once it has made the recording out of the stored chunks."""


@dataclass(frozen=True, slots=True)
class Round:
    plain: Upload
    tus: Upload
    """tus driven by curl, the baseline's client."""
    tus_client: Upload
    """tus driven by ``VaultClient`` (Python)."""


@dataclass(frozen=True, slots=True)
class DurableChunk:
    """What storing one chunk durably costs on this disk, apart from moving its bytes: the
    sync of the chunk appended to the upload's file, and the commit of the row that records
    it."""

    part_fsync_s: float
    row_commit_s: float

    @property
    def seconds(self) -> float:
        return self.part_fsync_s + self.row_commit_s


@dataclass(frozen=True, slots=True)
class BackendResult:
    backend: str
    file_bytes: int
    big_bytes: int
    rounds: Sequence[Round]
    big: Upload
    durable_chunk: DurableChunk | None = None

    def _mb_s(self, seconds: Sequence[float]) -> float:
        return mb_per_s(self.file_bytes, min(seconds))

    @property
    def plain_mb_s(self) -> float:
        return self._mb_s([r.plain.seconds for r in self.rounds])

    @property
    def tus_mb_s(self) -> float:
        return self._mb_s([r.tus.seconds for r in self.rounds])

    @property
    def ratio(self) -> float:
        return self.tus_mb_s / self.plain_mb_s

    @property
    def client_mb_s(self) -> float:
        return self._mb_s([r.tus_client.seconds for r in self.rounds])

    @property
    def small_hwm_bytes(self) -> float:
        return statistics.median(r.tus.hwm_bytes for r in self.rounds)

    @property
    def plain_hwm_bytes(self) -> float:
        return statistics.median(r.plain.hwm_bytes for r in self.rounds)

    @property
    def flat_ratio(self) -> float:
        return self.big.hwm_bytes / self.small_hwm_bytes

    @property
    def chunks(self) -> int:
        return -(-self.file_bytes // CHUNK_BYTES)

    @property
    def best_possible_ratio(self) -> float | None:
        """The ratio a tus upload would reach if each chunk cost nothing beyond the plain
        upload but its durability: no round trip, no checksum, no completion."""
        if self.durable_chunk is None:
            return None
        plain_s = min(r.plain.seconds for r in self.rounds)
        return plain_s / (plain_s + self.chunks * self.durable_chunk.seconds)

    def rows(self) -> list[Row]:
        size, big = self.file_bytes // MiB, self.big_bytes // MiB
        bound = self.best_possible_ratio
        bound_rows = []
        if bound is not None:
            bound_rows.append(
                Row(
                    f"{self.backend}: ratio if each chunk cost only its durability "
                    "(chunk fdatasync + row commit)",
                    "—",
                    "—",
                    bound,
                )
            )
        return [*bound_rows, *self._rows(size, big)]

    def _rows(self, size: int, big: int) -> list[Row]:
        return [
            Row(
                f"{self.backend}: throughput, {size:,} MiB (MB/s)",
                fmt(self.plain_mb_s),
                fmt(self.tus_mb_s),
                self.ratio,
                f"ratio ≥ {RATIO_GOAL:.2f}",
                "met" if self.ratio >= RATIO_GOAL else "**missed**",
            ),
            Row(
                f"{self.backend}: throughput, {size:,} MiB, tus by `VaultClient` (Python) "
                "instead of curl (MB/s)",
                fmt(self.plain_mb_s),
                fmt(self.client_mb_s),
                self.client_mb_s / self.plain_mb_s,
            ),
            Row(
                f"{self.backend}: server peak RSS (VmHWM, MB), tus {size:,} MiB → {big:,} MiB",
                fmt(self.small_hwm_bytes / MB),
                fmt(self.big.hwm_bytes / MB),
                self.flat_ratio,
                f"flat: ratio ≤ {FLAT_GOAL:.2f}",
                "met" if self.flat_ratio <= FLAT_GOAL else "**missed**",
            ),
        ]

    def notes(self) -> list[str]:
        per_round = "; ".join(
            f"round {i}: plain {fmt(mb_per_s(self.file_bytes, r.plain.seconds))}, tus "
            f"{fmt(mb_per_s(self.file_bytes, r.tus.seconds))} (final chunk "
            f"{r.tus.final_seconds:.2f} s of {r.tus.seconds:.2f} s), tus by VaultClient "
            f"{fmt(mb_per_s(self.file_bytes, r.tus_client.seconds))} MB/s"
            for i, r in enumerate(self.rounds, 1)
        )
        best = min(self.rounds, key=lambda r: r.tus.seconds).tus
        chunks_mb_s = mb_per_s(
            self.file_bytes - CHUNK_BYTES, max(best.seconds - best.final_seconds, 1e-9)
        )
        durability = []
        if self.durable_chunk is not None and self.best_possible_ratio is not None:
            chunk = self.durable_chunk
            durability.append(
                f"{self.backend}: storing a chunk durably costs {chunk.part_fsync_s * 1000:.1f} ms "
                f"for the chunk appended to the upload's file (write is free; fdatasync) and "
                f"{chunk.row_commit_s * 1000:.1f} ms for the commit of its row (SQLite, WAL, "
                f"synchronous=FULL), measured on the same disk in this run. A tus server may "
                "only answer a chunk once both are done, and the next chunk waits for that "
                f"answer: over {self.chunks} chunks that alone caps the ratio at "
                f"{self.best_possible_ratio:.2f} against a plain upload that syncs once."
            )
        notes = [
            *durability,
            f"{self.backend}: in the best tus round the chunks before the final one arrived at "
            f"{fmt(chunks_mb_s)} MB/s, and the final one took {best.final_seconds:.2f} s of "
            f"{best.seconds:.2f} s: the completion, where the server makes the recording of the "
            "stored chunks and probes it.",
            f"{self.backend}: the {self.big_bytes // MiB:,} MiB tus upload took "
            f"{self.big.seconds:.1f} s ({fmt(mb_per_s(self.big_bytes, self.big.seconds))} MB/s); "
            f"server peak RSS of the plain {self.file_bytes // MiB:,} MiB uploads "
            f"{fmt(self.plain_hwm_bytes / MB)} MB. Per round: {per_round}.",
        ]
        for side, seconds in (
            ("plain", [r.plain.seconds for r in self.rounds]),
            ("tus", [r.tus.seconds for r in self.rounds]),
            ("VaultClient tus", [r.tus_client.seconds for r in self.rounds]),
        ):
            if len(seconds) > 1 and max(seconds) > SPREAD_WARNING * min(seconds):
                notes.append(
                    f"{self.backend}: the {side} upload varied by "
                    f"{max(seconds) / min(seconds):.1f}× between rounds (a busy machine); "
                    "compare the ratio over several runs."
                )
        return notes


@dataclass(frozen=True, slots=True)
class Skipped:
    backend: str
    reason: str


@dataclass(frozen=True, slots=True)
class TusUploadResult:
    results: Sequence[BackendResult | Skipped]

    def table(self) -> Table:
        rows: list[Row] = []
        notes: list[str] = []
        for result in self.results:
            if isinstance(result, Skipped):
                rows.append(Row(f"{result.backend}: skipped", "—", "—", None, "—", "skipped"))
                notes.append(f"{result.backend} skipped: {' '.join(result.reason.split())}")
            else:
                rows.extend(result.rows())
                notes.extend(result.notes())
        measured = [r for r in self.results if isinstance(r, BackendResult)]
        size = measured[0].file_bytes // MiB if measured else FILE_BYTES // MiB
        big = measured[0].big_bytes // MiB if measured else BIG_BYTES // MiB
        return Table(
            title=TITLE,
            baseline_name="plain streaming upload",
            intro=(
                f"A {size:,} MiB WAV goes to a fresh `voxvault serve --workers 0` process "
                "(`transcribe=false`), on the local backend and on S3 (moto's standalone "
                "server on loopback), three ways, each driven by a client of its own: by "
                "`curl -T` to `POST /v1/recordings` (baseline); over tus by curl, the same "
                "client as the baseline's (a `POST` creating the upload, then one curl on one "
                f"connection sending {CHUNK_BYTES // MiB} MiB PATCHes, each with its CRC-32C "
                "`Upload-Checksum`, computed before the clock starts); and over tus by "
                "`VaultClient.upload_resumable`, VoxVault's Python client, which computes the "
                "checksums as it sends. Each tus upload is timed until the final chunk answers "
                "with the recording (the server turns the stored chunks into the recording "
                "first). Before each upload the machine's dirty pages are synced, so that no "
                "upload pays for the writeback of the one before. Best of "
                f"{len(measured[0].rounds) if measured else ROUNDS} rounds in rotating order. "
                f"Memory: the server's peak RSS during a {big:,} MiB tus upload (by "
                f"`VaultClient`) against its peak during the {size:,} MiB ones."
            ),
            rows=rows,
            notes=[
                "On local disk a tus upload appends each chunk to one file per upload and syncs "
                "it before answering; completion hard-links that file as the recording (no "
                "copy), which is then probed as a plain upload is. On S3 each chunk is sent as "
                "a part of one multipart upload of the recording's own object (UploadPart), and "
                "completion is the CompleteMultipartUpload, as for a plain upload. The "
                "recording's "
                "sha256 is taken as the chunks arrive; each chunk's CRC-32C is computed by the "
                "client and verified by the server besides. The clients, the server and moto "
                "share the machine's two CPUs: the Python client takes about twice curl's CPU "
                "per chunk, which the server then lacks.",
                *notes,
            ],
        )


# ---- the two sides -----------------------------------------------------------------------------


def _plain_upload(base_url: str, source: Path, response: Path) -> str:
    status, _ = curl_post(
        source,
        f"{base_url}/v1/recordings?filename={source.name}&transcribe=false",
        response,
        timeout_s=TOOL_TIMEOUT_S,
    )
    body = response.read_text(errors="replace")
    response.unlink(missing_ok=True)
    if status != "201":
        raise BenchError(f"the plain upload answered {status}: {body[:500]}")
    recording: dict[str, object] = json.loads(body)
    return str(recording["id"])


@dataclass(frozen=True, slots=True)
class Chunk:
    offset: int
    path: Path
    crc32c: str
    """The ``Upload-Checksum`` value: base64 of the chunk's CRC-32C."""


def _split(source: Path, into: Path) -> list[Chunk]:
    """``source`` cut into ``CHUNK_BYTES`` files for curl, with their checksums."""
    into.mkdir()
    chunks: list[Chunk] = []
    with source.open("rb") as reader:
        while data := reader.read(CHUNK_BYTES):
            path = into / f"chunk-{len(chunks):05d}"
            path.write_bytes(data)
            digest = new_digest("crc32c")
            digest.update(data)
            offset = len(chunks) * CHUNK_BYTES
            chunks.append(Chunk(offset, path, base64.b64encode(digest.digest()).decode()))
    return chunks


def _curl(*args: str) -> str:
    return run_tool(
        ["curl", "-sS", "--noproxy", "*", "--max-time", str(int(TOOL_TIMEOUT_S)), *args],
        timeout=TOOL_TIMEOUT_S + 30,
    )


def _curl_tus_upload(base_url: str, source: Path, chunks: Sequence[Chunk]) -> tuple[str, float]:
    """The tus upload by curl: (recording id, seconds the final chunk took)."""
    metadata = ",".join(
        f"{key} {base64.b64encode(value.encode()).decode()}"
        for key, value in (("filename", source.name), ("transcribe", "false"))
    )
    created = _curl(
        *("-X", "POST", "-o", "/dev/null", "-w", "%{http_code} %header{location}"),
        *("-H", f"Tus-Resumable: {TUS_VERSION}", "-H", f"Upload-Length: {source.stat().st_size}"),
        *("-H", f"Upload-Metadata: {metadata}"),
        f"{base_url}{TUS_PREFIX}",
    ).split()
    if len(created) != 2 or created[0] != "201":
        raise BenchError(f"creating the tus upload answered {created}")
    location = httpx.URL(base_url).join(created[1])
    patches: list[str] = []
    for chunk in chunks:
        patches += ["--next"] if patches else []
        patches += [
            *("-X", "PATCH", "-T", str(chunk.path), "-o", "/dev/null"),
            *("-w", "%{http_code} %{time_total} %header{" + RECORDING_ID_HEADER + "}\n"),
            # No `Expect: 100-continue` round trip before each chunk: tus clients send at once.
            *("-H", "Expect:", "-H", f"Tus-Resumable: {TUS_VERSION}"),
            *("-H", "Content-Type: application/offset+octet-stream"),
            *("-H", f"Upload-Offset: {chunk.offset}"),
            *("-H", f"Upload-Checksum: crc32c {chunk.crc32c}"),
            str(location),
        ]
    answers = [line.split() for line in _curl(*patches).splitlines()]
    if len(answers) != len(chunks) or any(answer[0] != "204" for answer in answers):
        raise BenchError(f"the tus chunks answered {[answer[0] for answer in answers]}")
    if len(answers[-1]) != 3:
        raise BenchError("the final chunk named no recording")
    return answers[-1][2], float(answers[-1][1])


def _client_tus_upload(base_url: str, source: Path, store: Path) -> tuple[str, float]:
    """(sha256 stored, seconds the final chunk took)."""
    answered: list[float] = [time.perf_counter()]

    async def upload() -> str:
        # An explicit transport: no proxy from the environment between us and loopback.
        async with VaultClient(base_url, transport=httpx.AsyncHTTPTransport()) as client:
            recording = await client.upload_resumable(
                source,
                transcribe=False,
                chunk_bytes=CHUNK_BYTES,
                url_store=UploadUrlStore(store),
                on_chunk=lambda _: answered.append(time.perf_counter()),
            )
        return str(recording["id"])

    recording_id = anyio.run(upload)
    return recording_id, answered[-1] - answered[-2]


def _time_upload(
    kind: str,
    source: Path,
    sha256: str,
    workdir: Path,
    env: Mapping[str, str],
    name: str,
    chunks: Sequence[Chunk] = (),
) -> Upload:
    """``kind``: ``plain``, ``tus`` (by curl, over ``chunks``) or ``tus_client``."""
    data_dir = workdir / f"data-{name}"
    with voxvault_server(
        data_dir, workdir / f"server-{name}.log", serve_args=["--workers", "0"], env=env
    ) as server:
        # No upload pays for the writeback of the one before.
        os.sync()
        started = time.perf_counter()
        final_s = 0.0
        if kind == "plain":
            recording_id = _plain_upload(server.base_url, source, workdir / f"response-{name}.json")
        elif kind == "tus":
            recording_id, final_s = _curl_tus_upload(server.base_url, source, chunks)
        else:
            store = workdir / "uploads.json"
            recording_id, final_s = _client_tus_upload(server.base_url, source, store)
        elapsed = time.perf_counter() - started
        hwm = proc_status_bytes(server.pid, "VmHWM")
        answer = httpx.get(f"{server.base_url}/v1/recordings/{recording_id}", timeout=30)
        stored = str(answer.json()["sha256"])
    if stored != sha256:
        raise BenchError(f"the {kind} upload stored other bytes than were sent")
    return Upload(elapsed, hwm, final_s)


@contextlib.contextmanager
def _backend(name: str, workdir: Path) -> Iterator[tuple[dict[str, str], Callable[[], None]]]:
    """The server's environment for the backend, and what empties its blob store."""
    if name == "local":
        yield clean_env(), lambda: None
        return
    with moto_s3(workdir) as endpoint:
        store = s3_store(endpoint)
        env = {**s3_client_env(), "VOXVAULT_BLOB_URL": endpoint.blob_url}
        yield env, lambda: empty_bucket(store)


def _measure(
    backend: str, workdir: Path, file_bytes: int, rounds: int, big_bytes: int
) -> BackendResult:
    with _backend(backend, workdir) as (env, empty):
        env = {**env, "VOXVAULT_MAX_UPLOAD_BYTES": str(max(file_bytes, big_bytes) * 2)}
        source = workdir / "upload.wav"
        log(f"[tus] {backend}: writing a {file_bytes // MiB} MiB WAV")
        sha256 = write_wav(source, file_bytes)
        chunks = _split(source, workdir / "chunks")
        results: list[Round] = []
        kinds = ("plain", "tus", "tus_client")
        for number in range(1, rounds + 1):
            order = kinds[number % 3 :] + kinds[: number % 3]
            timed: dict[str, Upload] = {}
            for kind in order:
                name = f"{backend}-{kind}-{number}"
                timed[kind] = _time_upload(kind, source, sha256, workdir, env, name, chunks)
                shutil.rmtree(workdir / f"data-{name}")
                empty()
            results.append(Round(timed["plain"], timed["tus"], timed["tus_client"]))
            speeds = ", ".join(f"{k} {fmt(mb_per_s(file_bytes, timed[k].seconds))}" for k in kinds)
            peaks = " / ".join(fmt(timed[k].hwm_bytes / MB) for k in kinds)
            log(f"[tus] {backend} round {number}: {speeds} MB/s; server peak RSS {peaks} MB")
        shutil.rmtree(workdir / "chunks")
        source.unlink()
        big_source = workdir / "big.wav"
        log(f"[tus] {backend}: writing a {big_bytes // MiB} MiB WAV")
        big_sha256 = write_wav(big_source, big_bytes)
        big = _time_upload("tus_client", big_source, big_sha256, workdir, env, f"{backend}-big")
        shutil.rmtree(workdir / f"data-{backend}-big")
        empty()
        big_source.unlink()
        log(
            f"[tus] {backend}: {big_bytes // MiB} MiB over tus at "
            f"{fmt(mb_per_s(big_bytes, big.seconds))} MB/s, server peak RSS "
            f"{fmt(big.hwm_bytes / MB)} MB"
        )
    durable = _durable_chunk(workdir) if backend == "local" else None
    return BackendResult(backend, file_bytes, big_bytes, results, big, durable)


DURABILITY_SAMPLES = 16


def _durable_chunk(workdir: Path) -> DurableChunk:
    """Median cost of a chunk's durability on ``workdir``'s disk, as the server pays it."""
    import os
    import sqlite3

    payload = os.urandom(CHUNK_BYTES)
    grown = workdir / "grown"
    part_s: list[float] = []
    with grown.open("wb") as handle:
        for _ in range(DURABILITY_SAMPLES):
            handle.write(payload)
            handle.flush()
            started = time.perf_counter()
            os.fdatasync(handle.fileno())
            part_s.append(time.perf_counter() - started)
    grown.unlink()
    commit_s: list[float] = []
    database = workdir / "rows.db"
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE uploads (id INTEGER PRIMARY KEY, upload_offset INTEGER)")
        db.execute("INSERT INTO uploads VALUES (1, 0)")
        for n in range(DURABILITY_SAMPLES):
            started = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE uploads SET upload_offset = ? WHERE id = 1", (n,))
            db.execute("COMMIT")
            commit_s.append(time.perf_counter() - started)
    for leftover in workdir.glob("rows.db*"):
        leftover.unlink()
    return DurableChunk(statistics.median(part_s), statistics.median(commit_s))


def run(
    file_bytes: int = FILE_BYTES,
    rounds: int = ROUNDS,
    big_bytes: int = BIG_BYTES,
    backends: Sequence[str] = BACKENDS,
) -> TusUploadResult:
    require_tools("curl")
    results: list[BackendResult | Skipped] = []
    for backend in backends:
        with scratch_dir(f"tus-{backend}") as workdir:
            try:
                results.append(_measure(backend, workdir, file_bytes, rounds, big_bytes))
            except Unavailable as exc:
                log(f"[tus] {backend} skipped: {exc}")
                results.append(Skipped(backend, str(exc)))
    return TusUploadResult(results)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=FILE_BYTES // MiB, help="file size")
    parser.add_argument("--rounds", type=int, default=ROUNDS, choices=range(1, 11))
    parser.add_argument(
        "--big-mib", type=int, default=BIG_BYTES // MiB, help="size of the memory test's upload"
    )
    parser.add_argument(
        "--backend", action="append", choices=BACKENDS, help="only this backend (repeatable)"
    )
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.big_mib < 1:
        parser.error("sizes must be at least 1 MiB")
    raise_on_sigterm()
    result = run(args.size_mib * MiB, args.rounds, args.big_mib * MiB, args.backend or BACKENDS)
    print(render_text(result.table()))


if __name__ == "__main__":
    main()

"""Metadata API requests/s on PostgreSQL vs SQLite, each against its bare SQL query.

Two ``voxvault serve --workers 0`` processes, one over a SQLite database in its data directory,
one over a fresh PostgreSQL database (``VOXVAULT_DATABASE_URL``), each seeded through the library
with the same ``RECORDINGS`` tiny WAVs (``transcribe=False``). wrk (``-t1 -c4``) loads
``GET /v1/recordings/{id}`` and ``GET /v1/recordings?limit=50`` for a fixed time. Baseline: the
SQL statement and parameters the metadata store sends for that request, taken from SQLAlchemy's
``before_cursor_execute`` hook, executed in a loop for the same time straight through the
driver (``sqlite3``, ``psycopg``) on one connection, rows fetched. Rounds alternate the order of
the backends; best of each. The PostgreSQL database is dropped afterwards.

Run alone: ``.venv/bin/python -m bench.metadata_load [--recordings N] [--seconds N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from bench.backends import Skipped, Unavailable, postgres_database
from bench.common import (
    BenchError,
    Server,
    clean_env,
    log,
    raise_on_sigterm,
    require_tools,
    run_tool,
    scratch_dir,
    settings_env,
    voxvault_server,
    wav_header,
)
from bench.report import Row, Table, render_text

TITLE = "Metadata API on PostgreSQL vs SQLite, each vs its bare SQL query"
RECORDINGS = 1000
SECONDS = 10
ROUNDS = 2
PAGE = 50
WRK_THREADS = 1
WRK_CONNECTIONS = 4
SEED_CONCURRENCY = 4
WAV_DATA_BYTES = 24_000  # a quarter of a second of 48 kHz 16-bit mono
BACKENDS = ("sqlite", "postgresql")
NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}

# Totals of a wrk run as one JSON line (wrk's own text output is for people).
_WRK_SCRIPT = """\
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True, slots=True)
class Load:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    parameters: Any


@dataclass(frozen=True, slots=True)
class Sample:
    """One measurement: an endpoint on a backend, through the API or as its bare query."""

    endpoint: str
    backend: str
    api: Load
    bare_per_s: float


@dataclass(frozen=True, slots=True)
class MetadataResult:
    recordings: int
    seconds: int
    samples: Sequence[Sample]
    statements: Mapping[tuple[str, str], str]

    def _best(self, endpoint: str, backend: str) -> tuple[Load, float]:
        chosen = [s for s in self.samples if s.endpoint == endpoint and s.backend == backend]
        api = max((s.api for s in chosen), key=lambda load: load.per_second)
        return api, max(s.bare_per_s for s in chosen)

    def _rows(self, endpoint: str, label: str) -> list[Row]:
        sqlite_api, sqlite_bare = self._best(endpoint, "sqlite")
        pg_api, pg_bare = self._best(endpoint, "postgresql")
        return [
            Row(
                f"{label} on SQLite (req/s)",
                f"{sqlite_bare:,.0f}",
                f"{sqlite_api.per_second:,.0f}",
                sqlite_api.per_second / sqlite_bare,
            ),
            Row(
                f"{label} on PostgreSQL (req/s)",
                f"{pg_bare:,.0f}",
                f"{pg_api.per_second:,.0f}",
                pg_api.per_second / pg_bare,
            ),
            Row(
                f"{label}: PostgreSQL / SQLite, through the API (req/s; baseline column: SQLite)",
                f"{sqlite_api.per_second:,.0f}",
                f"{pg_api.per_second:,.0f}",
                pg_api.per_second / sqlite_api.per_second,
            ),
            Row(
                f"{label}: PostgreSQL / SQLite, bare query (q/s; both columns bare)",
                f"{sqlite_bare:,.0f}",
                f"{pg_bare:,.0f}",
                pg_bare / sqlite_bare,
            ),
        ]

    def _overhead_note(self) -> str:
        parts = []
        for endpoint, label in (("one", "one recording"), ("page", f"a page of {PAGE}")):
            for backend in BACKENDS:
                api, bare = self._best(endpoint, backend)
                extra_ms = (1 / api.per_second - 1 / bare) * 1000
                parts.append(f"{label} on {NAMES[backend]} {extra_ms:.2f} ms")
        return (
            "Inverse throughput beyond the bare query (1 / API rate − 1 / bare rate), per request: "
            + "; ".join(parts)
            + "."
        )

    def _latency_note(self) -> str:
        parts = []
        for endpoint, label in (("one", "one recording"), ("page", f"a page of {PAGE}")):
            for backend in BACKENDS:
                api, _ = self._best(endpoint, backend)
                parts.append(f"{label} on {NAMES[backend]} {api.p50_ms:.2f} / {api.p99_ms:.2f} ms")
        return "API latency under this load, p50 / p99 (wrk): " + "; ".join(parts) + "."

    def table(self) -> Table:
        rounds = len(self.samples) // (2 * len(BACKENDS))
        per_round = "; ".join(
            f"{s.endpoint} on {NAMES[s.backend]}: API {s.api.per_second:,.0f}, bare "
            f"{s.bare_per_s:,.0f}"
            for s in self.samples
        )
        return Table(
            title=TITLE,
            baseline_name="bare SQL query",
            intro=(
                f"The same {self.recordings:,} recordings (tiny WAVs, stored through the library "
                "without transcription) in a SQLite database and in a PostgreSQL one, each served "
                "by a `voxvault serve --workers 0` process. wrk "
                f"(`-t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{self.seconds}s`) loads one "
                f"recording (`GET /v1/recordings/{{id}}`) and the first page of {PAGE} "
                f"(`GET /v1/recordings?limit={PAGE}`). Baseline: the statement the metadata "
                "store sends for that request (captured from SQLAlchemy), run in a loop on one "
                "connection straight through the driver (`sqlite3`, `psycopg`, rows fetched) "
                f"for the same {self.seconds} s. Best of {rounds} rounds, backends in "
                "alternating order. Higher is better."
            ),
            rows=[
                *self._rows("one", "One recording"),
                *self._rows("page", f"A page of {PAGE}"),
            ],
            notes=[
                "The API ratio is what a request costs on top of its query: HTTP parsing, "
                "routing, validation, the SQLAlchemy connection pool and row mapping, JSON "
                f"encoding. The bare loop uses one connection; wrk keeps {WRK_CONNECTIONS} "
                "requests in flight against one server process (one event loop). PostgreSQL "
                "is a local server over TCP on loopback, SQLite a file in the page cache.",
                self._overhead_note(),
                self._latency_note(),
                "Statements (SQLite / PostgreSQL): "
                + "; ".join(
                    f"`{self.statements[(endpoint, backend)]}`"
                    for endpoint in ("one", "page")
                    for backend in BACKENDS
                ),
                f"Per round, req/s: {per_round}.",
            ],
        )


# ---- seeding -----------------------------------------------------------------------------------


async def _seed(data_dir: Path, database_url: str, count: int) -> list[str]:
    """Store ``count`` tiny WAVs through the library; their ids, oldest first."""
    from voxvault import Settings, Vault

    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        blob_url=(data_dir / "blobs").as_uri(),
        queue_url="embedded",
        events_url="memory",
    )
    wav = wav_header(WAV_DATA_BYTES) + os.urandom(WAV_DATA_BYTES)
    created: list[tuple[int, str]] = []
    limiter = anyio.CapacityLimiter(SEED_CONCURRENCY)

    async def one(vault: Vault, index: int) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            yield wav

        async with limiter:
            recording = await vault.create_recording(
                chunks(),
                filename=f"seed-{index}.wav",
                content_type="audio/wav",
                title=f"Seeded recording {index}",
                tags=["bench", f"group-{index % 10}"],
                metadata={"index": index},
                transcribe=False,
            )
        created.append((index, recording.id))

    async with await Vault.open(settings) as vault, anyio.create_task_group() as group:
        for index in range(count):
            group.start_soon(one, vault, index)
    return [recording_id for _, recording_id in sorted(created)]


# ---- the bare queries --------------------------------------------------------------------------


async def _capture(database_url: str, recording_id: str) -> dict[str, Statement]:
    """The one statement the metadata store sends for each endpoint, with its parameters."""
    from sqlalchemy import event

    from voxvault.metadata import DEFAULT_WORKSPACE, open_metadata_store
    from voxvault.metadata.sql import SqlMetadataStore
    from voxvault.models import RecordingQuery

    store = open_metadata_store(database_url)
    if not isinstance(store, SqlMetadataStore):
        raise BenchError(f"{database_url} is not served by the SQL metadata store")
    sent: list[Statement] = []

    def record(*args: Any) -> None:
        # before_cursor_execute(conn, cursor, statement, parameters, context, executemany)
        sent.append(Statement(args[2], args[3]))

    event.listen(store.engine.sync_engine, "before_cursor_execute", record)
    captured: dict[str, Statement] = {}
    try:
        for endpoint in ("one", "page"):
            sent.clear()
            if endpoint == "one":
                await store.get_recording(DEFAULT_WORKSPACE, recording_id)
            else:
                page = await store.list_recordings(DEFAULT_WORKSPACE, RecordingQuery(limit=PAGE))
                if len(page.items) != PAGE:
                    raise BenchError(f"the first page has {len(page.items)} recordings")
            if len(sent) != 1:
                raise BenchError(f"the store sent {len(sent)} statements for {endpoint!r}")
            captured[endpoint] = sent[0]
    finally:
        await store.close()
    return captured


@contextlib.contextmanager
def _bare_runner(database_url: str) -> Iterator[Callable[[Statement], int]]:
    """A function that runs a statement once on one open connection and fetches its rows."""
    if database_url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        path = make_url(database_url).database
        if not path:
            raise BenchError(f"no database file in {database_url}")
        connection = sqlite3.connect(path)
        try:

            def run_sqlite(statement: Statement) -> int:
                return len(connection.execute(statement.sql, statement.parameters).fetchall())

            yield run_sqlite
        finally:
            connection.close()
        return
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as pg, pg.cursor() as cursor:

        def run_postgres(statement: Statement) -> int:
            cursor.execute(statement.sql, statement.parameters)
            return len(cursor.fetchall())

        yield run_postgres


def _abridged(sql: str) -> str:
    """The statement on one line, its column list shortened to a count."""
    flat = " ".join(sql.split())
    match = re.fullmatch(r"SELECT (.+?) FROM (.*)", flat)
    if match is None:
        return flat
    return f"SELECT <{match[1].count(',') + 1} columns> FROM {match[2]}"


def _bare_per_s(database_url: str, statement: Statement, expected_rows: int, seconds: int) -> float:
    with _bare_runner(database_url) as execute:
        if execute(statement) != expected_rows:
            raise BenchError(f"the bare query did not return {expected_rows} rows")
        count = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            execute(statement)
            count += 1
        return count / (time.perf_counter() - started)


# ---- the API under wrk -------------------------------------------------------------------------


def _wrk(url: str, script: Path, seconds: int) -> Load:
    out = run_tool(
        [
            "wrk",
            f"-t{WRK_THREADS}",
            f"-c{WRK_CONNECTIONS}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        timeout=seconds + 60,
    )
    lines = [line for line in out.splitlines() if line.startswith("WRKJSON ")]
    if not lines:
        raise BenchError(f"wrk printed no summary:\n{out}")
    summary = json.loads(lines[-1].removeprefix("WRKJSON "))
    errors = {
        k: summary[k] for k in ("connect", "read", "write", "status", "timeout") if summary[k]
    }
    if errors or summary["requests"] == 0:
        raise BenchError(f"wrk against {url}: {summary['requests']} requests, errors {errors}")
    return Load(
        requests=summary["requests"],
        seconds=summary["duration_us"] / 1e6,
        p50_ms=summary["p50_us"] / 1e3,
        p99_ms=summary["p99_us"] / 1e3,
    )


def _paths(recording_id: str) -> dict[str, str]:
    return {"one": f"/v1/recordings/{recording_id}", "page": f"/v1/recordings?limit={PAGE}"}


def _check_answers(server: Server, recording_id: str) -> None:
    """One request of each kind, checked, before loading: wrk only counts statuses."""
    import httpx

    with httpx.Client(base_url=server.base_url, timeout=30.0, trust_env=False) as client:
        one = client.get(_paths(recording_id)["one"])
        page = client.get(_paths(recording_id)["page"])
    if one.status_code != 200 or one.json()["id"] != recording_id:
        raise BenchError(f"GET one recording answered {one.status_code}: {one.text[:300]}")
    if page.status_code != 200 or len(page.json()["items"]) != PAGE:
        raise BenchError(f"GET a page answered {page.status_code}: {page.text[:300]}")


# ---- the run -----------------------------------------------------------------------------------


def _measure(
    workdir: Path, postgres_url: str, recordings: int, seconds: int, rounds: int
) -> MetadataResult:
    urls = {
        "sqlite": f"sqlite:///{workdir / 'data-sqlite' / 'voxvault.db'}",
        "postgresql": postgres_url,
    }
    targets: dict[str, str] = {}
    statements: dict[tuple[str, str], Statement] = {}
    for backend in BACKENDS:
        log(f"[metadata] seeding {recordings:,} recordings into {NAMES[backend]}")
        started = time.perf_counter()
        ids = anyio.run(_seed, workdir / f"data-{backend}", urls[backend], recordings)
        log(f"[metadata] seeded {NAMES[backend]} in {time.perf_counter() - started:.1f} s")
        targets[backend] = ids[len(ids) // 2]
        captured = anyio.run(_capture, urls[backend], targets[backend])
        for endpoint, statement in captured.items():
            statements[(endpoint, backend)] = statement
    script = workdir / "summary.lua"
    script.write_text(_WRK_SCRIPT)
    samples: list[Sample] = []
    with contextlib.ExitStack() as stack:
        servers = {
            backend: stack.enter_context(
                voxvault_server(
                    workdir / f"data-{backend}",
                    workdir / f"server-{backend}.log",
                    serve_args=["--workers", "0"],
                    env={**clean_env(), **settings_env(workdir / f"data-{backend}", url)},
                )
            )
            for backend, url in urls.items()
        }
        for backend, server in servers.items():
            _check_answers(server, targets[backend])
        for number in range(rounds):
            order = BACKENDS if number % 2 == 0 else tuple(reversed(BACKENDS))
            for endpoint in ("one", "page"):
                for backend in order:
                    path = _paths(targets[backend])[endpoint]
                    # A short warm-up: connections in the pool, statements prepared.
                    _wrk(f"{servers[backend].base_url}{path}", script, 1)
                    api = _wrk(f"{servers[backend].base_url}{path}", script, seconds)
                    expected = 1 if endpoint == "one" else PAGE + 1  # the store asks for one more
                    bare = _bare_per_s(
                        urls[backend], statements[(endpoint, backend)], expected, seconds
                    )
                    log(
                        f"[metadata] round {number + 1}, {endpoint} on {NAMES[backend]}: API "
                        f"{api.per_second:,.0f} req/s (p50 {api.p50_ms:.2f} ms, p99 "
                        f"{api.p99_ms:.2f} ms), bare query {bare:,.0f} q/s"
                    )
                    samples.append(Sample(endpoint, backend, api, bare))
    shown = {key: _abridged(statement.sql) for key, statement in statements.items()}
    return MetadataResult(recordings, seconds, samples, shown)


def run(
    recordings: int = RECORDINGS, seconds: int = SECONDS, rounds: int = ROUNDS
) -> MetadataResult | Skipped:
    require_tools("wrk")
    if recordings <= PAGE:
        raise BenchError(f"seed more than {PAGE} recordings, so that a page is full")
    with scratch_dir("metadata") as workdir, contextlib.ExitStack() as stack:
        try:
            postgres_url = stack.enter_context(postgres_database("metadata"))
        except Unavailable as exc:
            log(f"[metadata] skipped: {exc}")
            return Skipped(TITLE, str(exc))
        return _measure(workdir, postgres_url, recordings, seconds, rounds)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--recordings", type=int, default=RECORDINGS, help="recordings seeded")
    parser.add_argument("--seconds", type=int, default=SECONDS, help="load time per measurement")
    parser.add_argument("--rounds", type=int, default=ROUNDS, choices=range(1, 11))
    args = parser.parse_args(argv)
    if args.seconds < 1:
        parser.error("--seconds must be at least 1")
    raise_on_sigterm()
    print(render_text(run(args.recordings, args.seconds, args.rounds).table()))


if __name__ == "__main__":
    main()

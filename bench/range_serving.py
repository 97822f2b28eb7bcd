"""Serving a stored recording (whole and by byte ranges) vs nginx serving the same blob file.

A 1 GiB WAV is stored with ``voxvault ingest``; nginx (one worker, ``sendfile on``) serves the
directory of its blob file, ``voxvault serve`` serves ``/v1/recordings/{id}/audio``. Both read
the same file from the page cache. Measured in the same run, alternating between the two:
full-file GETs with curl (best of ``FULL_GETS``), then random 1 MiB and 64 KiB ``Range``
requests with wrk (``-t2 -c16``, a Lua script picks a random offset per request).

Run alone: ``.venv/bin/python -m bench.range_serving [--size-mib N] [--seconds N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import (
    NGINX,
    VOXVAULT,
    BenchError,
    KiB,
    MiB,
    Server,
    fmt,
    free_port,
    log,
    managed_process,
    mb_per_s,
    raise_on_sigterm,
    require_tools,
    run_tool,
    scratch_dir,
    voxvault_server,
    wait_until_up,
    write_wav,
)
from bench.report import Row, Table, render_text

FILE_BYTES = 1024 * MiB
FULL_GETS = 3
RANGE_SIZES = (1 * MiB, 64 * KiB)
WRK_THREADS = 2
WRK_CONNECTIONS = 16
WRK_SECONDS = 10
TOOL_TIMEOUT_S = 300.0

# wrk runs one Lua state per thread: ``setup`` numbers the threads so each seeds its own random
# sequence; ``done`` prints the totals as one JSON line (payload bytes are counted from requests).
_WRK_SCRIPT = """\
local size = {size}
local length = {length}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("seed", counter * 7919 + {salt})
end

function init(args)
  math.randomseed(seed)
end

function request()
  local first = math.random(0, size - length)
  local range = string.format("bytes=%d-%d", first, first + length - 1)
  return wrk.format("GET", nil, {{["Range"] = range}})
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests": %d, "bytes": %d, "duration_us": %d, "connect": %d, "read": %d, '
    .. '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""

_NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    default_type application/octet-stream;
    access_log {prefix}/access.log;
    sendfile on;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        root {root};
    }}
}}
"""


@dataclass(frozen=True, slots=True)
class WrkRun:
    range_bytes: int
    requests: int
    duration_s: float
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s

    @property
    def mb_s(self) -> float:
        return mb_per_s(self.requests * self.range_bytes, self.duration_s)


@dataclass(frozen=True, slots=True)
class RangeComparison:
    range_bytes: int
    nginx: WrkRun
    voxvault: WrkRun


@dataclass(frozen=True, slots=True)
class RangeResult:
    file_bytes: int
    full_nginx_s: Sequence[float]
    full_voxvault_s: Sequence[float]
    ranges: Sequence[RangeComparison]
    wrk_seconds: int

    @property
    def full_nginx_mb_s(self) -> float:
        return mb_per_s(self.file_bytes, min(self.full_nginx_s))

    @property
    def full_voxvault_mb_s(self) -> float:
        return mb_per_s(self.file_bytes, min(self.full_voxvault_s))

    def table(self) -> Table:
        size_mib = self.file_bytes // MiB
        rows = [
            Row(
                f"Full-file GET, {size_mib:,} MiB (MB/s)",
                fmt(self.full_nginx_mb_s),
                fmt(self.full_voxvault_mb_s),
                self.full_voxvault_mb_s / self.full_nginx_mb_s,
            )
        ]
        notes = [
            "Full GETs, MB/s per try: nginx "
            + ", ".join(fmt(mb_per_s(self.file_bytes, s)) for s in self.full_nginx_s)
            + "; VoxVault "
            + ", ".join(fmt(mb_per_s(self.file_bytes, s)) for s in self.full_voxvault_s)
            + "."
        ]
        for comparison in self.ranges:
            label = _size_label(comparison.range_bytes)
            n, v = comparison.nginx, comparison.voxvault
            rows.append(
                Row(
                    f"Random {label} ranges (requests/s)",
                    fmt(n.requests_per_s),
                    fmt(v.requests_per_s),
                    v.requests_per_s / n.requests_per_s,
                )
            )
            rows.append(
                Row(
                    f"Random {label} ranges (payload MB/s)",
                    fmt(n.mb_s),
                    fmt(v.mb_s),
                    v.mb_s / n.mb_s,
                )
            )
            notes.append(
                f"{label} ranges, latency p50 / p99: nginx {n.p50_ms:.1f} / {n.p99_ms:.1f} ms, "
                f"VoxVault {v.p50_ms:.1f} / {v.p99_ms:.1f} ms; wrk errors: nginx {n.errors}, "
                f"VoxVault {v.errors}."
            )
        return Table(
            title=f"Serving a {size_mib:,} MiB recording vs nginx",
            baseline_name="nginx",
            intro=(
                f"The same {size_mib:,} MiB blob file, served by nginx (1 worker, `sendfile "
                "on`, access log on; `tcp_nopush` left off: in a trial here it stalled every "
                "64 KiB answer on loopback by ~40 ms) and by `voxvault serve` at "
                "`/v1/recordings/{id}/audio`; it is in the page cache for both. Full-file "
                f"GETs: curl to /dev/null, best of {len(self.full_nginx_s)}. Ranges: "
                f"`wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{self.wrk_seconds}s` with a "
                "random `Range: bytes=X-(X+len-1)` per request, every answer checked to be a "
                "206 of the right length beforehand. Payload MB/s counts range bytes only."
            ),
            rows=rows,
            notes=notes,
        )


def _size_label(nbytes: int) -> str:
    return f"{nbytes // MiB} MiB" if nbytes % MiB == 0 else f"{nbytes // KiB} KiB"


# ---- the two servers ---------------------------------------------------------------------------


def _ingest(data_dir: Path, source: Path, sha256: str) -> str:
    """Store ``source`` with the CLI; the new recording's id."""
    out = run_tool(
        [
            str(VOXVAULT),
            "--data-dir",
            str(data_dir),
            "ingest",
            "--no-transcribe",
            "--json",
            str(source),
        ],
        timeout=TOOL_TIMEOUT_S,
    )
    stored = json.loads(out)
    if len(stored) != 1 or stored[0]["sha256"] != sha256:
        raise BenchError(f"voxvault ingest stored something unexpected: {out[:500]}")
    recording_id: str = stored[0]["id"]
    return recording_id


@contextlib.contextmanager
def _nginx(root: Path, prefix: Path) -> Iterator[Server]:
    """nginx serving ``root`` on a free 127.0.0.1 port; up when yielded."""
    port = free_port()
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / name).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        _NGINX_CONF.format(
            # Workers would run as "nobody" otherwise, who cannot read the private scratch dir.
            user="user root;\n" if os.geteuid() == 0 else "",
            prefix=prefix,
            port=port,
            root=root,
        )
    )
    log_path = prefix / "stderr.log"
    argv = [str(NGINX), "-e", str(prefix / "error.log"), "-p", str(prefix), "-c", str(conf)]
    with managed_process(argv, log_path=log_path) as proc:
        wait_until_up(
            f"http://127.0.0.1:{port}/original", proc, prefix / "error.log", method="HEAD"
        )
        yield Server(proc, port)


# ---- measurements ------------------------------------------------------------------------------


def _check_ranges(url: str, blob: Path) -> None:
    """Both servers must answer a range with 206 and exactly the blob's bytes."""
    size = blob.stat().st_size
    with httpx.Client(timeout=30.0, trust_env=False) as client, blob.open("rb") as handle:
        for first, length in ((0, 44), (size // 3, 64 * KiB), (size - MiB, MiB)):
            last = first + length - 1
            response = client.get(url, headers={"Range": f"bytes={first}-{last}"})
            handle.seek(first)
            expected = handle.read(length)
            if (
                response.status_code != 206
                or response.headers.get("content-range") != f"bytes {first}-{last}/{size}"
                or response.content != expected
            ):
                raise BenchError(
                    f"{url} answered bytes={first}-{last} with {response.status_code}, "
                    f"{response.headers.get('content-range')}, {len(response.content)} bytes"
                )


def _time_full_get(url: str, size: int) -> float:
    out = run_tool(
        [
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            str(int(TOOL_TIMEOUT_S)),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{time_total}",
            url,
        ],
        timeout=TOOL_TIMEOUT_S + 30,
    )
    status, downloaded, seconds = out.split()
    if status != "200" or int(downloaded) != size:
        raise BenchError(f"GET {url} answered {status} with {downloaded} of {size} bytes")
    return float(seconds)


def _wrk(url: str, script: Path, range_bytes: int, seconds: int) -> WrkRun:
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
    errors = sum(summary[k] for k in ("connect", "read", "write", "status", "timeout"))
    if summary["requests"] == 0:
        raise BenchError(f"wrk completed no request against {url}:\n{out}")
    # Every answer must have been a range: on average one range plus headers per request.
    per_request = summary["bytes"] / summary["requests"]
    if not range_bytes <= per_request < range_bytes + 4 * KiB:
        raise BenchError(f"{url} sent {per_request:.0f} bytes per {range_bytes}-byte range")
    return WrkRun(
        range_bytes=range_bytes,
        requests=summary["requests"],
        duration_s=summary["duration_us"] / 1e6,
        errors=errors,
        p50_ms=summary["p50_us"] / 1e3,
        p99_ms=summary["p99_us"] / 1e3,
    )


def run(file_bytes: int = FILE_BYTES, wrk_seconds: int = WRK_SECONDS) -> RangeResult:
    require_tools("curl", "wrk", str(NGINX))
    if file_bytes < 2 * max(RANGE_SIZES):
        raise BenchError("the file must be at least twice the largest range")
    with scratch_dir("range") as workdir:
        source = workdir / "medium.wav"
        log(f"[range] writing a {file_bytes // MiB} MiB WAV and ingesting it")
        sha256 = write_wav(source, file_bytes)
        data_dir = workdir / "data"
        recording_id = _ingest(data_dir, source, sha256)
        source.unlink()
        blob = data_dir / "blobs" / "recordings" / recording_id / "original"
        if blob.stat().st_size != file_bytes:
            raise BenchError(f"{blob} has {blob.stat().st_size} bytes, expected {file_bytes}")
        os.sync()
        nginx_prefix = workdir / "nginx"
        nginx_prefix.mkdir()
        with (
            voxvault_server(data_dir, workdir / "server.log") as server,
            _nginx(blob.parent, nginx_prefix) as nginx,
        ):
            targets = {
                "nginx": f"{nginx.base_url}/original",
                "VoxVault": f"{server.base_url}/v1/recordings/{recording_id}/audio",
            }
            for url in targets.values():
                _check_ranges(url, blob)
            full: dict[str, list[float]] = {name: [] for name in targets}
            for attempt in range(1, FULL_GETS + 1):
                for name, url in targets.items():
                    full[name].append(_time_full_get(url, file_bytes))
                    mb_s = mb_per_s(file_bytes, full[name][-1])
                    log(f"[range] full GET {attempt}, {name}: {fmt(mb_s)} MB/s")
            ranges: list[RangeComparison] = []
            for range_bytes in RANGE_SIZES:
                script = workdir / f"range-{range_bytes}.lua"
                script.write_text(
                    _WRK_SCRIPT.format(
                        size=file_bytes, length=range_bytes, salt=time.time_ns() % 1_000_003
                    )
                )
                runs = {}
                for name, url in targets.items():
                    runs[name] = _wrk(url, script, range_bytes, wrk_seconds)
                    log(
                        f"[range] {_size_label(range_bytes)} ranges, {name}: "
                        f"{fmt(runs[name].requests_per_s)} requests/s, "
                        f"{fmt(runs[name].mb_s)} MB/s, {runs[name].errors} errors"
                    )
                ranges.append(RangeComparison(range_bytes, runs["nginx"], runs["VoxVault"]))
    return RangeResult(file_bytes, full["nginx"], full["VoxVault"], ranges, wrk_seconds)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=FILE_BYTES // MiB, help="file size")
    parser.add_argument("--seconds", type=int, default=WRK_SECONDS, choices=range(1, 61))
    args = parser.parse_args(argv)
    if args.size_mib < 2:
        parser.error("--size-mib must be at least 2")
    raise_on_sigterm()
    print(render_text(run(args.size_mib * MiB, args.seconds).table()))


if __name__ == "__main__":
    main()

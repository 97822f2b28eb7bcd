"""What every benchmark shares: scratch space, test audio, child processes, the machine.

Every child process is started in its own process group and stopped in a ``finally`` (SIGTERM,
then SIGKILL for whatever of the group is left), every wait has a deadline, and every scratch
file lives under ``bench/out/`` (same filesystem as the repository) and is deleted afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.metadata
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import httpx

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench" / "out"
VENV_BIN = REPO / ".venv" / "bin"
VOXVAULT = VENV_BIN / "voxvault" if (VENV_BIN / "voxvault").exists() else Path("voxvault")
NGINX = Path("/usr/sbin/nginx")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1_000_000  # throughput and memory are reported in decimal megabytes

SAMPLE_RATE = 48_000
WAV_HEADER_BYTES = 44
_PATTERN_BYTES = 4 * MiB

STARTUP_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0


class BenchError(RuntimeError):
    """A benchmark could not produce a valid measurement."""


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / MB / seconds if seconds > 0 else float("inf")


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


# ---- scratch space and test audio -------------------------------------------------------------


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory under ``bench/out/``, removed with everything in it afterwards."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=OUT_DIR))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            OUT_DIR.rmdir()  # only when empty


def wav_header(data_bytes: int, *, sample_rate: int = SAMPLE_RATE) -> bytes:
    """The 44-byte RIFF header of 16-bit mono PCM with ``data_bytes`` of samples."""
    if data_bytes % 2 or data_bytes + 36 >= 2**32:
        raise ValueError(f"cannot describe {data_bytes} bytes of 16-bit PCM in a WAV header")
    block_align = 2  # one channel of 16-bit samples
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,  # fmt chunk size
        1,  # PCM
        1,  # channels
        sample_rate,
        sample_rate * block_align,  # byte rate
        block_align,
        16,  # bits per sample
        b"data",
        data_bytes,
    )


def write_wav(path: Path, total_bytes: int) -> str:
    """Write a ``total_bytes`` WAV of pseudo-random PCM, durably; returns its sha256.

    Any bytes are valid 16-bit PCM, so a few MiB of random bytes repeated are decodable audio.
    The file is fsynced so that its write-back does not run during a later measurement; its
    pages stay in the page cache, so every reader afterwards reads it from memory.
    """
    data_bytes = total_bytes - WAV_HEADER_BYTES
    header = wav_header(data_bytes)
    pattern = os.urandom(_PATTERN_BYTES)
    digest = hashlib.sha256(header)
    with path.open("xb") as handle:
        handle.write(header)
        remaining = data_bytes
        while remaining > 0:
            piece = pattern if remaining >= len(pattern) else pattern[:remaining]
            handle.write(piece)
            digest.update(piece)
            remaining -= len(piece)
        handle.flush()
        os.fsync(handle.fileno())
    return digest.hexdigest()


# ---- child processes ---------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """This environment without VOXVAULT_* settings, so a child sees only its arguments."""
    return {k: v for k, v in os.environ.items() if not k.startswith("VOXVAULT_")}


def raise_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that every ``finally`` (and so every cleanup) runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, wait, then SIGKILL the process group it leads (it was started in its own)."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_GRACE_S)
    # The group id is this child's pid; it cannot be reused while any member is alive, so what
    # is left in it (nginx workers after a master crash, say) was started here.
    if _group_alive(proc.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_GRACE_S)


@contextlib.contextmanager
def managed_process(
    argv: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` with output to ``log_path``; it is stopped however the block ends.

    ``env`` is the child's whole environment (build it on ``clean_env()``); by default
    ``clean_env()``.
    """
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(clean_env() if env is None else env),
            cwd=REPO,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_process(proc)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_up(
    url: str, proc: subprocess.Popen[bytes], log_path: Path, *, method: str = "GET"
) -> None:
    """Poll ``url`` until it answers 200; fail if the process exits or the deadline passes."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"{proc.args!r} exited with {proc.returncode}:\n{tail(log_path)}")
            try:
                if client.request(method, url).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise BenchError(f"{url} did not answer within {STARTUP_TIMEOUT_S:.0f} s:\n{tail(log_path)}")


@dataclass(frozen=True, slots=True)
class Server:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid


class KeepAliveClient:
    """Sequential GETs on one keep-alive connection through the standard library's
    ``http.client``: for latencies of a millisecond or two, where httpx's own request building
    and response decoding cost 0.2 to 1 ms of the client's CPU per request on this machine and
    would be counted against the server."""

    def __init__(self, server: Server, timeout_s: float = 120.0) -> None:
        self._connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout_s)

    def get(self, path: str, params: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        """The status and the whole body of ``GET path?params``."""
        if params:
            path = f"{path}?{urllib.parse.urlencode(params)}"
        self._connection.request("GET", path)
        response = self._connection.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> KeepAliveClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def settings_env(data_dir: Path, database_url: str) -> dict[str, str]:
    """Settings of a server on ``database_url``, with every other store in ``data_dir``."""
    return {
        "VOXVAULT_DATA_DIR": str(data_dir),
        "VOXVAULT_DATABASE_URL": database_url,
        "VOXVAULT_BLOB_URL": (data_dir / "blobs").as_uri(),
        "VOXVAULT_QUEUE_URL": "embedded",
        "VOXVAULT_EVENTS_URL": "memory",
    }


@contextlib.contextmanager
def voxvault_server(
    data_dir: Path,
    log_path: Path,
    *,
    serve_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[Server]:
    """``voxvault serve [serve_args]`` on a free 127.0.0.1 port, as a user would run it; up
    when yielded. ``env``: its whole environment, as for ``managed_process``."""
    port = free_port()
    argv = [
        str(VOXVAULT),
        "--data-dir",
        str(data_dir),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *serve_args,
    ]
    with managed_process(argv, log_path=log_path, env=env) as proc:
        wait_until_up(f"http://127.0.0.1:{port}/healthz", proc, log_path)
        yield Server(proc, port)


def run_tool(argv: Sequence[str], *, timeout: float) -> str:
    """Run a short-lived command to completion; its stdout, or BenchError with its stderr."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=clean_env(),
            cwd=REPO,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def curl_post(
    source: Path, url: str, response: Path, *, timeout_s: float, content_type: str = "audio/wav"
) -> tuple[str, int]:
    """POST ``source`` streamed from disk with curl, the answer's body to ``response``;
    (HTTP status, bytes curl sent)."""
    out = run_tool(
        [
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            str(int(timeout_s)),
            "-X",
            "POST",
            "-T",
            str(source),
            "-H",
            f"Content-Type: {content_type}",
            "-o",
            str(response),
            "-w",
            "%{http_code} %{size_upload}",
            url,
        ],
        timeout=timeout_s + 30,
    )
    status, uploaded = out.split()
    return status, int(uploaded)


def proc_status_bytes(pid: int, field: str) -> int:
    """A memory field of ``/proc/<pid>/status`` (VmRSS, VmHWM, ...) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            amount, unit = value.split()
            if unit != "kB":
                raise BenchError(f"unexpected unit {unit!r} for {field}")
            return int(amount) * 1024
    raise BenchError(f"/proc/{pid}/status has no {field}")


def process_cpu_s(pid: int) -> float:
    """CPU seconds of process ``pid`` (all its threads) and of its children it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # Counting from the state (field 3 of proc(5)): utime, stime, cutime, cstime are 14-17.
    ticks = sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(
    pid: int, *, below_cores: float = 0.1, interval_s: float = 0.3, timeout_s: float = 60.0
) -> None:
    """Wait until process ``pid`` uses less than ``below_cores`` of a CPU over ``interval_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = process_cpu_s(pid)
        time.sleep(interval_s)
        if process_cpu_s(pid) - before < below_cores * interval_s:
            return
    raise BenchError(f"process {pid} was still busy after {timeout_s:.0f} s")


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None and not Path(n).is_file()]
    if missing:
        raise BenchError(
            f"missing tools: {', '.join(missing)} (`make bench` installs nginx-light, wrk, curl)"
        )


# ---- the machine ------------------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def filesystem_of(path: Path) -> str:
    """``<fstype> on <device>`` of the mount holding ``path`` (longest mount-point match)."""
    target = str(path.resolve())
    best = ("", "unknown", "unknown")
    for line in Path("/proc/self/mounts").read_text().splitlines():
        device, mount_point, fstype, *_ = line.split()
        mount_point = mount_point.replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best[0]):
            best = (mount_point, fstype, device)
    return f"{best[1]} on {best[2]} (mounted at {best[0]})"


@dataclass(frozen=True, slots=True)
class Machine:
    date: str
    cpus: int
    cpu_model: str
    memory_gib: float
    filesystem: str
    kernel: str
    python: str
    uvicorn: str
    fastapi: str
    voxvault: str
    nginx: str
    curl: str
    wrk: str
    speech: str


def describe_machine() -> Machine:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    try:
        filesystem = filesystem_of(OUT_DIR)
    finally:
        with contextlib.suppress(OSError):
            OUT_DIR.rmdir()
    commit = _first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return Machine(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        cpus=len(os.sched_getaffinity(0)),
        cpu_model=_cpu_model(),
        memory_gib=_mem_total_bytes() / GiB,
        filesystem=filesystem,
        kernel=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        uvicorn=_package_version("uvicorn"),
        fastapi=_package_version("fastapi"),
        voxvault=f"{_package_version('voxvault')} (git {commit})",
        nginx=_first_line([str(NGINX), "-v"]).removeprefix("nginx version: "),
        curl=" ".join(_first_line(["curl", "--version"]).split()[:2]),
        wrk=_first_line(["wrk", "-v"]).split(" Copyright")[0],
        speech=(
            f"faster-whisper {_package_version('faster-whisper')}, CTranslate2 "
            f"{_package_version('ctranslate2')}, PyAV {_package_version('av')}, "
            + _first_line(["espeak-ng", "--version"]).split("  Data at")[0]
        ),
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

"""The decoding part of the pipeline: an upload in, the renditions asked for out.

``speech.wav`` (16 kHz mono s16) feeds the speech engine; ``playback.opus`` (Ogg Opus, 48 kHz)
is what browsers play. ``normalize_speech`` makes the first, ``normalize_playback`` the second
(at a lower CPU priority: it is meant to run beside the speech engine on otherwise idle
cores), ``normalize`` both in one pass. Uploads are untrusted, and FFmpeg parses them, so
decoding happens in a child process (``voxvault.media.decoder``) with an address-space limit,
in its own process group, killed whole on a timeout or a cancel. This module never imports
PyAV: whatever a file does to the decoder, it does to the child.

All three block; callers run them in worker threads. They share their limits, cancel, progress
and error behaviour.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from voxvault.errors import MediaLimitExceeded, UnsupportedMedia
from voxvault.media.decoder import FILENAMES, PLAYBACK, SPEECH

DECODER_SCRIPT = Path(__file__).with_name("decoder.py")
POLL_INTERVAL_S = 0.1
PROGRESS_INTERVAL_S = 0.1
MAX_PROTOCOL_LINE = 64 * 1024
STDERR_TAIL_BYTES = 4096
PLAYBACK_NICENESS = 10
"""Added to the nice value of the process that makes the playback rendition alone."""
# What a process that ran out of address space tends to leave on stderr before dying.
_MEMORY_MARKERS = ("memoryerror", "cannot allocate memory", "out of memory", "bad_alloc")

__all__ = [
    "DecodeCancelled",
    "DecodeLimits",
    "NormalizedAudio",
    "PlaybackAudio",
    "SpeechAudio",
    "normalize",
    "normalize_playback",
    "normalize_speech",
]


class DecodeCancelled(Exception):
    """``should_stop`` asked for the decode to end; the child was killed and nothing kept."""


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    timeout_s: float
    """Wall clock for the whole decode, the child's start-up included."""
    memory_bytes: int
    """``RLIMIT_AS`` of the decoding process."""
    max_duration_s: float
    """More decoded audio than this is refused (``MediaLimitExceeded``)."""


@dataclass(frozen=True, slots=True)
class NormalizedAudio:
    speech: Path
    """16 kHz, mono, s16le WAV for the speech engine."""
    playback: Path
    """Ogg Opus at 48 kHz for browsers: mono for a mono source, else stereo."""
    duration_s: float
    """Seconds of audio actually decoded."""


@dataclass(frozen=True, slots=True)
class SpeechAudio:
    speech: Path
    """16 kHz, mono, s16le WAV for the speech engine."""
    duration_s: float
    """Seconds of audio actually decoded."""


@dataclass(frozen=True, slots=True)
class PlaybackAudio:
    playback: Path
    """Ogg Opus at 48 kHz for browsers: mono for a mono source, else stereo."""
    duration_s: float
    """Seconds of audio actually decoded."""


Progress = Callable[[float], None]
ShouldStop = Callable[[], bool]


def normalize(
    source: Path,
    workdir: Path,
    limits: DecodeLimits,
    *,
    on_progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> NormalizedAudio:
    """Decode ``source`` once into ``workdir/speech.wav`` and ``workdir/playback.opus``.

    Raises ``UnsupportedMedia`` (not decodable audio), ``MediaLimitExceeded`` (too long, too
    slow or too big to decode) or ``DecodeCancelled``; after any failure neither output exists.
    """
    duration = _decode(source, workdir, limits, (SPEECH, PLAYBACK), 0, on_progress, should_stop)
    return NormalizedAudio(
        speech=workdir / FILENAMES[SPEECH],
        playback=workdir / FILENAMES[PLAYBACK],
        duration_s=duration,
    )


def normalize_speech(
    source: Path,
    workdir: Path,
    limits: DecodeLimits,
    *,
    on_progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> SpeechAudio:
    """Decode ``source`` into ``workdir/speech.wav`` only; errors as for ``normalize``."""
    duration = _decode(source, workdir, limits, (SPEECH,), 0, on_progress, should_stop)
    return SpeechAudio(speech=workdir / FILENAMES[SPEECH], duration_s=duration)


def normalize_playback(
    source: Path,
    workdir: Path,
    limits: DecodeLimits,
    *,
    on_progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    niceness: int = PLAYBACK_NICENESS,
) -> PlaybackAudio:
    """Decode ``source`` into ``workdir/playback.opus`` only; errors as for ``normalize``.

    The decoding process runs ``niceness`` steps below normal CPU priority, so that it takes
    only what the rest of the machine leaves. ``limits.timeout_s`` still counts wall-clock
    time: on a machine that stays busy the rendition can run into it sooner than a normal one.
    """
    duration = _decode(source, workdir, limits, (PLAYBACK,), niceness, on_progress, should_stop)
    return PlaybackAudio(playback=workdir / FILENAMES[PLAYBACK], duration_s=duration)


def _decode(
    source: Path,
    workdir: Path,
    limits: DecodeLimits,
    kinds: tuple[str, ...],
    niceness: int,
    on_progress: Progress | None,
    should_stop: ShouldStop | None,
) -> float:
    """Run the decoder child for the ``kinds`` of output; the seconds decoded.

    After any failure none of the outputs asked for exists (others in ``workdir`` are left be).
    """
    if not source.is_file():
        # The caller's mistake, not the upload's: not an UnsupportedMedia for the client.
        raise FileNotFoundError(f"no such file to normalize: {source}")
    workdir.mkdir(parents=True, exist_ok=True)
    outputs = [workdir / FILENAMES[kind] for kind in kinds]
    progress = _Progress(on_progress)
    finished = False
    try:
        with tempfile.TemporaryFile() as stderr:
            child = _start(source, workdir, limits, kinds, niceness, stderr)
            try:
                final = _supervise(child, limits, progress, should_stop)
            finally:
                _end(child)
            duration = _outcome(final, child.returncode, _tail(stderr), limits)
        if not all(path.is_file() for path in outputs):
            raise UnsupportedMedia(
                "the decoder reported success but wrote no output",
                detail={"reason": "missing output"},
            )
        progress.finish()
        finished = True
    finally:
        if not finished:
            # The child removes its partial outputs, but not when it was killed.
            for path in outputs:
                path.unlink(missing_ok=True)
    return duration


def _start(
    source: Path,
    workdir: Path,
    limits: DecodeLimits,
    kinds: tuple[str, ...],
    niceness: int,
    stderr: IO[bytes],
) -> subprocess.Popen[bytes]:
    # The decoder runs as a script, not as ``-m voxvault.media.decoder``, which would first
    # import the voxvault package (pydantic, SQLAlchemy, ...): half a second and tens of MiB of
    # address space before any decoding. -P keeps the script's own directory off sys.path.
    #
    # The address-space limit is set by the child at the top of its main, before PyAV is
    # imported or the upload opened, rather than in a preexec_fn: preexec_fn runs Python
    # between fork and exec, which can deadlock when other threads hold locks, and callers run
    # this function in worker threads by design. start_new_session is done by the C fork code,
    # safe with threads, and makes the child the leader of a group we can kill whole. For the
    # same reason the child lowers its own priority (Popen has no nice setting of its own).
    command = [
        sys.executable,
        "-P",
        str(DECODER_SCRIPT),
        str(source),
        str(workdir),
        repr(float(limits.max_duration_s)),
        str(int(limits.memory_bytes)),
        ",".join(kinds),
        str(int(niceness)),
    ]
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        start_new_session=True,
    )


def _supervise(
    child: subprocess.Popen[bytes],
    limits: DecodeLimits,
    progress: _Progress,
    should_stop: ShouldStop | None,
) -> dict[str, Any] | None:
    """Follow the child's reports until it exits; the final report, if it sent one."""
    assert child.stdout is not None
    deadline = time.monotonic() + limits.timeout_s
    final: dict[str, Any] | None = None
    pending = b""
    fd = child.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        open_stream = True
        while open_stream or child.poll() is None:
            if should_stop is not None and should_stop():
                raise DecodeCancelled("decoding was cancelled")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MediaLimitExceeded(
                    f"decoding took longer than {limits.timeout_s:g} s",
                    detail={"limit": "timeout_s", "timeout_s": limits.timeout_s},
                )
            wait = min(POLL_INTERVAL_S, remaining)
            if not open_stream:
                # stdout closed; only the exit is still to come, and waiting returns at once
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(wait)
                continue
            if not selector.select(wait):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                open_stream = False
                continue
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > MAX_PROTOCOL_LINE:
                pending = b""  # not the protocol; ignore rather than grow
            for line in lines:
                message = _parse(line)
                if "progress" in message:
                    progress.report(message["progress"])
                elif "done" in message or "error" in message:
                    final = message
    return final


def _parse(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def _end(child: subprocess.Popen[bytes]) -> None:
    """Kill the child's process group unless it has exited, then reap it: no zombie is left."""
    if child.poll() is None:
        # Still unreaped, so the group id cannot have been reused by an unrelated process.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    if child.stdout is not None:
        child.stdout.close()


def _tail(stderr: IO[bytes]) -> str:
    size = stderr.seek(0, os.SEEK_END)
    stderr.seek(max(0, size - STDERR_TAIL_BYTES))
    return stderr.read().decode("utf-8", "replace")


def _outcome(
    final: dict[str, Any] | None, returncode: int, stderr: str, limits: DecodeLimits
) -> float:
    """The decoded duration, or the error the child's report and exit status amount to."""
    final = final or {}
    if "done" in final and returncode == 0:
        return float(final["done"])
    kind = final.get("error")
    reason = str(final.get("reason", ""))
    if kind == "unsupported":
        raise UnsupportedMedia(str(final.get("message")), detail={"reason": reason})
    if kind == "too_long":
        raise MediaLimitExceeded(
            f"the recording is longer than the limit of {limits.max_duration_s:g} s",
            detail={"limit": "max_duration_s", "max_duration_s": limits.max_duration_s},
        )
    if kind == "memory" or (kind is None and _out_of_memory(returncode, stderr)):
        raise MediaLimitExceeded(
            f"decoding needed more memory than the limit of {_mib(limits.memory_bytes)}",
            detail={"limit": "memory_bytes", "memory_bytes": limits.memory_bytes},
        )
    if kind is None:
        reason = _exit_reason(returncode, stderr)
    raise UnsupportedMedia("the decoder failed on this file", detail={"reason": reason})


def _out_of_memory(returncode: int, stderr: str) -> bool:
    # We only SIGKILL children we have given up on, and those never get here; a SIGKILL seen
    # here came from the kernel, whose OOM killer is its usual sender.
    if returncode == -signal.SIGKILL:
        return True
    lowered = stderr.lower()
    return returncode != 0 and any(marker in lowered for marker in _MEMORY_MARKERS)


def _exit_reason(returncode: int, stderr: str) -> str:
    if returncode < 0:
        try:
            reason = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            reason = f"killed by signal {-returncode}"
    else:
        reason = f"exit status {returncode}"
    last_line = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    return f"{reason}: {last_line[:200]}" if last_line else reason


def _mib(size: int) -> str:
    return f"{size / 1024**2:g} MiB"


class _Progress:
    """Forwards fractions to ``on_progress``: monotonic, at most ~10 calls a second.

    1.0 is only ever sent by ``finish``, after success: the child's own 100 % can still be
    followed by a failure.
    """

    def __init__(self, callback: Progress | None) -> None:
        self.callback = callback
        self.last = 0.0
        self.last_call = float("-inf")

    def report(self, fraction: object) -> None:
        if self.callback is None or not isinstance(fraction, int | float):
            return
        fraction = min(max(float(fraction), 0.0), 0.99)
        now = time.monotonic()
        if fraction > self.last and now - self.last_call >= PROGRESS_INTERVAL_S:
            self.last, self.last_call = fraction, now
            self.callback(fraction)

    def finish(self) -> None:
        if self.callback is not None:
            self.callback(1.0)

"""The child process that decodes untrusted media for ``normalize``, which runs it as a script.

``voxvault.media.normalize`` starts ``python -P decoder.py ...`` so that a hostile or merely
broken upload can crash, hang or bloat only this process: it gets an address-space limit before
PyAV is even imported, and the parent kills its process group on a timeout or a cancel. It
imports nothing from VoxVault, so the package (pydantic, SQLAlchemy, ...) is neither loaded nor
counted against that limit; the parent imports only its constants.

One pass over the first audio stream makes the renditions asked for: ``speech.wav`` (16 kHz mono
s16, for the speech engine) and/or ``playback.opus`` (libopus in Ogg at 48 kHz, for browsers).
Speech alone is resampled straight from the decoded frames; with playback, decoded frames are
resampled to 48 kHz float for the encoder and the speech rendition is made from those. Frames
are streamed, never collected, so memory stays flat whatever the length.

Protocol: ``decoder.py SOURCE WORKDIR MAX_DURATION_S MEMORY_BYTES OUTPUTS NICENESS``, where
OUTPUTS is ``speech``, ``playback`` or ``speech,playback`` and NICENESS (0 or more) is added to
this process's nice value before anything else runs. Standard output carries JSON lines: any
number of ``{"progress": fraction}``, then exactly one of ``{"done": duration_s}`` or
``{"error": kind, "message": ..., "reason": ...}`` where kind is ``unsupported``, ``too_long``,
``memory`` or ``crash``. Anything a library prints lands on standard error instead, so it cannot
corrupt the protocol.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import resource
import sys
import time
import wave
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import av

SPEECH = "speech"
PLAYBACK = "playback"
SPEECH_FILENAME = "speech.wav"
PLAYBACK_FILENAME = "playback.opus"
FILENAMES = {SPEECH: SPEECH_FILENAME, PLAYBACK: PLAYBACK_FILENAME}
SPEECH_RATE = 16000
PLAYBACK_RATE = 48000
OPUS_BIT_RATE = {1: 32000, 2: 48000}
# libopus at complexity 5 with constrained VBR: a quarter of the CPU of its default (10) on
# speech at these rates, at the same size; the encode runs beside the speech engine, whose
# time it would otherwise take (docs/benchmarks.md, pipeline real-time factor).
OPUS_OPTIONS = {"compression_level": "5", "vbr": "constrained"}
PROGRESS_INTERVAL_S = 0.1
# Bad packets are skipped while they stay rare; a stream that is mostly damage is refused
# instead of being decoded into a few scraps of sound.
BAD_PACKETS_TOLERATED = 100


class Refused(Exception):
    """Ends the decode with an error message for the parent (``kind`` as in the protocol)."""

    def __init__(self, kind: str, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.reason = reason


class Reporter:
    """Writes protocol lines; progress at most every ``PROGRESS_INTERVAL_S`` seconds."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.last_progress = -1.0
        self.last_time = 0.0

    def send(self, **message: Any) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    def progress(self, fraction: float) -> None:
        now = time.monotonic()
        fraction = min(max(fraction, 0.0), 1.0)
        if fraction > self.last_progress and now - self.last_time >= PROGRESS_INTERVAL_S:
            self.last_progress, self.last_time = fraction, now
            self.send(progress=round(fraction, 4))


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    source, workdir, max_duration, memory, wanted, niceness = args
    _lower_priority(int(niceness))
    reporter = Reporter(_protocol_stream())
    kinds = wanted.split(",")
    if not set(kinds) <= set(FILENAMES):
        reporter.send(error="crash", message="bad decoder arguments", reason=f"outputs {wanted!r}")
        return 2
    speech = Path(workdir) / SPEECH_FILENAME if SPEECH in kinds else None
    playback = Path(workdir) / PLAYBACK_FILENAME if PLAYBACK in kinds else None
    outputs = tuple(path for path in (speech, playback) if path is not None)
    try:
        if importlib.util.find_spec("av") is None:
            raise Refused("crash", "PyAV is not installed", "no module named av")
        _limit_address_space(int(memory))
        try:
            import av
        except (ImportError, OSError) as exc:
            # PyAV is installed (checked above): its libraries could not be mapped in.
            raise Refused("memory", "PyAV could not be loaded", str(exc)[:300]) from None
        duration = _decode(av, Path(source), speech, playback, float(max_duration), reporter)
    except Refused as exc:
        _remove(outputs)
        reporter.send(error=exc.kind, message=exc.message, reason=exc.reason)
        return 1
    except MemoryError as exc:  # av.MemoryError (ENOMEM inside FFmpeg) included
        _remove(outputs)
        reporter.send(error="memory", message="out of memory", reason=type(exc).__name__)
        return 1
    except Exception as exc:
        _remove(outputs)
        reason = f"{type(exc).__name__}: {_reason(exc)}"
        reporter.send(error="crash", message="the decoder failed", reason=reason)
        return 1
    reporter.send(done=duration)
    return 0


def _protocol_stream() -> IO[str]:
    """A private copy of standard output for the protocol; fd 1 itself now points at stderr."""
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return protocol


def _lower_priority(increment: int) -> None:
    """Yield the CPU to everything else of this machine: a background rendition uses idle cores.

    With autogrouping (Linux ``CONFIG_SCHED_AUTOGROUP``, on in most distributions) a nice value
    only ranks a process among those of its own session, and this process leads a new session
    (``start_new_session``): its group would compete with the worker's at equal weight. So the
    group's nice is raised too, which an unprivileged process may do for its own group. The
    kernel rate-limits that write (about ten a second machine-wide) and it is absent where
    autogrouping is not. Best effort throughout: a rendition made at normal priority is still
    a rendition.
    """
    if increment <= 0:
        return
    with contextlib.suppress(OSError):
        niceness = os.nice(increment)
        Path("/proc/self/autogroup").write_text(f"{niceness}\n")


def _limit_address_space(limit: int) -> None:
    # Soft and hard alike, so code running later in this process cannot raise it again.
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _remove(paths: tuple[Path, ...]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _decode(
    av: Any,
    source: Path,
    speech: Path | None,
    playback: Path | None,
    max_duration: float,
    reporter: Reporter,
) -> float:
    try:
        # Only local files: a playlist-like upload (HLS, concat) must not reach the network.
        container = av.open(
            str(source), mode="r", metadata_errors="ignore", options={"protocol_whitelist": "file"}
        )
    except (av.FFmpegError, OSError, ValueError, IndexError, EOFError) as exc:
        raise Refused(
            "unsupported", "the upload is not audio or video that can be decoded", _reason(exc)
        ) from None
    with container:
        audio = [s for s in container.streams if s.type == "audio"]
        if not audio:
            raise Refused("unsupported", "the file has no audio track", "no audio stream")
        # The first audio stream, as the probe reports it.
        stream = audio[0]
        total = _declared_duration(container, stream)
        size = source.stat().st_size
        with contextlib.ExitStack() as files:
            wav: wave.Wave_write | None = None
            ogg: Any = None
            if speech is not None:
                speech.parent.mkdir(parents=True, exist_ok=True)
                wav = files.enter_context(wave.open(str(speech), "wb"))
                wav.setnchannels(1)
                wav.setsampwidth(2)
                wav.setframerate(SPEECH_RATE)
            if playback is not None:
                playback.parent.mkdir(parents=True, exist_ok=True)
                ogg = files.enter_context(av.open(str(playback), "w", "ogg"))
            sink = _Sink(av, wav, ogg)
            good = bad = 0
            last_error = ""
            decoded = 0.0
            for packet in _packets(av, container, stream):
                try:
                    frames = packet.decode()
                except MemoryError:
                    raise
                except (av.FFmpegError, ValueError) as exc:
                    bad += 1
                    last_error = _reason(exc)
                    if bad > BAD_PACKETS_TOLERATED and bad > good:
                        raise Refused(
                            "unsupported", "the audio stream is too damaged to decode", last_error
                        ) from None
                    continue
                good += 1
                for frame in frames:
                    if not frame.samples or not frame.sample_rate:
                        continue
                    sink.write(frame, decoded)
                    decoded += frame.samples / frame.sample_rate
                    if decoded > max_duration:
                        raise Refused("too_long", "the recording is too long", f"{decoded:.1f} s")
                if total:
                    reporter.progress(decoded / total)
                elif packet.pos is not None and packet.pos >= 0 and size:
                    reporter.progress(packet.pos / size)
            if decoded == 0:
                reason = last_error or "no audio frames"
                raise Refused("unsupported", "no audio could be decoded from the file", reason)
            sink.close()
    return round(decoded, 6)


def _packets(av: Any, container: Any, stream: Any) -> Iterator[Any]:
    """The stream's packets; a container that cannot be read on is refused, not half kept."""
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except MemoryError:
            raise
        except (av.FFmpegError, OSError, ValueError, EOFError) as exc:
            raise Refused(
                "unsupported", "the file is damaged and cannot be read to the end", _reason(exc)
            ) from None
        yield packet


def _reason(exc: Exception) -> str:
    """FFmpeg's message without the file name: the path on this server is nobody's business."""
    strerror = getattr(exc, "strerror", None)  # FFmpegError and OSError both have one
    return str(strerror or exc)[:300]


def _declared_duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base) or None
    if container.duration is not None:
        return float(container.duration / 1_000_000) or None
    return None


class _Sink:
    """The renditions asked for, made from the decoded frames as they come.

    Each decoded frame goes through one resampler only: to 48 kHz float for the Opus encoder
    when playback is made (the speech rendition, if wanted too, is made from those frames), else
    straight to 16 kHz mono s16. Pushing one decoded frame into two resamplers fails for inputs
    whose channel layout is unspecified (a WAV without a channel mask). The Opus encoder is set
    up by the first frame.
    """

    def __init__(self, av: Any, wav: wave.Wave_write | None, ogg: Any) -> None:
        self.av = av
        self.wav = wav
        self.ogg = ogg
        self.opus: Any = None
        self.shape: tuple[str, str, int] | None = None
        self.first: Any = None
        """The resampler of the decoded frames, built anew when their shape changes."""
        self.to_speech: Any = (
            av.AudioResampler("s16", "mono", SPEECH_RATE)
            if wav is not None and ogg is not None
            else None
        )
        """Speech from the 48 kHz playback frames, when both renditions are made."""
        self.playback_samples = 0

    def write(self, frame: av.AudioFrame, start_s: float) -> None:
        shape = (frame.format.name, frame.layout.name, frame.sample_rate)
        if shape != self.shape:
            # First frame, or the stream changed format midway (concatenated MP3s, HE-AAC):
            # a resampler is built for one input shape, so drain the old one and start anew.
            self._drain()
            self.first = self._resampler(stereo=frame.layout.nb_channels > 1)
            self.shape = shape
        # Decoder timestamps are often missing or jumpy; the renditions are continuous.
        frame.pts = round(start_s * frame.sample_rate)
        frame.time_base = Fraction(1, frame.sample_rate)
        self._resampled(self.first.resample(frame))

    def close(self) -> None:
        self._drain()
        if self.to_speech is not None:
            self._speech(self.to_speech.resample(None))
        if self.opus is not None:
            for packet in self.opus.encode(None):
                self.ogg.mux(packet)

    def _resampler(self, *, stereo: bool) -> Any:
        if self.ogg is None:
            return self.av.AudioResampler("s16", "mono", SPEECH_RATE)
        if self.opus is None:
            self._open_opus(stereo=stereo)
        context = self.opus.codec_context
        return self.av.AudioResampler(context.format, context.layout, PLAYBACK_RATE)

    def _open_opus(self, *, stereo: bool) -> None:
        self.opus = self.ogg.add_stream("libopus", rate=PLAYBACK_RATE, options=OPUS_OPTIONS)
        self.opus.layout = "stereo" if stereo else "mono"
        self.opus.format = "flt"
        self.opus.bit_rate = OPUS_BIT_RATE[2 if stereo else 1]
        self.opus.time_base = Fraction(1, PLAYBACK_RATE)

    def _drain(self) -> None:
        if self.first is not None:
            self._resampled(self.first.resample(None))

    def _resampled(self, frames: list[Any]) -> None:
        if self.ogg is not None:
            self._playback(frames)
        else:
            self._speech(frames)

    def _playback(self, frames: list[Any]) -> None:
        for frame in frames:
            frame.pts = self.playback_samples
            frame.time_base = Fraction(1, PLAYBACK_RATE)
            self.playback_samples += frame.samples
            # The encoder cuts its own 20 ms frames (PyAV re-chunks for fixed-size codecs).
            for packet in self.opus.encode(frame):
                self.ogg.mux(packet)
            if self.to_speech is not None:
                self._speech(self.to_speech.resample(frame))

    def _speech(self, frames: list[Any]) -> None:
        assert self.wav is not None
        for frame in frames:
            self.wav.writeframesraw(memoryview(frame.planes[0])[: frame.samples * 2])


if __name__ == "__main__":
    sys.exit(main())

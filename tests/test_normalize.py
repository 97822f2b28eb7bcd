"""normalize: decoding an untrusted upload into speech and playback renditions.

``normalize`` makes both in one pass, ``normalize_speech`` and ``normalize_playback`` one each
(the latter at a lower CPU priority); the limit, cancel and bad-input tests run for all three.
Every test uses real media made on the fly. Failures are checked for the error class, for an
empty work directory and, where a child was killed, for no child process left behind.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import random
import signal
import time
import wave
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import psutil
import pytest

from tests.media import encode_audio, encode_video, riff_declaring, wav_bytes
from voxvault.errors import MediaLimitExceeded, UnsupportedMedia
from voxvault.media.normalize import (
    PLAYBACK_NICENESS,
    DecodeCancelled,
    DecodeLimits,
    normalize,
    normalize_playback,
    normalize_speech,
)

MiB = 1024**2
# The smallest memory limit Settings accepts: every decode in this file runs under it.
LIMITS = DecodeLimits(timeout_s=60, memory_bytes=256 * MiB, max_duration_s=3600)
SECONDS = 3.0


# ---- helpers ------------------------------------------------------------------------------------


def silence_flac(seconds: int, rate: int = 8000) -> bytes:
    """Long but tiny: FLAC of silence, made one second at a time."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="flac") as out:
        stream = out.add_stream("flac", rate=rate, layout="mono")
        assert isinstance(stream, av.AudioStream)
        zeros = np.zeros((1, rate), dtype=np.int16)
        for second in range(seconds):
            frame = av.AudioFrame.from_ndarray(zeros, format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, second * rate, Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def damaged_in_the_middle(data: bytes, length: int = 2000) -> bytes:
    damaged = bytearray(data)
    middle = len(data) // 2
    damaged[middle : middle + length] = random.Random(7).randbytes(length)
    return bytes(damaged)


def source_channels(path: Path) -> int:
    with av.open(str(path)) as container:
        return container.streams.audio[0].codec_context.channels


def playback_audio(path: Path) -> tuple[str, str, int, int, float]:
    """Container, codec, rate, channels and decoded seconds of the Opus rendition."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        context = stream.codec_context
        return container.format.name, context.name, context.rate, context.channels, samples / 48000


def children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def decoders() -> list[psutil.Process]:
    """The decoder processes normalize has running now (other children of pytest excluded)."""
    found = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if any(arg.endswith("decoder.py") for arg in child.cmdline()):
                found.append(child)
    return found


@pytest.fixture
def source(tmp_path: Path) -> Callable[[bytes, str], Path]:
    def write(data: bytes, name: str) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return write


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "work" / "job-1"  # does not exist yet: normalize creates it


@pytest.fixture(scope="module")
def ten_minutes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("long") / "silence.flac"
    path.write_bytes(silence_flac(600))
    return path


@pytest.fixture(scope="module")
def four_hours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Long enough that even the speech rendition alone takes seconds to make (fifty minutes
    of it took under a second on a quiet 2-core machine)."""
    path = tmp_path_factory.mktemp("longer") / "silence.flac"
    path.write_bytes(silence_flac(4 * 3600))
    return path


@pytest.fixture(autouse=True)
def _no_child_left() -> Iterator[None]:
    before = children()
    yield
    assert children() <= before, "a decoder process outlived normalize"


def assert_nothing_left(workdir: Path) -> None:
    assert not workdir.exists() or list(workdir.iterdir()) == []


Decode = Callable[..., Any]
ENTRY_POINTS: dict[str, Decode] = {
    "both": normalize,
    "speech": normalize_speech,
    "playback": normalize_playback,
}


@pytest.fixture(params=list(ENTRY_POINTS))
def decode(request: pytest.FixtureRequest) -> Decode:
    """Each entry point in turn: the limits, cancel and error handling are the same for all."""
    return ENTRY_POINTS[request.param]


def assert_speech_wav(path: Path, seconds: float) -> None:
    with wave.open(str(path)) as speech:
        assert (speech.getframerate(), speech.getnchannels(), speech.getsampwidth()) == (
            16000,
            1,
            2,
        )
        assert speech.getnframes() == pytest.approx(seconds * 16000, rel=0.01)


# ---- renditions ---------------------------------------------------------------------------------


FORMATS: dict[str, Callable[[], bytes]] = {
    "wav": lambda: wav_bytes(SECONDS, rate=44100, channels=2),
    "mp3": lambda: encode_audio("mp3", "libmp3lame", SECONDS, rate=44100),
    "flac": lambda: encode_audio("flac", "flac", SECONDS, rate=44100),
    "ogg": lambda: encode_audio("ogg", "libopus", SECONDS, rate=48000),
    "m4a": lambda: encode_audio("ipod", "aac", SECONDS, rate=44100),
    "mp4": lambda: encode_video(SECONDS, container="mp4"),
    "webm": lambda: encode_video(SECONDS, container="webm"),
}


@pytest.mark.parametrize("extension", list(FORMATS))
def test_every_format_gives_both_renditions(
    source: Callable[[bytes, str], Path], workdir: Path, extension: str
) -> None:
    upload = source(FORMATS[extension](), f"upload.{extension}")
    result = normalize(upload, workdir, LIMITS)

    assert (result.speech, result.playback) == (workdir / "speech.wav", workdir / "playback.opus")
    assert result.duration_s == pytest.approx(SECONDS, rel=0.01)
    assert sorted(p.name for p in workdir.iterdir()) == ["playback.opus", "speech.wav"]
    with wave.open(str(result.speech)) as speech:
        assert (speech.getframerate(), speech.getnchannels(), speech.getsampwidth()) == (
            16000,
            1,
            2,
        )
        assert speech.getnframes() == pytest.approx(SECONDS * 16000, rel=0.01)
    container, codec, rate, channels, seconds = playback_audio(result.playback)
    assert (container, codec, rate) == ("ogg", "opus", 48000)
    assert channels == min(source_channels(upload), 2)
    assert seconds == pytest.approx(result.duration_s, rel=0.02)


@pytest.mark.parametrize("extension", list(FORMATS))
def test_speech_only_makes_the_wav_alone(
    source: Callable[[bytes, str], Path], workdir: Path, extension: str
) -> None:
    result = normalize_speech(source(FORMATS[extension](), f"upload.{extension}"), workdir, LIMITS)

    assert result.speech == workdir / "speech.wav"
    assert result.duration_s == pytest.approx(SECONDS, rel=0.01)
    assert [p.name for p in workdir.iterdir()] == ["speech.wav"]
    assert_speech_wav(result.speech, SECONDS)


@pytest.mark.parametrize("extension", list(FORMATS))
def test_playback_only_makes_the_opus_alone(
    source: Callable[[bytes, str], Path], workdir: Path, extension: str
) -> None:
    upload = source(FORMATS[extension](), f"upload.{extension}")
    result = normalize_playback(upload, workdir, LIMITS)

    assert result.playback == workdir / "playback.opus"
    assert result.duration_s == pytest.approx(SECONDS, rel=0.01)
    assert [p.name for p in workdir.iterdir()] == ["playback.opus"]
    container, codec, rate, channels, seconds = playback_audio(result.playback)
    assert (container, codec, rate) == ("ogg", "opus", 48000)
    assert channels == min(source_channels(upload), 2)
    assert seconds == pytest.approx(result.duration_s, rel=0.02)


def test_speech_only_keeps_the_signal_of_a_wav_without_channel_mask(
    source: Callable[[bytes, str], Path], workdir: Path
) -> None:
    """Resampled straight from the decoded frames ("1 channels" layout) to 16 kHz mono."""
    result = normalize_speech(source(wav_bytes(SECONDS, rate=22050), "m.wav"), workdir, LIMITS)
    with wave.open(str(result.speech)) as speech:
        samples = np.frombuffer(speech.readframes(speech.getnframes()), dtype=np.int16)
    assert len(samples) == pytest.approx(SECONDS * 16000, rel=0.01)
    peak_hz = np.argmax(np.abs(np.fft.rfft(samples))) * 16000 / len(samples)
    assert peak_hz == pytest.approx(440, abs=2)


def test_a_format_change_midway_is_followed_by_each_entry_point(
    source: Callable[[bytes, str], Path], tmp_path: Path
) -> None:
    data = encode_audio("mp3", "libmp3lame", 2.0, rate=44100)
    data += encode_audio("mp3", "libmp3lame", 2.0, rate=22050)
    upload = source(data, "joined.mp3")
    speech = normalize_speech(upload, tmp_path / "speech", LIMITS)
    playback = normalize_playback(upload, tmp_path / "playback", LIMITS)
    assert speech.duration_s == pytest.approx(4.0, rel=0.02)
    assert playback.duration_s == speech.duration_s
    with wave.open(str(speech.speech)) as wav:
        assert wav.getnframes() == pytest.approx(speech.duration_s * 16000, rel=0.01)
    assert playback_audio(playback.playback)[4] == pytest.approx(speech.duration_s, rel=0.02)


def test_a_failure_removes_only_the_outputs_it_was_asked_for(
    source: Callable[[bytes, str], Path], workdir: Path
) -> None:
    """Speech and playback made apart in one directory: a failed one leaves the other be."""
    normalize_playback(source(wav_bytes(1.0), "good.wav"), workdir, LIMITS)
    with pytest.raises(UnsupportedMedia):
        normalize_speech(source(BAD_INPUT["text"](), "bad.wav"), workdir, LIMITS)
    assert [p.name for p in workdir.iterdir()] == ["playback.opus"]


def test_mono_source_gives_mono_playback(
    source: Callable[[bytes, str], Path], workdir: Path
) -> None:
    # A plain WAV has no channel mask: its layout is "1 channels", not "mono".
    result = normalize(source(wav_bytes(SECONDS, rate=22050), "mono.wav"), workdir, LIMITS)
    assert playback_audio(result.playback)[3] == 1
    with wave.open(str(result.speech)) as speech:
        assert speech.getnframes() == pytest.approx(SECONDS * 16000, rel=0.01)


def test_speech_keeps_the_signal(source: Callable[[bytes, str], Path], workdir: Path) -> None:
    """The 440 Hz tone is still the dominant frequency after resampling to 16 kHz mono."""
    result = normalize(source(wav_bytes(SECONDS, rate=44100, channels=2), "t.wav"), workdir, LIMITS)
    with wave.open(str(result.speech)) as speech:
        samples = np.frombuffer(speech.readframes(speech.getnframes()), dtype=np.int16)
    spectrum = np.abs(np.fft.rfft(samples))
    peak_hz = np.argmax(spectrum) * 16000 / len(samples)
    assert peak_hz == pytest.approx(440, abs=2)


def test_damaged_packets_midway_are_skipped(
    source: Callable[[bytes, str], Path], workdir: Path
) -> None:
    # 2 KB of noise in the middle of an AAC stream: a few packets fail to decode, the rest play.
    data = damaged_in_the_middle(encode_audio("ipod", "aac", 10.0, rate=44100))
    result = normalize(source(data, "damaged.m4a"), workdir, LIMITS)
    assert 9.0 < result.duration_s < 10.1
    assert playback_audio(result.playback)[4] == pytest.approx(result.duration_s, rel=0.02)


def test_a_format_change_midway_is_followed(
    source: Callable[[bytes, str], Path], workdir: Path
) -> None:
    # Two MP3s glued together, 44.1 then 22.05 kHz: the resampler is rebuilt at the join (and
    # the packet spanning the join, which does not decode, is skipped).
    data = encode_audio("mp3", "libmp3lame", 2.0, rate=44100)
    data += encode_audio("mp3", "libmp3lame", 2.0, rate=22050)
    result = normalize(source(data, "joined.mp3"), workdir, LIMITS)
    assert result.duration_s == pytest.approx(4.0, rel=0.02)
    with wave.open(str(result.speech)) as speech:
        assert speech.getnframes() == pytest.approx(result.duration_s * 16000, rel=0.01)
    assert playback_audio(result.playback)[4] == pytest.approx(result.duration_s, rel=0.02)


def test_a_reused_workdir_is_overwritten(
    source: Callable[[bytes, str], Path], workdir: Path
) -> None:
    normalize(source(wav_bytes(4.0), "long.wav"), workdir, LIMITS)
    result = normalize(source(wav_bytes(1.0), "short.wav"), workdir, LIMITS)
    with wave.open(str(result.speech)) as speech:
        assert speech.getnframes() == 16000


# ---- progress -----------------------------------------------------------------------------------


def test_progress_is_monotonic_throttled_and_ends_at_one(
    source: Callable[[bytes, str], Path], workdir: Path
) -> None:
    samples = (8000 * np.sin(2 * np.pi * 440 * np.arange(60 * 16000) / 16000)).astype(np.int16)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(samples.tobytes())
    calls: list[tuple[float, float]] = []

    normalize(
        source(buffer.getvalue(), "minute.wav"),
        workdir,
        LIMITS,
        on_progress=lambda fraction: calls.append((time.monotonic(), fraction)),
    )

    fractions = [fraction for _, fraction in calls]
    assert len(fractions) >= 2
    assert fractions[-1] == 1.0
    assert fractions.count(1.0) == 1
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions)
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(calls[:-1])]
    assert all(gap >= 0.09 for gap in gaps)


# ---- refused input ------------------------------------------------------------------------------


BAD_INPUT: dict[str, Callable[[], bytes]] = {
    "random bytes": lambda: random.Random(1).randbytes(50_000),
    "truncated header": lambda: wav_bytes(1.0)[:30],
    "header with no samples": lambda: riff_declaring(64_000),
    "text": lambda: b"These are meeting notes, not a recording.\n" * 500,
    "video without audio": lambda: encode_video(1.0, with_audio=False),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_unsupported_and_leaves_nothing(
    source: Callable[[bytes, str], Path], workdir: Path, case: str, decode: Decode
) -> None:
    upload = source(BAD_INPUT[case](), "upload.wav")
    with pytest.raises(UnsupportedMedia) as caught:
        decode(upload, workdir, LIMITS)
    assert caught.value.message
    reason = caught.value.detail["reason"]
    assert isinstance(reason, str)
    assert reason
    assert str(upload.parent) not in reason  # no server path in what a client may see
    assert_nothing_left(workdir)


def test_missing_source_is_the_callers_error(tmp_path: Path, workdir: Path, decode: Decode) -> None:
    with pytest.raises(FileNotFoundError):
        decode(tmp_path / "absent.wav", workdir, LIMITS)


# ---- limits -------------------------------------------------------------------------------------


def test_too_long_stops_early_and_leaves_nothing(
    ten_minutes: Path, workdir: Path, decode: Decode
) -> None:
    limits = DecodeLimits(timeout_s=60, memory_bytes=256 * MiB, max_duration_s=5)
    progress: list[float] = []
    with pytest.raises(MediaLimitExceeded) as caught:
        decode(ten_minutes, workdir, limits, on_progress=progress.append)
    assert "5 s" in caught.value.message
    assert caught.value.detail == {"limit": "max_duration_s", "max_duration_s": 5}
    # The child gave up after about 5 of the 600 seconds, it did not decode on to the end.
    assert all(fraction < 0.05 for fraction in progress)
    assert_nothing_left(workdir)


def test_timeout_kills_the_decoder(ten_minutes: Path, workdir: Path, decode: Decode) -> None:
    limits = DecodeLimits(timeout_s=0.05, memory_bytes=256 * MiB, max_duration_s=3600)
    with pytest.raises(MediaLimitExceeded, match=r"decoding took longer than 0\.05 s"):
        decode(ten_minutes, workdir, limits)
    assert_nothing_left(workdir)  # the autouse fixture checks that the child is gone


def test_timeout_midway_removes_partial_outputs(
    four_hours: Path, workdir: Path, decode: Decode
) -> None:
    # Decoding the four hours takes seconds; one second in, the outputs are partly written.
    limits = DecodeLimits(timeout_s=1.0, memory_bytes=256 * MiB, max_duration_s=5 * 3600)
    with pytest.raises(MediaLimitExceeded, match="longer than 1 s"):
        decode(four_hours, workdir, limits)
    assert_nothing_left(workdir)


def test_memory_limit_too_small_to_start_the_decoder(
    source: Callable[[bytes, str], Path], workdir: Path, decode: Decode
) -> None:
    # 64 MiB of address space cannot even map FFmpeg's libraries (~110 MiB with Python).
    limits = DecodeLimits(timeout_s=60, memory_bytes=64 * MiB, max_duration_s=3600)
    with pytest.raises(MediaLimitExceeded) as caught:
        decode(source(wav_bytes(1.0), "a.wav"), workdir, limits)
    assert "64 MiB" in caught.value.message
    assert caught.value.detail == {"limit": "memory_bytes", "memory_bytes": 64 * MiB}
    assert_nothing_left(workdir)


def test_memory_limit_is_set_on_the_decoding_process(
    ten_minutes: Path, workdir: Path, decode: Decode
) -> None:
    """While it decodes, the child's RLIMIT_AS (soft and hard) is the configured limit."""
    seen: list[tuple[int, int]] = []

    def on_progress(_: float) -> None:
        if not seen:
            (decoder,) = decoders()
            seen.append(decoder.rlimit(psutil.RLIMIT_AS))

    with pytest.raises(DecodeCancelled):
        decode(
            ten_minutes, workdir, LIMITS, on_progress=on_progress, should_stop=lambda: bool(seen)
        )
    assert seen == [(256 * MiB, 256 * MiB)]
    assert_nothing_left(workdir)


@pytest.mark.parametrize(
    ("signum", "error", "words"),
    [
        (signal.SIGKILL, MediaLimitExceeded, "memory"),  # what the kernel's OOM killer sends
        (signal.SIGSEGV, UnsupportedMedia, "decoder failed"),
    ],
)
def test_a_decoder_killed_by_a_signal(
    ten_minutes: Path,
    workdir: Path,
    signum: int,
    error: type[Exception],
    words: str,
    decode: Decode,
) -> None:
    def on_progress(_: float) -> None:
        for decoder in decoders():
            decoder.send_signal(signum)

    with pytest.raises(error, match=words) as caught:
        decode(ten_minutes, workdir, LIMITS, on_progress=on_progress)
    if isinstance(caught.value, UnsupportedMedia):
        assert caught.value.detail == {"reason": "killed by SIGSEGV"}
    assert_nothing_left(workdir)


# ---- cancel -------------------------------------------------------------------------------------


def test_should_stop_cancels_before_decoding(
    ten_minutes: Path, workdir: Path, decode: Decode
) -> None:
    with pytest.raises(DecodeCancelled):
        decode(ten_minutes, workdir, LIMITS, should_stop=lambda: True)
    assert_nothing_left(workdir)


def test_should_stop_cancels_midway(ten_minutes: Path, workdir: Path, decode: Decode) -> None:
    progress: list[float] = []
    with pytest.raises(DecodeCancelled):
        decode(
            ten_minutes,
            workdir,
            LIMITS,
            on_progress=progress.append,
            should_stop=lambda: bool(progress),
        )
    assert progress  # it was decoding, with outputs half written, when it was stopped
    assert_nothing_left(workdir)


# ---- priority -----------------------------------------------------------------------------------


def autogroup_nice(process: psutil.Process) -> int | None:
    """The nice value of the process's autogroup (Linux), or None where there is none."""
    try:
        text = Path(f"/proc/{process.pid}/autogroup").read_text()
    except OSError:
        return None
    return int(text.split("nice")[-1])


@pytest.mark.parametrize(
    ("decode_name", "niceness"),
    [("playback", PLAYBACK_NICENESS), ("speech", 0), ("both", 0)],
)
def test_only_the_playback_decoder_runs_at_a_lower_priority(
    ten_minutes: Path, workdir: Path, decode_name: str, niceness: int
) -> None:
    """The playback child's nice value, and its autogroup's where the kernel groups by session
    (else the nice value would not count against the worker's own session), while it decodes."""
    mine = psutil.Process()
    seen: list[tuple[int, int | None]] = []

    def on_progress(_: float) -> None:
        if not seen:
            (decoder,) = decoders()
            seen.append((decoder.nice(), autogroup_nice(decoder)))

    with pytest.raises(DecodeCancelled):
        ENTRY_POINTS[decode_name](
            ten_minutes, workdir, LIMITS, on_progress=on_progress, should_stop=lambda: bool(seen)
        )
    [(nice, group)] = seen
    assert nice == mine.nice() + niceness
    if group is not None:  # a new session's group starts at 0, the child raises its own
        assert group == (nice if niceness else 0)
    assert_nothing_left(workdir)

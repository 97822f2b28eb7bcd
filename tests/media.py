"""Test audio made on the fly: PCM WAV with the standard library, other formats with PyAV."""

from __future__ import annotations

import array
import io
import math
import os
import shutil
import struct
import subprocess
import wave
from fractions import Fraction
from pathlib import Path

import av
import pytest


def sine_samples(seconds: float, rate: int, channels: int = 1, freq: float = 440.0) -> bytes:
    count = int(seconds * rate)
    mono = [int(8000 * math.sin(2 * math.pi * freq * i / rate)) for i in range(count)]
    interleaved = [s for s in mono for _ in range(channels)]
    return array.array("h", interleaved).tobytes()


def wav_bytes(seconds: float = 1.0, rate: int = 16000, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(sine_samples(seconds, rate, channels))
    return buffer.getvalue()


def riff_declaring(size: int, payload: bytes = b"") -> bytes:
    """A WAV header whose RIFF and data chunks claim ``size`` bytes, followed by ``payload``."""
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", size)
        + b"WAVEfmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", size)
        + payload
    )


def encode_audio(container: str, codec: str, seconds: float = 1.0, rate: int = 44100) -> bytes:
    """Encode a sine tone with PyAV (e.g. ``("mp3", "libmp3lame")``, ``("ogg", "libopus")``)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        assert isinstance(stream, av.AudioStream)
        _write_tone(out, stream, seconds, rate)
    return buffer.getvalue()


def _write_tone(
    out: av.container.OutputContainer, stream: av.AudioStream, seconds: float, rate: int
) -> None:
    import numpy as np

    frame_size = stream.codec_context.frame_size or 1024
    total = int(seconds * rate)
    t = np.arange(total) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for start in range(0, total, frame_size):
        chunk = tone[start : start + frame_size]
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)


def encode_video(seconds: float = 1.0, with_audio: bool = True, container: str = "mp4") -> bytes:
    """A small video file (MPEG-4 part 2 video), with an AAC (or Opus for webm) audio track."""
    import numpy as np

    buffer = io.BytesIO()
    video_codec, audio_codec = ("libvpx", "libopus") if container == "webm" else ("mpeg4", "aac")
    with av.open(buffer, mode="w", format=container) as out:
        video = out.add_stream(video_codec, rate=10)
        assert isinstance(video, av.VideoStream)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream(audio_codec, rate=48000) if with_audio else None
        assert audio is None or isinstance(audio, av.AudioStream)
        for index in range(int(seconds * 10)):
            image = np.full((48, 64, 3), index * 20 % 255, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            frame.time_base = Fraction(1, 10)
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if audio is not None:
            _write_tone(out, audio, seconds, 48000)
    return buffer.getvalue()


def speak(text: str, path: Path, *, rate: int = 16000, words_per_minute: int = 150) -> Path:
    """Real (synthetic) speech: espeak-ng says ``text``, sox makes it ``rate`` Hz mono WAV."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            message = f"{tool} is needed to make test speech (make test installs it)"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    raw = path.with_suffix(".espeak.wav")
    subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", str(words_per_minute), "-w", str(raw), text],
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        # -D: no dither, so the same text always makes the same bytes (and the same transcript).
        ["sox", "-D", str(raw), "-r", str(rate), "-c", "1", "-b", "16", str(path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    raw.unlink()
    return path

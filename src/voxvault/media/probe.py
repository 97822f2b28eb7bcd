"""Probing uploaded media with PyAV: is it audio we can decode, and what is it?

Containers with video (mp4, webm, mkv, mov) are accepted; their best audio track is used. A file
counts as audio only when at least one audio frame actually decodes, so text, random bytes or a
header with no samples behind it are refused whatever their name or Content-Type says.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import av

from voxvault.errors import UnsupportedMedia

FRAMES_TO_DECODE = 8

# Container format (as PyAV names it) -> the MIME type stored when the client sent none.
_FORMAT_MIME = {
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "aac": "audio/aac",
    "matroska,webm": "video/webm",
    "mov,mp4,m4a,3gp,3g2,mj2": "audio/mp4",
    "aiff": "audio/aiff",
    "amr": "audio/amr",
    "caf": "audio/x-caf",
    "wv": "audio/x-wavpack",
}


@dataclass(frozen=True, slots=True)
class MediaInfo:
    container: str
    codec: str
    duration_s: float | None
    sample_rate: int | None
    channels: int | None
    has_video: bool

    @property
    def content_type(self) -> str:
        guessed = _FORMAT_MIME.get(self.container, "application/octet-stream")
        if self.has_video and guessed.startswith("audio/mp4"):
            return "video/mp4"
        return guessed


def probe(source: io.RawIOBase | str) -> MediaInfo:
    """Inspect ``source`` (a seekable file object or a path); runs blocking, call it in a thread."""
    try:
        with av.open(source, mode="r", metadata_errors="ignore") as container:
            return _inspect(container)
    except UnsupportedMedia:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError, EOFError) as exc:
        raise UnsupportedMedia(
            "the upload is not audio or video that can be decoded",
            detail={"reason": str(exc)[:300]},
        ) from None


def _inspect(container: Any) -> MediaInfo:
    audio = [s for s in container.streams if s.type == "audio"]
    if not audio:
        raise UnsupportedMedia("the file has no audio track")
    stream = audio[0]
    decoded = 0
    last_end = 0.0
    for frame in container.decode(stream):
        decoded += 1
        if frame.time is not None and frame.sample_rate:
            last_end = max(last_end, frame.time + frame.samples / frame.sample_rate)
        if decoded >= FRAMES_TO_DECODE:
            break
    if decoded == 0:
        raise UnsupportedMedia("no audio could be decoded from the file")
    duration = _duration(container, stream)
    codec = stream.codec_context.codec.canonical_name
    return MediaInfo(
        container=container.format.name,
        codec=codec,
        duration_s=round(duration if duration is not None else last_end, 3) or None,
        sample_rate=stream.codec_context.sample_rate or None,
        channels=stream.codec_context.channels or None,
        has_video=any(s.type == "video" for s in container.streams),
    )


def _duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration / av.time_base)
    return None

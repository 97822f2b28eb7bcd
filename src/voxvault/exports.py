"""Transcript exports: JSON, SRT, WebVTT (via pysubs2), plain text and Markdown."""

from __future__ import annotations

from enum import StrEnum

import pysubs2

from voxvault.models import Recording, Transcript


class ExportFormat(StrEnum):
    JSON = "json"
    SRT = "srt"
    VTT = "vtt"
    TXT = "txt"
    MD = "md"


MEDIA_TYPES = {
    ExportFormat.JSON: "application/json",
    ExportFormat.SRT: "application/x-subrip; charset=utf-8",
    ExportFormat.VTT: "text/vtt; charset=utf-8",
    ExportFormat.TXT: "text/plain; charset=utf-8",
    ExportFormat.MD: "text/markdown; charset=utf-8",
}


def _line(text: str, speaker: str | None) -> str:
    text = " ".join(text.split())
    return f"{speaker}: {text}" if speaker else text


def _subtitles(transcript: Transcript, fmt: str) -> str:
    subs = pysubs2.SSAFile()
    for segment in transcript.segments:
        subs.append(
            pysubs2.SSAEvent(
                start=round(segment.start * 1000),
                end=round(segment.end * 1000),
                text=_line(segment.text, segment.speaker),
            )
        )
    text: str = subs.to_string(fmt)
    return text


def _timestamp(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


def _markdown(transcript: Transcript, recording: Recording) -> str:
    title = recording.title or recording.filename or recording.id
    lines = [f"# {title}", ""]
    meta = [f"Transcript version {transcript.version}"]
    if transcript.language:
        meta.append(f"language: {transcript.language}")
    lines += ["_" + ", ".join(meta) + "_", ""]
    for segment in transcript.segments:
        who = f" **{segment.speaker}**" if segment.speaker else ""
        lines.append(f"**[{_timestamp(segment.start)}]**{who} {' '.join(segment.text.split())}")
        lines.append("")
    return "\n".join(lines)


def render(transcript: Transcript, recording: Recording, fmt: ExportFormat) -> str:
    if fmt is ExportFormat.JSON:
        return transcript.model_dump_json(exclude_none=True, indent=2)
    if fmt is ExportFormat.SRT:
        return _subtitles(transcript, "srt")
    if fmt is ExportFormat.VTT:
        return _subtitles(transcript, "vtt")
    if fmt is ExportFormat.TXT:
        return "\n".join(_line(s.text, s.speaker) for s in transcript.segments) + "\n"
    return _markdown(transcript, recording)

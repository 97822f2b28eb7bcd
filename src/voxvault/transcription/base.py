"""The Transcriber port: speech in, timed segments and words out.

Adapters block (they run on a worker thread, off the event loop) and report progress as the
fraction of the audio transcribed so far.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from voxvault.models import Segment

ProgressCallback = Callable[[float], None]


@dataclass(frozen=True, slots=True)
class TranscriptionResult:
    language: str | None
    duration_s: float
    segments: list[Segment]
    engine: str
    model: str
    timings: dict[str, float] = field(default_factory=dict)


class Transcriber(ABC):
    engine: str

    @abstractmethod
    def transcribe(
        self,
        audio: Path,
        *,
        language: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TranscriptionResult:
        """Transcribe the audio file; the language is detected unless given."""

"""Speech-to-text engines behind the Transcriber port."""

import os

from voxvault.settings import Settings
from voxvault.transcription.base import ProgressCallback, Transcriber, TranscriptionResult

__all__ = [
    "ProgressCallback",
    "Transcriber",
    "TranscriptionResult",
    "engine_threads",
    "open_transcriber",
]


def engine_threads(settings: Settings, *, beside_api: bool) -> int:
    """CPU threads for the engine: the setting when given, else all cores (0: the engine's
    own default), less one when the API serves from the same process, so that requests never
    wait for a core while a transcription runs (measured in ``bench/api_latency.py``)."""
    if settings.whisper_cpu_threads or not beside_api:
        return settings.whisper_cpu_threads
    return max(1, len(os.sched_getaffinity(0)) - 1)


def open_transcriber(
    settings: Settings, *, model: str | None = None, beside_api: bool = False
) -> Transcriber:
    """The transcriber the settings name (or ``model``); the model loads on first use."""
    from voxvault.transcription.whisper import FasterWhisperTranscriber

    return FasterWhisperTranscriber(
        model or settings.whisper_model,
        device=settings.whisper_device,
        compute_type=settings.whisper_compute_type,
        beam_size=settings.whisper_beam_size,
        cpu_threads=engine_threads(settings, beside_api=beside_api),
    )

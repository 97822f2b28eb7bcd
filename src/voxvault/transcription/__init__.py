"""Speech-to-text engines behind the Transcriber port."""

from voxvault.settings import Settings
from voxvault.transcription.base import ProgressCallback, Transcriber, TranscriptionResult

__all__ = ["ProgressCallback", "Transcriber", "TranscriptionResult", "open_transcriber"]


def open_transcriber(settings: Settings, *, model: str | None = None) -> Transcriber:
    """The transcriber the settings name (or ``model``); the model loads on first use."""
    from voxvault.transcription.whisper import FasterWhisperTranscriber

    return FasterWhisperTranscriber(
        model or settings.whisper_model,
        device=settings.whisper_device,
        compute_type=settings.whisper_compute_type,
        beam_size=settings.whisper_beam_size,
    )

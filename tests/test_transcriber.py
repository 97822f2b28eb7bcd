"""The faster-whisper adapter on real speech, with the bundled offline model."""

from __future__ import annotations

import os
import re
import time
import wave
from pathlib import Path

import pytest

from tests.media import speak, wav_bytes
from voxvault import Settings
from voxvault.errors import ConfigurationError
from voxvault.pipeline.worker import transcriber_beside_api
from voxvault.transcription import engine_threads, open_transcriber
from voxvault.transcription.whisper import FasterWhisperTranscriber, load_model, resolve_model

SENTENCE = "The quick brown fox jumps over the lazy dog. Storage should never lose a recording."


def normalized(text: str) -> str:
    return re.sub(r"[^a-z ]", "", text.lower())


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return speak(SENTENCE, tmp_path_factory.mktemp("speech") / "fox.wav")


def test_bundled_model_is_found_offline() -> None:
    location, on_disk = resolve_model("tiny.en")
    assert on_disk
    assert (Path(location) / "model.bin").is_file()


def test_transcribes_real_speech_with_word_timings(speech: Path) -> None:
    progress: list[float] = []
    result = open_transcriber(Settings()).transcribe(speech, on_progress=progress.append)
    text = normalized(" ".join(s.text for s in result.segments))
    assert "quick brown fox" in text
    assert "lazy dog" in text
    assert "recording" in text
    assert result.language == "en"
    assert (result.engine, result.model) == ("faster-whisper", "tiny.en")
    assert result.duration_s == pytest.approx(5.4, abs=2.0)
    words = [w for s in result.segments for w in (s.words or [])]
    assert len(words) >= 12
    starts = [w.start for w in words]
    assert starts == sorted(starts)
    assert all(0 <= w.start <= w.end <= result.duration_s + 0.5 for w in words)
    assert all(w.probability is not None and 0 <= w.probability <= 1 for w in words)
    assert progress
    assert progress == sorted(progress)
    assert progress[-1] == 1.0


def test_language_can_be_given(speech: Path) -> None:
    result = FasterWhisperTranscriber(beam_size=1).transcribe(speech, language="en")
    assert result.language == "en"
    assert "lazy dog" in normalized(" ".join(s.text for s in result.segments))


def test_silence_and_a_tone_give_no_segments(tmp_path: Path) -> None:
    silence = tmp_path / "silence.wav"
    with wave.open(str(silence), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(bytes(2 * 16000 * 3))
    tone = tmp_path / "tone.wav"
    tone.write_bytes(wav_bytes(seconds=3.0))
    transcriber = FasterWhisperTranscriber(beam_size=1)
    for audio in (silence, tone):
        result = transcriber.transcribe(audio)
        assert result.segments == [], audio.name
        assert result.duration_s == pytest.approx(3.0, abs=0.01)


def test_the_model_is_loaded_once_per_process() -> None:
    first = load_model("tiny.en", "auto", "auto")
    assert load_model("tiny.en", "auto", "auto") is first


def test_a_local_model_directory_is_used(tmp_path: Path) -> None:
    bundled, _ = resolve_model("tiny.en")
    assert resolve_model(bundled) == (bundled, True)
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(ConfigurationError, match=r"no model\.bin"):
        resolve_model(str(empty))
    with pytest.raises(ConfigurationError, match="does not exist"):
        resolve_model(str(tmp_path / "missing" / "model.dir"))


def test_a_missing_model_is_a_clear_error_not_a_hang(speech: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match=r"no-such-voxvault-model"):
        FasterWhisperTranscriber("no-such-voxvault-model").transcribe(speech)
    assert time.monotonic() - started < 120


def test_the_engine_beside_the_api_leaves_it_a_core() -> None:
    cores = len(os.sched_getaffinity(0))
    unset = Settings()
    assert engine_threads(unset, beside_api=False) == 0  # the engine's own default: every core
    assert engine_threads(unset, beside_api=True) == max(1, cores - 1)
    assert engine_threads(Settings(whisper_cpu_threads=3), beside_api=True) == 3
    assert engine_threads(Settings(whisper_cpu_threads=3), beside_api=False) == 3
    beside = transcriber_beside_api(unset, None)
    assert isinstance(beside, FasterWhisperTranscriber)
    assert beside.cpu_threads == max(1, cores - 1)


def test_a_model_with_fewer_threads_is_its_own_and_still_transcribes(speech: Path) -> None:
    one_thread = load_model("tiny.en", "auto", "auto", 1)
    assert one_thread is not load_model("tiny.en", "auto", "auto")
    result = FasterWhisperTranscriber(cpu_threads=1).transcribe(speech)
    assert "quick brown fox" in normalized(" ".join(s.text for s in result.segments))

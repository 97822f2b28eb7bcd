"""The library surface: what ``import voxvault`` offers, and using it as the README shows."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import voxvault
from tests.media import wav_bytes
from voxvault import NotFound, RecordingStatus, Settings, Vault
from voxvault.vault import FILE_CHUNK_BYTES

# Changing the public API is a deliberate act: update this set in the same change.
EXPECTED_PUBLIC_NAMES = {
    "Artifact",
    "BackendUnavailable",
    "Conflict",
    "Download",
    "ExportFormat",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "PlaybackLink",
    "Recording",
    "RecordingPage",
    "RecordingPatch",
    "RecordingQuery",
    "RecordingStatus",
    "Segment",
    "Settings",
    "StorageInfo",
    "Transcript",
    "TranscriptInput",
    "TranscriptVersion",
    "UnsupportedMedia",
    "ValidationFailed",
    "Vault",
    "VoxVaultError",
    "Word",
    "__version__",
}


def test_all_is_sorted_and_without_duplicates() -> None:
    assert voxvault.__all__ == sorted(voxvault.__all__)
    assert len(voxvault.__all__) == len(set(voxvault.__all__))


def test_all_is_exactly_the_expected_public_api() -> None:
    assert set(voxvault.__all__) == EXPECTED_PUBLIC_NAMES


def test_every_public_name_is_importable() -> None:
    module = importlib.import_module("voxvault")
    for name in voxvault.__all__:
        assert hasattr(module, name), name
    namespace: dict[str, object] = {}
    exec("from voxvault import *", namespace)  # the star import users write
    assert set(namespace) - {"__builtins__"} == EXPECTED_PUBLIC_NAMES


def test_version_is_the_package_version() -> None:
    from importlib.metadata import version

    assert voxvault.__version__ == version("voxvault")


def test_errors_share_one_root() -> None:
    for name in (
        "BackendUnavailable",
        "Conflict",
        "InvalidRequest",
        "NotFound",
        "PayloadTooLarge",
        "UnsupportedMedia",
        "ValidationFailed",
    ):
        error = getattr(voxvault, name)
        assert issubclass(error, voxvault.VoxVaultError), name


@pytest.mark.anyio
async def test_library_usage_as_in_the_readme(tmp_path: Path) -> None:
    audio = wav_bytes(seconds=4.0)
    path = tmp_path / "meeting.wav"
    path.write_bytes(audio)

    async with await Vault.open(Settings(data_dir=tmp_path / "vault")) as vault:
        recording = await vault.add_file(
            path, title="Weekly sync", tags=["team", "weekly"], transcribe=False
        )
        assert recording.status is RecordingStatus.STORED
        assert recording.title == "Weekly sync"
        assert recording.tags == ["team", "weekly"]
        assert recording.filename == "meeting.wav"
        assert recording.size_bytes == len(audio)
        assert recording.duration_s == pytest.approx(4.0, abs=0.05)

        transcript = await vault.put_transcript(
            recording.id,
            {
                "language": "en",
                "segments": [
                    {"start": 1.5, "end": 3.2, "text": "Hello everyone.", "speaker": "Ana"},
                    {"start": 3.2, "end": 3.9, "text": "Hi."},
                ],
            },
        )
        assert transcript.version == 1
        assert transcript.language == "en"
        assert (await vault.get_recording(recording.id)).status is RecordingStatus.READY
        names = [artifact.name for artifact in await vault.list_artifacts(recording.id)]
        assert names == [f"transcript.{ext}" for ext in ("json", "md", "srt", "txt", "vtt")]

        text, media_type, filename = await vault.export_transcript(recording.id, "srt")
        assert media_type == "application/x-subrip; charset=utf-8"
        assert filename == "meeting.srt"
        blocks = text.strip().split("\n\n")
        assert blocks[0].splitlines() == [
            "1",
            "00:00:01,500 --> 00:00:03,200",
            "Ana: Hello everyone.",
        ]
        assert blocks[1].splitlines() == ["2", "00:00:03,200 --> 00:00:03,900", "Hi."]

        page = await vault.list_recordings()
        assert [item.id for item in page.items] == [recording.id]
        assert page.next_cursor is None
        assert page.items[0] == await vault.get_recording(recording.id)

        await vault.delete_recording(recording.id)
        with pytest.raises(NotFound):
            await vault.get_recording(recording.id)
        assert (await vault.list_recordings()).items == []
        with pytest.raises(NotFound):
            await vault.export_transcript(recording.id, "srt")


@pytest.mark.anyio
async def test_add_file_reports_progress_in_bytes(tmp_path: Path) -> None:
    audio = wav_bytes(seconds=40.0)  # a bit over 1 MiB: more than one chunk
    assert len(audio) > FILE_CHUNK_BYTES
    path = tmp_path / "long.wav"
    path.write_bytes(audio)
    seen: list[int] = []

    async with await Vault.open(Settings(data_dir=tmp_path / "vault")) as vault:
        recording = await vault.add_file(path, on_progress=seen.append)

    assert recording.size_bytes == len(audio)
    assert sum(seen) == len(audio)
    assert seen == [FILE_CHUNK_BYTES, len(audio) - FILE_CHUNK_BYTES]

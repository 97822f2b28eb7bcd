"""The ``voxvault`` command on a data directory, with and without a server running on it."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from typer.testing import CliRunner, Result

from tests.conftest import LiveServer, stored_files
from tests.media import wav_bytes
from voxvault import Settings, Vault
from voxvault.cli import app

TRANSCRIPT = {
    "language": "en",
    "segments": [
        {"start": 1.5, "end": 3.2, "text": "Hello everyone.", "speaker": "Ana"},
        {"start": 3.2, "end": 4.0, "text": "Shall we start?"},
    ],
}


def cli(data_dir: Path, *args: str) -> Result:
    return CliRunner().invoke(app, ["--data-dir", str(data_dir), *args])


def ok(data_dir: Path, *args: str) -> Result:
    result = cli(data_dir, *args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def audio() -> bytes:
    return wav_bytes(seconds=2.0)


@pytest.fixture
def audio_file(tmp_path: Path, audio: bytes) -> Path:
    path = tmp_path / "standup.wav"
    path.write_bytes(audio)
    return path


def ingest(data_dir: Path, path: Path, *options: str) -> dict[str, Any]:
    result = ok(data_dir, "ingest", str(path), "--json", "--no-transcribe", *options)
    stored = json.loads(result.stdout)
    assert isinstance(stored, list)
    assert len(stored) == 1
    recording: dict[str, Any] = stored[0]
    return recording


def ls_json(data_dir: Path, *options: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(ok(data_dir, "ls", "--json", *options).stdout)
    return found


def with_vault(data_dir: Path, action: Any) -> Any:
    async def go() -> Any:
        async with await Vault.open(Settings(data_dir=data_dir)) as vault:
            return await action(vault)

    return anyio.run(go)


def put_transcript(data_dir: Path, recording_id: str) -> None:
    async def action(vault: Vault) -> None:
        await vault.put_transcript(recording_id, TRANSCRIPT)

    with_vault(data_dir, action)


def test_ingest_json_prints_the_stored_recording(
    data_dir: Path, audio_file: Path, audio: bytes
) -> None:
    recording = ingest(data_dir, audio_file, "--title", "Stand-up", "--tag", "a", "--tag", "b")
    assert recording["status"] == "stored"
    assert recording["title"] == "Stand-up"
    assert recording["tags"] == ["a", "b"]
    assert recording["filename"] == "standup.wav"
    assert recording["size_bytes"] == len(audio)
    assert recording["sha256"] == hashlib.sha256(audio).hexdigest()
    assert recording["duration_s"] == pytest.approx(2.0, abs=0.05)
    assert recording["sample_rate"] == 16000
    assert recording["channels"] == 1
    # The bytes are in the blob store, exactly.
    files = stored_files(data_dir)
    assert [f.read_bytes() for f in files] == [audio]
    assert recording["id"] in files[0].as_posix()


def test_ingest_without_json_prints_a_line_per_file(data_dir: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "one.wav", tmp_path / "two.wav"
    first.write_bytes(wav_bytes(seconds=1.0))
    second.write_bytes(wav_bytes(seconds=0.5))
    result = ok(data_dir, "ingest", str(first), str(second), "--no-transcribe")
    listed = ls_json(data_dir)
    assert sorted(r["filename"] for r in listed) == ["one.wav", "two.wav"]
    out = one_line(result.stdout)
    for recording in listed:
        assert f"stored {recording['id']} {recording['filename']}" in out


def test_title_with_several_files_is_refused(data_dir: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "one.wav", tmp_path / "two.wav"
    first.write_bytes(wav_bytes(seconds=0.5))
    second.write_bytes(wav_bytes(seconds=0.5))
    result = cli(data_dir, "ingest", str(first), str(second), "--title", "T")
    assert result.exit_code == 2
    assert "--title applies to a single file" in one_line(result.stderr)
    assert stored_files(data_dir) == []


def test_ingest_of_a_missing_file_is_a_usage_error(data_dir: Path, tmp_path: Path) -> None:
    result = cli(data_dir, "ingest", str(tmp_path / "absent.wav"))
    assert result.exit_code == 2
    assert "does not exist" in one_line(result.stderr)
    assert stored_files(data_dir) == []


def test_ingest_of_non_audio_fails_cleanly(data_dir: Path, tmp_path: Path) -> None:
    junk = tmp_path / "notes.wav"
    junk.write_bytes(b"this is plain text pretending to be audio\n" * 100)
    result = cli(data_dir, "ingest", str(junk), "--json")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "error: the upload is not audio or video that can be decoded" in one_line(result.stderr)
    assert "Traceback" not in result.stderr
    assert ls_json(data_dir) == []
    assert stored_files(data_dir) == []


def test_ls_lists_and_filters_by_tag(data_dir: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "one.wav", tmp_path / "two.wav"
    first.write_bytes(wav_bytes(seconds=1.0))
    second.write_bytes(wav_bytes(seconds=0.5))
    tagged = ingest(data_dir, first, "--tag", "a")
    other = ingest(data_dir, second, "--tag", "b")

    everything = ls_json(data_dir)
    assert [r["id"] for r in everything] == [other["id"], tagged["id"]]  # newest first
    assert everything[1] == tagged

    assert [r["id"] for r in ls_json(data_dir, "--tag", "a")] == [tagged["id"]]
    assert [r["id"] for r in ls_json(data_dir, "--tag", "b")] == [other["id"]]
    assert ls_json(data_dir, "--tag", "nope") == []
    assert [r["id"] for r in ls_json(data_dir, "--limit", "1")] == [other["id"]]
    assert len(ls_json(data_dir, "--status", "stored")) == 2
    assert ls_json(data_dir, "--status", "failed") == []

    table = ok(data_dir, "ls").stdout
    assert tagged["id"] in table
    assert other["id"] in table


def test_show_includes_transcript_versions_and_artifacts(
    data_dir: Path, audio_file: Path, audio: bytes
) -> None:
    recording = ingest(data_dir, audio_file)
    shown = json.loads(ok(data_dir, "show", recording["id"]).stdout)
    assert shown["transcript_versions"] == []
    assert shown["artifacts"] == []
    assert {k: v for k, v in shown.items() if k not in ("transcript_versions", "artifacts")} == (
        recording
    )

    put_transcript(data_dir, recording["id"])
    put_transcript(data_dir, recording["id"])

    async def add_notes(vault: Vault) -> None:
        async def body() -> Any:
            yield b"notes"

        await vault.put_artifact(recording["id"], "notes.txt", body(), content_type="text/plain")

    with_vault(data_dir, add_notes)

    shown = json.loads(ok(data_dir, "show", recording["id"]).stdout)
    versions = shown["transcript_versions"]
    assert [(v["version"], v["language"], v["segment_count"]) for v in versions] == [
        (1, "en", 2),
        (2, "en", 2),
    ]
    artifacts = {a["name"]: a for a in shown["artifacts"]}
    assert sorted(artifacts) == [
        "notes.txt", "transcript.json", "transcript.md", "transcript.srt", "transcript.txt",
        "transcript.vtt",
    ]  # fmt: skip
    notes = artifacts["notes.txt"]
    assert (notes["content_type"], notes["size_bytes"]) == ("text/plain", 5)
    assert notes["sha256"] == hashlib.sha256(b"notes").hexdigest()


def test_export_writes_srt_and_vtt(data_dir: Path, audio_file: Path, tmp_path: Path) -> None:
    recording = ingest(data_dir, audio_file)
    put_transcript(data_dir, recording["id"])

    out = tmp_path / "out.srt"
    result = ok(data_dir, "export", recording["id"], "--format", "srt", "-o", str(out))
    assert result.stdout == ""
    assert "wrote" in result.stderr
    srt = out.read_text(encoding="utf-8")
    assert srt.strip().split("\n\n") == [
        "1\n00:00:01,500 --> 00:00:03,200\nAna: Hello everyone.",
        "2\n00:00:03,200 --> 00:00:04,000\nShall we start?",
    ]

    vtt = ok(data_dir, "export", recording["id"], "--format", "vtt").stdout
    assert vtt.startswith("WEBVTT")
    assert "00:00:01.500 --> 00:00:03.200" in vtt
    assert "Ana: Hello everyone." in vtt

    text = ok(data_dir, "export", recording["id"], "-f", "txt").stdout
    assert text == "Ana: Hello everyone.\nShall we start?\n"


def test_export_without_a_transcript_fails(
    data_dir: Path, audio_file: Path, tmp_path: Path
) -> None:
    recording = ingest(data_dir, audio_file)
    out = tmp_path / "never.srt"
    result = cli(data_dir, "export", recording["id"], "--format", "srt", "-o", str(out))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert one_line(result.stderr) == f"error: recording '{recording['id']}' has no transcript"
    assert not out.exists()


def test_export_with_an_unknown_format_is_a_usage_error(data_dir: Path, audio_file: Path) -> None:
    recording = ingest(data_dir, audio_file)
    put_transcript(data_dir, recording["id"])
    result = cli(data_dir, "export", recording["id"], "--format", "docx")
    assert result.exit_code == 2
    assert result.stdout == ""


def test_rm_deletes_the_recording_and_its_bytes(data_dir: Path, audio_file: Path) -> None:
    recording = ingest(data_dir, audio_file)
    put_transcript(data_dir, recording["id"])
    assert len(stored_files(data_dir)) == 6  # the original and five transcript files

    result = ok(data_dir, "rm", recording["id"])
    assert one_line(result.stdout) == f"deleted {recording['id']}"
    assert stored_files(data_dir) == []
    assert ls_json(data_dir) == []

    shown = cli(data_dir, "show", recording["id"])
    assert shown.exit_code == 1
    assert f"error: no recording '{recording['id']}'" in one_line(shown.stderr)

    again = cli(data_dir, "rm", recording["id"])
    assert again.exit_code == 1
    assert "no recording" in one_line(again.stderr)


def test_storage_info_json(data_dir: Path, audio_file: Path, audio: bytes) -> None:
    empty = json.loads(ok(data_dir, "storage-info", "--json").stdout)
    assert empty["database"]["backend"] == "sqlite"
    assert empty["blobs"]["backend"] == "local"
    assert empty["blobs"]["location"] == str((data_dir / "blobs").resolve())
    assert empty["blobs"]["free_bytes"] > 0
    assert empty["usage"] == {
        "recordings": 0,
        "recording_bytes": 0,
        "transcripts": 0,
        "artifacts": 0,
        "artifact_bytes": 0,
    }

    recording = ingest(data_dir, audio_file)
    put_transcript(data_dir, recording["id"])
    info = json.loads(ok(data_dir, "storage-info", "--json").stdout)
    transcript_files = [f for f in stored_files(data_dir) if "/artifacts/" in f.as_posix()]
    assert info["usage"] == {
        "recordings": 1,
        "recording_bytes": len(audio),
        "transcripts": 1,
        "artifacts": 5,
        "artifact_bytes": sum(f.stat().st_size for f in transcript_files),
    }

    table = ok(data_dir, "storage-info").stdout
    assert re.search(r"database\s*│\s*sqlite", table)
    assert re.search(rf"recording bytes\s*│\s*{len(audio):,}\s*│", table)
    assert re.search(r"transcripts\s*│\s*1\s*│", table)


def test_migrate_is_idempotent(data_dir: Path, audio_file: Path) -> None:
    for _ in range(2):
        result = ok(data_dir, "migrate")
        assert result.stdout.strip() == "database schema is up to date"
    assert (data_dir / "voxvault.db").is_file()
    recording = ingest(data_dir, audio_file)
    ok(data_dir, "migrate")
    assert [r["id"] for r in ls_json(data_dir)] == [recording["id"]]


@pytest.mark.parametrize("command", ["show", "rm"])
@pytest.mark.parametrize("recording_id", ["0" * 32, "not-an-id"])
def test_unknown_id_exits_1(data_dir: Path, command: str, recording_id: str) -> None:
    result = cli(data_dir, command, recording_id)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"error: no recording '{recording_id}'" in one_line(result.stderr)


def test_unknown_id_export_exits_1(data_dir: Path) -> None:
    result = cli(data_dir, "export", "f" * 32, "--format", "srt")
    assert result.exit_code == 1
    assert f"error: no recording '{'f' * 32}'" in one_line(result.stderr)


def test_data_dir_comes_from_the_environment(
    data_dir: Path, audio_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOXVAULT_DATA_DIR", str(data_dir))
    result = CliRunner().invoke(app, ["ingest", str(audio_file), "--json", "--no-transcribe"])
    assert result.exit_code == 0, result.stderr
    recording = json.loads(result.stdout)[0]
    assert [r["id"] for r in ls_json(data_dir)] == [recording["id"]]


def test_ingest_output_shows_a_bracketed_filename_verbatim(data_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "meeting [draft].wav"
    path.write_bytes(wav_bytes(seconds=1.0))
    result = ok(data_dir, "ingest", str(path), "--no-transcribe")
    [recording] = ls_json(data_dir)
    assert recording["filename"] == "meeting [draft].wav"
    assert one_line(result.stdout) == f"stored {recording['id']} meeting [draft].wav 1.0 s"


def test_ls_table_survives_titles_that_look_like_markup(data_dir: Path, audio_file: Path) -> None:
    recording = ingest(data_dir, audio_file, "--title", "Plan [/draft]")
    assert recording["title"] == "Plan [/draft]"
    result = cli(data_dir, "ls")
    assert result.exit_code == 0, result.exception
    assert recording["id"] in result.stdout


def test_error_messages_are_printed_verbatim(data_dir: Path) -> None:
    result = cli(data_dir, "show", "[/x]")
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert one_line(result.stderr).startswith("error: no recording '[/x]'")


# ---- with a server running on the same data directory ------------------------------------------


def test_cli_ingest_is_served_by_a_running_server(
    live_server: LiveServer, data_dir: Path, audio_file: Path, audio: bytes
) -> None:
    recording = ingest(data_dir, audio_file, "--tag", "cli")

    listed = httpx.get(f"{live_server.url}/v1/recordings", timeout=10)
    assert listed.status_code == 200
    items = listed.json()["items"]
    assert [item["id"] for item in items] == [recording["id"]]
    assert items[0] == recording

    served = httpx.get(f"{live_server.url}/v1/recordings/{recording['id']}/audio", timeout=10)
    assert served.status_code == 200
    assert served.content == audio

    ok(data_dir, "rm", recording["id"])
    gone = httpx.get(f"{live_server.url}/v1/recordings/{recording['id']}", timeout=10)
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "not_found"


def test_http_upload_to_a_running_server_is_seen_by_the_cli(
    live_server: LiveServer, data_dir: Path, audio: bytes
) -> None:
    created = httpx.post(
        f"{live_server.url}/v1/recordings?filename=phone.wav&tag=http&transcribe=false",
        content=audio,
        headers={"Content-Type": "audio/wav"},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    recording = created.json()

    listed = ls_json(data_dir)
    assert listed == [recording]
    assert [r["id"] for r in ls_json(data_dir, "--tag", "http")] == [recording["id"]]

    put = httpx.put(
        f"{live_server.url}/v1/recordings/{recording['id']}/transcript",
        json=TRANSCRIPT,
        timeout=10,
    )
    assert put.status_code == 201, put.text
    vtt = ok(data_dir, "export", recording["id"], "--format", "vtt").stdout
    assert vtt.startswith("WEBVTT")
    assert "Shall we start?" in vtt

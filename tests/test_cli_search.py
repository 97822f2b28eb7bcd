"""``voxvault search`` and ``voxvault reindex`` on a data directory."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from tests.conftest import LiveServer
from tests.media import wav_bytes
from tests.test_cli import cli, ingest, ok, one_line, with_vault
from voxvault import Vault
from voxvault.metadata.sql import SqlMetadataStore
from voxvault.metadata.tables import search_documents, search_segments

TRANSCRIPT = {
    "language": "en",
    "segments": [
        {"start": 1.5, "end": 3.2, "text": "Hello everyone.", "speaker": "Ana"},
        {"start": 3723.0, "end": 3725.5, "text": "The budget <is> final", "speaker": "Bob"},
    ],
}


def stored(data_dir: Path, tmp_path: Path, title: str, transcript: dict[str, Any]) -> str:
    path = tmp_path / "call.wav"
    path.write_bytes(wav_bytes(seconds=0.5))
    recording_id: str = ingest(data_dir, path, "--title", title)["id"]

    async def action(vault: Vault) -> None:
        await vault.put_transcript(recording_id, transcript)

    with_vault(data_dir, action)
    return recording_id


def test_search_prints_time_code_title_and_snippet(data_dir: Path, tmp_path: Path) -> None:
    recording_id = stored(data_dir, tmp_path, "Board call", TRANSCRIPT)
    out = ok(data_dir, "search", "budget").stdout
    assert "1:02:03" in out
    assert "Board call" in out
    assert recording_id in out
    assert "Bob: The budget <is> final" in one_line(out)  # the snippet unescaped for a terminal
    assert "1 hit(s)" in out
    assert "0:01" not in out
    everyone = one_line(ok(data_dir, "search", "EVERYONE", "--speaker", "Ana").stdout)
    assert "0:01 Board call" in everyone
    assert "0 hit(s)" in ok(data_dir, "search", "budget", "--speaker", "Ana").stdout


def test_search_json(data_dir: Path, tmp_path: Path) -> None:
    first = stored(data_dir, tmp_path, "Board call", TRANSCRIPT)
    second = stored(
        data_dir,
        tmp_path,
        "Other",
        {"language": "fr", "segments": [{"start": 7, "end": 8, "text": "le budget"}]},
    )
    page = json.loads(ok(data_dir, "search", "budget", "--json").stdout)
    assert sorted(hit["recording_id"] for hit in page["items"]) == sorted([first, second])
    assert page["next_cursor"] is None
    [hit] = json.loads(ok(data_dir, "search", "budget", "--json", "--language", "fr").stdout)[
        "items"
    ]
    assert (hit["recording_id"], hit["start"], hit["recording_title"]) == (second, 7.0, "Other")
    assert hit["playback_url"].endswith("#t=7,8")
    assert "<mark>budget</mark>" in hit["snippet"]
    limited = ok(data_dir, "search", "budget", "--json", "--limit", "1", "--recording", first)
    [only] = json.loads(limited.stdout)["items"]
    assert (only["recording_id"], only["start"]) == (first, 3723.0)
    assert json.loads(ok(data_dir, "search", "nowhere", "--json").stdout)["items"] == []


def test_search_refuses_a_query_with_nothing_to_look_for(data_dir: Path) -> None:
    result = cli(data_dir, "search", "--", "-draft")
    assert result.exit_code != 0
    assert "no word to look for" in one_line(result.stderr)


def test_reindex_rebuilds_a_lost_index(data_dir: Path, tmp_path: Path) -> None:
    recording_id = stored(data_dir, tmp_path, "Board call", TRANSCRIPT)

    async def lose_index(vault: Vault) -> None:
        assert isinstance(vault.metadata, SqlMetadataStore)
        async with vault.metadata.engine.begin() as conn:
            await conn.execute(sa.delete(search_segments))
            await conn.execute(sa.delete(search_documents))

    with_vault(data_dir, lose_index)
    assert json.loads(ok(data_dir, "search", "budget", "--json").stdout)["items"] == []
    assert "indexed 1 recording(s)" in ok(data_dir, "reindex").stdout
    [hit] = json.loads(ok(data_dir, "search", "budget", "--json").stdout)["items"]
    assert (hit["recording_id"], hit["start"]) == (recording_id, 3723.0)
    assert "indexed 1 recording(s)" in ok(data_dir, "reindex").stdout  # again: same result
    assert len(json.loads(ok(data_dir, "search", "budget", "--json").stdout)["items"]) == 1


def test_a_server_indexes_what_was_stored_before_the_index(data_dir: Path, tmp_path: Path) -> None:
    """A library from before the search index (here: its rows deleted) is indexed by the
    server in the background, while it already answers."""
    recording_id = stored(data_dir, tmp_path, "Board call", TRANSCRIPT)

    async def forget_index(vault: Vault) -> None:
        assert isinstance(vault.metadata, SqlMetadataStore)
        async with vault.metadata.engine.begin() as conn:
            await conn.execute(sa.delete(search_segments))
            await conn.execute(sa.delete(search_documents))

    with_vault(data_dir, forget_index)
    assert "0 hit(s)" in ok(data_dir, "search", "budget").stdout
    server = LiveServer(data_dir, args=["--workers", "0"])
    try:
        deadline = time.monotonic() + 30
        while True:
            answer = httpx.get(f"{server.url}/v1/search", params={"q": "budget"}, timeout=30)
            assert answer.status_code == 200, answer.text  # answers while it indexes
            page = answer.json()
            if page["items"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        server.stop()
    assert [(hit["recording_id"], hit["start"]) for hit in page["items"]] == [
        (recording_id, 3723.0)
    ]

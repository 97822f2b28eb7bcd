"""Transcripts: versions, submission from elsewhere, validation, and the five exports.

Every test runs on the embedded stack and on the scale-out one (``tests/stacks.py``).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.media import wav_bytes
from tests.stacks import client, stack

pytestmark = pytest.mark.anyio
__all__ = ["client", "stack"]  # the fixtures that run each test on both stacks

TRANSCRIPT: dict[str, Any] = {
    "language": "en",
    "segments": [
        {
            "start": 1.5,
            "end": 3.2,
            "speaker": "Alice",
            "text": "Welcome to the pitch.",
            "words": [
                {"start": 1.5, "end": 2.0, "word": "Welcome", "probability": 0.98},
                {"start": 2.0, "end": 2.2, "word": "to", "probability": 0.99},
                {"start": 2.2, "end": 2.5, "word": "the", "probability": 0.97},
                {"start": 2.5, "end": 3.2, "word": "pitch.", "probability": 0.9},
            ],
        },
        {"start": 3725.25, "end": 3727.0, "speaker": "Bob", "text": "Thank  you,\nall."},
    ],
}


@pytest.fixture
async def recording_id(client: httpx.AsyncClient) -> str:
    response = await client.post(
        "/v1/recordings",
        params={"filename": "pitch.wav", "transcribe": "false"},
        content=wav_bytes(0.5),
    )
    assert response.status_code == 201
    recording_id: str = response.json()["id"]
    return recording_id


async def test_put_stores_versions_and_get_returns_the_current_one(
    client: httpx.AsyncClient, recording_id: str
) -> None:
    url = f"/v1/recordings/{recording_id}/transcript"
    assert (await client.get(url)).status_code == 404
    first = await client.put(url, json=TRANSCRIPT)
    assert first.status_code == 201, first.text
    assert first.json()["version"] == 1
    revised = {**TRANSCRIPT, "segments": TRANSCRIPT["segments"][:1]}
    second = await client.put(url, json=revised)
    assert second.json()["version"] == 2

    current = (await client.get(url)).json()
    assert current["version"] == 2
    assert current["recording_id"] == recording_id
    assert current["language"] == "en"
    assert len(current["segments"]) == 1
    assert current["segments"][0]["words"][0] == TRANSCRIPT["segments"][0]["words"][0]
    old = (await client.get(url, params={"version": 1})).json()
    assert [s["text"] for s in old["segments"]] == ["Welcome to the pitch.", "Thank  you,\nall."]
    assert (await client.get(url, params={"version": 3})).status_code == 404

    versions = (await client.get(f"{url}/versions")).json()["items"]
    assert [(v["version"], v["segment_count"]) for v in versions] == [(1, 2), (2, 1)]


async def test_srt_export(client: httpx.AsyncClient, recording_id: str) -> None:
    await client.put(f"/v1/recordings/{recording_id}/transcript", json=TRANSCRIPT)
    response = await client.get(f"/v1/recordings/{recording_id}/transcript.srt")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-subrip")
    assert response.text == (
        "1\n00:00:01,500 --> 00:00:03,200\nAlice: Welcome to the pitch.\n\n"
        "2\n01:02:05,250 --> 01:02:07,000\nBob: Thank you, all.\n\n"
    )
    assert 'filename="pitch.srt"' in response.headers["content-disposition"]


async def test_vtt_export_has_the_header_and_dotted_times(
    client: httpx.AsyncClient, recording_id: str
) -> None:
    await client.put(f"/v1/recordings/{recording_id}/transcript", json=TRANSCRIPT)
    response = await client.get(f"/v1/recordings/{recording_id}/transcript.vtt")
    assert response.headers["content-type"].startswith("text/vtt")
    text = response.text
    assert text.startswith("WEBVTT\n")
    assert "00:00:01.500 --> 00:00:03.200\nAlice: Welcome to the pitch." in text
    assert "01:02:05.250 --> 01:02:07.000\nBob: Thank you, all." in text


async def test_txt_md_and_json_exports(client: httpx.AsyncClient, recording_id: str) -> None:
    await client.patch(f"/v1/recordings/{recording_id}", json={"title": "Demo day"})
    await client.put(f"/v1/recordings/{recording_id}/transcript", json=TRANSCRIPT)
    base = f"/v1/recordings/{recording_id}/transcript"
    txt = await client.get(f"{base}.txt")
    assert txt.text == "Alice: Welcome to the pitch.\nBob: Thank you, all.\n"
    md = (await client.get(f"{base}.md")).text
    assert md.startswith("# Demo day\n")
    assert "**[00:00:01]** **Alice** Welcome to the pitch." in md
    assert "**[01:02:05]** **Bob** Thank you, all." in md
    exported = (await client.get(f"{base}.json")).json()
    assert exported["version"] == 1
    assert exported["segments"][0]["words"] == TRANSCRIPT["segments"][0]["words"]
    download = await client.get(f"{base}.txt", params={"download": "true"})
    assert download.headers["content-disposition"].startswith("attachment;")


async def test_exports_follow_the_current_version_or_a_chosen_one(
    client: httpx.AsyncClient, recording_id: str
) -> None:
    url = f"/v1/recordings/{recording_id}/transcript"
    await client.put(url, json=TRANSCRIPT)
    await client.put(url, json={"segments": [{"start": 0, "end": 1, "text": "replaced"}]})
    assert (await client.get(f"{url}.txt")).text == "replaced\n"
    assert "Alice" in (await client.get(f"{url}.txt", params={"version": 1})).text


async def test_export_errors(client: httpx.AsyncClient, recording_id: str) -> None:
    base = f"/v1/recordings/{recording_id}/transcript"
    missing = await client.get(f"{base}.srt")
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == f"recording '{recording_id}' has no transcript"
    await client.put(base, json=TRANSCRIPT)
    unknown = await client.get(f"{base}.docx")
    assert unknown.status_code == 422


@pytest.mark.parametrize(
    ("segments", "where"),
    [
        ([{"start": -0.1, "end": 1, "text": "x"}], "negative start"),
        ([{"start": 2, "end": 1, "text": "x"}], "reversed"),
        ([{"start": 5, "end": 6, "text": "b"}, {"start": 1, "end": 2, "text": "a"}], "unsorted"),
        ([{"start": 0, "end": 1, "text": "x" * 10_001}], "text too long"),
        ([{"start": 0, "end": 1, "text": "x", "extra": 1}], "unknown field"),
        ([{"start": 0, "end": 1}], "no text"),
        (
            [{"start": 0, "end": 2, "text": "x", "words": [{"start": 1, "end": 0.5, "word": "x"}]}],
            "reversed word",
        ),
        (
            [
                {
                    "start": 0,
                    "end": 2,
                    "text": "a b",
                    "words": [
                        {"start": 1, "end": 1.5, "word": "b"},
                        {"start": 0, "end": 0.5, "word": "a"},
                    ],
                }
            ],
            "unsorted words",
        ),
        (
            [
                {
                    "start": 0,
                    "end": 1,
                    "text": "x",
                    "words": [{"start": 0, "end": 1, "word": "x", "probability": 2}],
                }
            ],
            "probability over 1",
        ),
    ],
)
async def test_invalid_transcripts_are_422_and_store_nothing(
    client: httpx.AsyncClient, recording_id: str, segments: list[dict[str, Any]], where: str
) -> None:
    url = f"/v1/recordings/{recording_id}/transcript"
    response = await client.put(url, json={"language": "en", "segments": segments})
    assert response.status_code == 422, where
    assert response.json()["error"]["code"] == "validation_failed"
    assert (await client.get(f"{url}/versions")).json()["items"] == []


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_non_finite_times_are_refused(
    client: httpx.AsyncClient, recording_id: str, raw: str
) -> None:
    body = '{"segments": [{"start": 0, "end": %s, "text": "x"}]}' % raw  # noqa: UP031
    response = await client.put(
        f"/v1/recordings/{recording_id}/transcript",
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code in (400, 422), response.text
    assert response.json()["error"]["code"] in ("malformed_json", "validation_failed")
    assert (await client.get(f"/v1/recordings/{recording_id}/transcript")).status_code == 404


async def test_invalid_language_is_422(client: httpx.AsyncClient, recording_id: str) -> None:
    body = {"language": "english; DROP TABLE", "segments": []}
    response = await client.put(f"/v1/recordings/{recording_id}/transcript", json=body)
    assert response.status_code == 422


async def test_empty_transcript_is_a_valid_version(
    client: httpx.AsyncClient, recording_id: str
) -> None:
    url = f"/v1/recordings/{recording_id}/transcript"
    assert (await client.put(url, json={"segments": []})).status_code == 201
    assert (await client.get(f"{url}.srt")).text == ""
    assert (await client.get(url)).json()["segments"] == []


async def test_unicode_text_survives_every_export(
    client: httpx.AsyncClient, recording_id: str
) -> None:
    text = "مرحبا — 你好 🎙️ «ça va»"
    url = f"/v1/recordings/{recording_id}/transcript"
    await client.put(url, json={"segments": [{"start": 0, "end": 1, "text": text}]})
    for fmt in ("srt", "vtt", "txt", "md"):
        assert text in (await client.get(f"{url}.{fmt}")).text, fmt
    assert json.loads((await client.get(f"{url}.json")).text)["segments"][0]["text"] == text

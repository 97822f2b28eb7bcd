"""GET /v1/search: hits with snippets and playback links, filters, pages, grouping, and hostile
queries that are text, never syntax.

Every test runs on the embedded stack (SQLite FTS5) and on the scale-out one (PostgreSQL).
"""

from __future__ import annotations

import html
import re
from typing import Any

import httpx
import pytest

from tests.media import wav_bytes
from tests.stacks import client, stack
from voxvault.models import SearchRequest

pytestmark = pytest.mark.anyio
__all__ = ["client", "stack"]  # the fixtures that run each test on both stacks

AUDIO = wav_bytes(0.5)


async def recording(
    client: httpx.AsyncClient,
    *segments: dict[str, Any],
    title: str | None = None,
    tags: str | None = None,
    language: str = "en",
) -> dict[str, Any]:
    params = {"filename": "talk.wav", "transcribe": "false"}
    if title is not None:
        params["title"] = title
    if tags is not None:
        params["tag"] = tags
    created = await client.post("/v1/recordings", params=params, content=AUDIO)
    assert created.status_code == 201, created.text
    made: dict[str, Any] = created.json()
    if segments:
        await put(client, made["id"], *segments, language=language)
    return made


async def put(
    client: httpx.AsyncClient, recording_id: str, *segments: dict[str, Any], language: str = "en"
) -> None:
    response = await client.put(
        f"/v1/recordings/{recording_id}/transcript",
        json={"language": language, "segments": list(segments)},
    )
    assert response.status_code == 201, response.text


def seg(start: float, text: str, speaker: str | None = None) -> dict[str, Any]:
    return {"start": start, "end": start + 1.25, "text": text, "speaker": speaker}


async def search(client: httpx.AsyncClient, q: str, **params: Any) -> dict[str, Any]:
    response = await client.get("/v1/search", params={"q": q, **params})
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


async def hits(client: httpx.AsyncClient, q: str, **params: Any) -> list[tuple[str, float]]:
    page = await search(client, q, limit=100, **params)
    return [(hit["recording_id"], hit["start"]) for hit in page["items"]]


def assert_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["code"], str)
    assert error["code"]
    assert isinstance(error["message"], str)
    assert error["message"]


async def test_a_hit_names_its_recording_and_second_and_plays_from_there(
    client: httpx.AsyncClient,
) -> None:
    made = await recording(
        client,
        seg(1.5, "Welcome, everyone."),
        {
            "start": 3725.25,
            "end": 3727.0,
            "speaker": "Bob",
            "text": "The <b>budget</b> & forecast for Q3",
        },
        title="Board call",
    )
    page = await search(client, "budget")
    assert page["next_cursor"] is None
    assert page["truncated"] is False
    [hit] = page["items"]
    assert set(hit) == {
        "recording_id",
        "recording_title",
        "start",
        "end",
        "speaker",
        "text",
        "snippet",
        "playback_url",
    }
    assert (hit["recording_id"], hit["recording_title"]) == (made["id"], "Board call")
    assert (hit["start"], hit["end"], hit["speaker"]) == (3725.25, 3727.0, "Bob")
    assert hit["text"] == "The <b>budget</b> & forecast for Q3"
    assert "<mark>budget</mark>" in hit["snippet"]
    assert "&amp;" in hit["snippet"]
    # No markup but <mark>: the text is escaped (PostgreSQL's headline leaves tags out).
    unmarked = hit["snippet"].replace("<mark>", "").replace("</mark>", "")
    assert "<" not in unmarked
    assert ">" not in unmarked
    shown = re.sub("</?b>", " ", html.unescape(unmarked))
    assert " ".join(shown.split()) == "The budget & forecast for Q3"
    url, fragment = hit["playback_url"].split("#")
    assert fragment == "t=3725.25,3727"
    played = await client.get(url, headers={"Range": "bytes=0-99"})
    assert played.status_code in (200, 206), played.text
    assert played.content == AUDIO[: len(played.content)]
    assert len(played.content) in (100, len(AUDIO))
    whole = await client.get(url)
    assert whole.status_code == 200
    assert whole.content == AUDIO


async def test_hits_follow_new_versions_and_deletion(client: httpx.AsyncClient) -> None:
    made = await recording(client, seg(0, "the alpha plan"))
    kept = await recording(client, seg(2, "alpha and omega"))
    assert sorted(await hits(client, "alpha")) == sorted([(made["id"], 0.0), (kept["id"], 2.0)])
    await put(client, made["id"], seg(4, "the beta plan"))
    assert await hits(client, "alpha") == [(kept["id"], 2.0)]
    assert await hits(client, "beta") == [(made["id"], 4.0)]
    assert (await client.delete(f"/v1/recordings/{made['id']}")).status_code == 204
    assert await hits(client, "beta") == []
    assert await hits(client, "plan") == []
    assert await hits(client, "alpha") == [(kept["id"], 2.0)]


async def test_query_language_and_filters(client: httpx.AsyncClient) -> None:
    first = await recording(
        client,
        seg(0, "our weekly meeting", "Ana"),
        seg(2, "review the budget draft", "Bob"),
        tags="team",
    )
    second = await recording(
        client,
        seg(1, "two Meetings about the budget review", "Ana"),
        tags="board",
        language="en-US",
    )
    third = await recording(client, seg(5, "la réunion du budget"), language="fr")

    assert sorted(await hits(client, "meetings")) == sorted(
        [(first["id"], 0.0), (second["id"], 1.0)]
    )
    assert await hits(client, '"budget review"') == [(second["id"], 1.0)]
    assert sorted(await hits(client, "budget -draft")) == sorted(
        [(second["id"], 1.0), (third["id"], 5.0)]
    )
    assert sorted(await hits(client, "weekly OR réunion")) == sorted(
        [(first["id"], 0.0), (third["id"], 5.0)]
    )
    assert sorted(await hits(client, "BUDG*")) == sorted(
        [(first["id"], 2.0), (second["id"], 1.0), (third["id"], 5.0)]
    )
    assert await hits(client, "budget", tag="team") == [(first["id"], 2.0)]
    assert await hits(client, "budget", speaker="Bob") == [(first["id"], 2.0)]
    assert sorted(await hits(client, "budget", language="en")) == sorted(
        [(first["id"], 2.0), (second["id"], 1.0)]
    )
    assert await hits(client, "budget", language="fr") == [(third["id"], 5.0)]
    assert await hits(client, "budget", recording_id=second["id"]) == [(second["id"], 1.0)]
    assert sorted(await hits(client, "budget", created_after=first["created_at"])) == sorted(
        [(second["id"], 1.0), (third["id"], 5.0)]
    )
    assert await hits(client, "budget", created_before=second["created_at"]) == [(first["id"], 2.0)]
    for bad in ({"language": "english!"}, {"recording_id": "../x"}, {"created_after": "soon"}):
        assert_error(await client.get("/v1/search", params={"q": "budget", **bad}), 422)


async def test_pages_cover_every_hit_once_and_cursors_belong_to_their_query(
    client: httpx.AsyncClient,
) -> None:
    made = await recording(client, *[seg(i * 2, f"topic number {i}") for i in range(23)])
    seen: list[float] = []
    params: dict[str, Any] = {"q": "topic", "limit": 10}
    pages = 0
    while True:
        response = await client.get("/v1/search", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        pages += 1
        assert pages <= 3, f"the pages never end: {seen}"
        seen += [hit["start"] for hit in page["items"] if hit["recording_id"] == made["id"]]
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
        cursor = page["next_cursor"]
    assert pages == 3
    assert sorted(seen) == [i * 2.0 for i in range(23)]
    for other in ({"q": "number"}, {"q": "topic", "speaker": "Ana"}):
        assert_error(
            await client.get("/v1/search", params={**other, "limit": 10, "cursor": cursor}), 400
        )
    # The limit may change between pages.
    assert (
        await client.get("/v1/search", params={"q": "topic", "cursor": cursor})
    ).status_code == 200
    for garbage in ("garbage", "!!", "WzEsMl0", "eyJhIjogMX0", "Wy0xLCAieCJd", "x" * 512):
        assert_error(await client.get("/v1/search", params={"q": "topic", "cursor": garbage}), 400)


async def test_better_matches_first_and_ties_newer_first(client: httpx.AsyncClient) -> None:
    older = await recording(client, seg(0, "a budget"))
    newer = await recording(client, seg(0, "a budget"))
    strong = await recording(client, seg(3, "budget, budget, budget: the budget"))
    assert await hits(client, "budget") == [
        (strong["id"], 3.0),
        (newer["id"], 0.0),
        (older["id"], 0.0),
    ]


async def test_grouped_by_recording(client: httpx.AsyncClient) -> None:
    busy = await recording(
        client,
        seg(0, "budget"),
        seg(2, "budget budget budget"),
        seg(4, "budget again"),
        title="busy",
    )
    quiet = await recording(client, seg(7, "the budget"), title="quiet")
    page = await search(client, "budget", group="recording", per_group=2)
    assert [(g["recording_id"], g["recording_title"]) for g in page["items"]] == [
        (busy["id"], "busy"),
        (quiet["id"], "quiet"),
    ]
    assert page["items"][0]["hits"][0]["start"] == 2.0
    assert len(page["items"][0]["hits"]) == 2
    assert [h["start"] for h in page["items"][1]["hits"]] == [7.0]
    first = await search(client, "budget", group="recording", per_group=1, limit=1)
    assert [g["recording_id"] for g in first["items"]] == [busy["id"]]
    assert first["next_cursor"] is not None
    rest = await search(
        client, "budget", group="recording", per_group=1, limit=1, cursor=first["next_cursor"]
    )
    assert [g["recording_id"] for g in rest["items"]] == [quiet["id"]]
    assert rest["next_cursor"] is None
    assert_error(await client.get("/v1/search", params={"q": "x", "group": "speaker"}), 422)


HOSTILE = [
    '"unbalanced quote',
    'budget "',
    '"',
    "NEAR(budget review, 2)",
    "NEAR(",
    "*",
    "budget*:*",
    "text:budget",
    "^budget",
    "budget AND review",
    "NOT budget",
    "budget OR",
    "-budget",
    "'; DROP TABLE recordings; --",
    "budget'); DELETE FROM search_segments; --",
    "budget' OR '1'='1",
    "!budget & 'x' | (a <-> b):*",
    "x" * 5_000,
    "budget " * 40,
    "🙂 budget 🎉",
    "שלום עולם",
    "مرحبا بالعالم",
    "budget\x00review",
    "\x00",
    "\x01\x02\x03\x1b[31m",
    "%",
    "budget%",
    "\\",
    "budget\\",
    "_%_",
    "\u202ebudget\u202c",
    "\ufeff\ufffd",
]


async def test_hostile_queries_are_text_and_change_nothing(client: httpx.AsyncClient) -> None:
    made = await recording(
        client,
        seg(0, "the budget review"),
        seg(2, "שלום עולם, said the visitor"),
        seg(4, "NOT a DROP TABLE, just a table"),
    )
    before = await hits(client, "budget")
    assert before == [(made["id"], 0.0)]
    answered: dict[str, int] = {}
    for q in HOSTILE:
        for extra in ({}, {"group": "recording"}):
            response = await client.get("/v1/search", params={"q": q, **extra})
            answered[q] = response.status_code
            if response.status_code == 200:
                page = response.json()
                assert isinstance(page["items"], list)
            else:
                assert_error(response, 400)
    assert answered["x" * 5_000] == 400  # too long, said so
    assert answered["*"] == 400  # nothing to look for
    assert answered["'; DROP TABLE recordings; --"] == 200  # words: drop, table, recordings
    assert answered["NEAR(budget review, 2)"] == 200
    assert (await hits(client, "שלום")) == [(made["id"], 2.0)]
    assert (await hits(client, "DROP TABLE")) == [(made["id"], 4.0)]
    assert (await hits(client, '"budget')) == [(made["id"], 0.0)]
    # Nothing changed: the recording is listed, its transcript and hits are the same.
    listing = (await client.get("/v1/recordings")).json()["items"]
    assert made["id"] in [r["id"] for r in listing]
    assert await hits(client, "budget") == before
    # A parameter the search does not know is ignored (a cache buster, say), as elsewhere.
    assert await hits(client, "budget", _="1700000000") == before
    transcript = (await client.get(f"/v1/recordings/{made['id']}/transcript")).json()
    assert transcript["version"] == 1
    assert len(transcript["segments"]) == 3


async def test_invalid_requests(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/search"), 422)
    too_few = await client.get("/v1/search", params={"q": "x", "limit": 0, "per_group": "many"})
    assert_error(too_few, 422)
    # Each invalid parameter named where it was given, without echoing what was sent.
    problems = too_few.json()["error"]["detail"]
    assert sorted(p["loc"] for p in problems) == [["query", "limit"], ["query", "per_group"]]
    assert all("many" not in str(p) for p in problems)
    assert_error(await client.get("/v1/search", params={"q": "x", "limit": 101}), 422)
    assert_error(await client.get("/v1/search", params={"q": "x", "created_after": "soon"}), 422)
    assert_error(await client.get("/v1/search", params={"q": ""}), 400)
    assert_error(await client.get("/v1/search", params={"q": "-only -excluded"}), 400)


async def test_the_parameters_are_documented(client: httpx.AsyncClient) -> None:
    operation = (await client.get("/openapi.json")).json()["paths"]["/v1/search"]["get"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert set(parameters) == set(SearchRequest.model_fields)
    assert all(p["in"] == "query" for p in parameters.values())
    assert [name for name, p in parameters.items() if p["required"]] == ["q"]
    assert "exact phrases" in parameters["q"]["description"]
    assert parameters["limit"]["schema"]["maximum"] == 100
    assert "422" in operation["responses"]

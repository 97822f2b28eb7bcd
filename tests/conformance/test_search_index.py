"""Conformance suite for the SearchIndex port, through the MetadataStore that writes it in the
same transactions as transcripts and purges: SQLite FTS5 and PostgreSQL tsvector alike.

The store fixture is the metadata suite's: a new adapter passes by adding a param there.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conformance.test_metadata_store import (
    BASE_TIME,
    OTHER_WS,
    WS,
    add_workspace,
    make_recording,
    store,
)
from voxvault import Settings, Vault
from voxvault.metadata import MetadataStore
from voxvault.metadata.sql import SqlMetadataStore
from voxvault.metadata.tables import search_documents, search_segments
from voxvault.models import Recording, RecordingStatus, Segment, TranscriptInput
from voxvault.search.base import HIGHLIGHT_END, HIGHLIGHT_START, IndexHit, SearchFilters
from voxvault.search.query import parse_query

pytestmark = pytest.mark.anyio
__all__ = ["store"]  # the fixture that runs each test on every engine

Spoken = str | tuple[float, str] | tuple[float, str, str | None]


def spoken(*lines: Spoken, language: str | None = "en") -> TranscriptInput:
    """A transcript: plain texts one second apart, or (start, text[, speaker])."""
    segments = []
    for n, line in enumerate(lines):
        if isinstance(line, str):
            start, text, speaker = float(n), line, None
        else:
            start, text = line[0], line[1]
            speaker = line[2] if len(line) == 3 else None
        segments.append(Segment(start=start, end=start + 0.75, text=text, speaker=speaker))
    return TranscriptInput(language=language, segments=segments)


async def recorded(
    store: MetadataStore,
    *lines: Spoken,
    minutes: int = 0,
    tags: list[str] | None = None,
    language: str | None = "en",
    workspace: str = WS,
) -> Recording:
    recording = make_recording(minutes, tags)
    await store.insert_recording(workspace, recording)
    await store.add_transcript(workspace, recording.id, spoken(*lines, language=language))
    return recording


async def search(
    store: MetadataStore,
    q: str,
    *,
    workspace: str = WS,
    offset: int = 0,
    limit: int = 100,
    per_group: int | None = None,
    **filters: Any,
) -> list[IndexHit]:
    page = await store.search(
        workspace,
        parse_query(q),
        SearchFilters(**filters),
        offset=offset,
        limit=limit,
        per_group=per_group,
    )
    return page.hits


async def found(store: MetadataStore, q: str, **filters: Any) -> list[tuple[str, float]]:
    """(recording id, start) of each hit, best first."""
    return [(hit.recording_id, hit.start) for hit in await search(store, q, **filters)]


async def index_rows(store: MetadataStore, recording_id: str) -> tuple[int, int]:
    """How many segment rows and document rows the index holds for the recording."""
    assert isinstance(store, SqlMetadataStore)
    async with store.engine.connect() as conn:
        segments = (
            await conn.execute(
                sa.select(sa.func.count())
                .select_from(search_segments)
                .where(search_segments.c.recording_id == recording_id)
            )
        ).scalar_one()
        documents = (
            await conn.execute(
                sa.select(sa.func.count())
                .select_from(search_documents)
                .where(search_documents.c.recording_id == recording_id)
            )
        ).scalar_one()
    return segments, documents


async def drop_index_of(store: MetadataStore, recording_id: str | None = None) -> None:
    """Lose index rows behind the store's back (a restored backup, an index started empty)."""
    assert isinstance(store, SqlMetadataStore)
    async with store.engine.begin() as conn:
        for table in (search_segments, search_documents):
            statement = table.delete()
            if recording_id is not None:
                statement = statement.where(table.c.recording_id == recording_id)
            await conn.execute(statement)


# ---- the index follows every write --------------------------------------------------------------


async def test_only_the_current_version_is_indexed(store: MetadataStore) -> None:
    recording = await recorded(store, "the budget review starts now", "nothing else")
    assert await found(store, "budget") == [(recording.id, 0.0)]
    await store.add_transcript(
        WS, recording.id, spoken("nothing here", (7.0, "the forecast replaces it"))
    )
    assert await found(store, "budget") == []
    assert await found(store, "forecast") == [(recording.id, 7.0)]
    assert await found(store, "nothing") == [(recording.id, 0.0)]  # one version, not two
    assert await index_rows(store, recording.id) == (2, 1)
    assert await store.unindexed_recordings(10) == []


async def test_an_empty_version_leaves_no_hits(store: MetadataStore) -> None:
    recording = await recorded(store, "budget talk")
    await store.add_transcript(WS, recording.id, spoken())
    assert await found(store, "budget") == []
    await store.add_transcript(WS, recording.id, spoken("   ", "budget again"))
    assert await found(store, "budget") == [(recording.id, 1.0)]  # blank segments not indexed
    assert await index_rows(store, recording.id) == (1, 1)


async def test_a_tombstone_hides_hits_at_once_and_the_purge_removes_them(
    store: MetadataStore,
) -> None:
    kept = await recorded(store, "quarterly budget")
    gone = await recorded(store, "budget for the party", minutes=1)
    assert {r for r, _ in await found(store, "budget")} == {kept.id, gone.id}
    await store.update_recording(WS, gone.id, status=RecordingStatus.DELETING)
    assert await found(store, "budget") == [(kept.id, 0.0)]
    assert await found(store, "party") == []
    assert await index_rows(store, gone.id) == (1, 1)  # rows stay until the purge...
    assert await store.purge_recording(WS, gone.id) is True
    assert await index_rows(store, gone.id) == (0, 0)  # ...which takes them in its transaction
    assert await found(store, "budget") == [(kept.id, 0.0)]
    assert await store.reindex_recording(gone.id) is False
    assert await found(store, "party") == []


async def test_workspaces_are_isolated(store: MetadataStore) -> None:
    await add_workspace(store, OTHER_WS)
    mine = await recorded(store, "secret roadmap")
    theirs = await recorded(store, "secret merger", workspace=OTHER_WS)
    assert await found(store, "secret") == [(mine.id, 0.0)]
    assert [h.recording_id for h in await search(store, "secret", workspace=OTHER_WS)] == [
        theirs.id
    ]
    assert await found(store, "merger") == []
    assert await search(store, "secret", workspace="nowhere") == []
    # Another workspace's recording id as a filter finds nothing either.
    assert await found(store, "secret", recording_id=theirs.id) == []


async def test_reindex_restores_lost_rows_and_unindexed_lists_what_is_behind(
    store: MetadataStore,
) -> None:
    first = await recorded(store, "alpha version", minutes=1)
    second = await recorded(store, "beta version", minutes=2)
    untouched = make_recording(3)  # no transcript: never unindexed, never reindexed
    await store.insert_recording(WS, untouched)
    await drop_index_of(store, first.id)
    assert await found(store, "alpha") == []
    assert await store.unindexed_recordings(10) == [first.id]
    assert await store.reindex_recording(first.id) is True
    assert await found(store, "alpha") == [(first.id, 0.0)]
    assert await store.unindexed_recordings(10) == []

    # An index of an older version counts as behind too.
    assert isinstance(store, SqlMetadataStore)
    async with store.engine.begin() as conn:
        await conn.execute(
            search_documents.update()
            .where(search_documents.c.recording_id == second.id)
            .values(version=0)
        )
    assert await store.unindexed_recordings(10) == [second.id]
    assert await store.reindex_recording(second.id) is True
    assert await store.unindexed_recordings(10) == []
    assert await found(store, "version") == [(second.id, 0.0), (first.id, 0.0)]

    # Reindexing a recording without a transcript empties its entries; an unknown one is False.
    assert await store.reindex_recording(untouched.id) is True
    assert await index_rows(store, untouched.id) == (0, 0)
    assert await store.reindex_recording("f" * 32) is False
    assert sorted(await store.transcribed_recordings(None, 10)) == sorted([first.id, second.id])


async def test_vault_catch_up_and_reindex_rebuild_the_index(
    store: MetadataStore, tmp_path: Path
) -> None:
    assert isinstance(store, SqlMetadataStore)
    made = [await recorded(store, f"planted word{n} here", minutes=n) for n in range(3)]
    await drop_index_of(store)
    assert await found(store, "planted") == []
    settings = Settings(data_dir=tmp_path / "vault", database_url=store.url)
    async with await Vault.open(settings) as vault:
        # Searched through the vault's own store: another process's store may take a few
        # seconds to notice a text search configuration new to the index (PostgreSQL).
        indexed = vault.metadata
        assert await found(indexed, "planted") == []  # opening does not catch up...
        assert await vault.catch_up_index(batch=2) == 3  # ...the sweeper and recover() do
        assert sorted(r for r, _ in await found(indexed, "planted")) == sorted(r.id for r in made)
        assert await vault.catch_up_index() == 0
        await drop_index_of(store, made[1].id)
        assert await found(indexed, "word1") == []
        assert await vault.reindex(batch=2) == 3
        assert await found(indexed, "word1") == [(made[1].id, 0.0)]
        assert len(await found(indexed, "planted")) == 3
        assert await index_rows(store, made[0].id) == (1, 1)  # replaced, not doubled


# ---- the query language on each engine ----------------------------------------------------------


async def test_the_query_language(store: MetadataStore) -> None:
    r = await recorded(
        store,
        "the budget review is on Monday",  # 0
        "review the budget again",  # 1
        "a forecast without numbers",  # 2
        "budget draft for review",  # 3
        "Budgetary CONCERNS were raised",  # 4
        "our weekly meeting",  # 5
        "two meetings a week",  # 6
        "yes or no",  # 7
    )

    async def starts(q: str) -> list[float]:
        return sorted(start for _, start in await found(store, q))

    assert await starts("budget review") == [0.0, 1.0, 3.0]  # every word, any order
    assert await starts('"budget review"') == [0.0]  # adjacent, in this order
    assert await starts('"review budget"') == []
    assert await starts("forecast OR draft") == [2.0, 3.0]
    assert await starts("review forecast OR draft") == [3.0]  # OR binds tighter than AND
    assert await starts("budget -draft") == [0.0, 1.0]
    assert await starts('budget -"draft for"') == [0.0, 1.0]
    assert await starts("budg*") == [0.0, 1.0, 3.0, 4.0]
    assert await starts("BUDGET Review") == [0.0, 1.0, 3.0]  # case-insensitive
    assert await starts("concerns") == [4.0]
    assert await starts("meetings") == [5.0, 6.0]  # English stems: meetings finds meeting
    assert await starts("meeting") == [5.0, 6.0]
    assert await starts('"budget review') == [0.0]  # an unclosed quote runs to the end
    assert await starts("yes OR") == [7.0]  # a dangling OR is the word "or"
    assert await starts("yes OR no") == [7.0]
    assert await starts("budget: review^ * (") == [0.0, 1.0, 3.0]  # operators are no syntax
    assert await starts("NEAR(budget review)") == []  # NEAR is a word here, said nowhere
    assert await starts("budget:review") == [0.0]  # words joined by punctuation follow each other
    assert await starts("budget -drafts") == [0.0, 1.0]  # an excluded word is stemmed too
    assert await starts("week -meetings") == []
    assert await starts("nowhere") == []
    assert {rid for rid, _ in await found(store, "budget")} == {r.id}


async def test_both_engines_read_words_alike(store: MetadataStore) -> None:
    """Accents fold and no word is a stop word, in English and in a language without a
    stemmer (French has one; Welsh, here, does not)."""
    await recorded(store, "the Café in Zürich", "a meeting at the café", language="en")
    await recorded(store, "Réunion à Genève", "la réunion est finie", language="fr", minutes=1)
    await recorded(store, "cyfarfod yn Llanelli", "Ysgol Gymraeg Bro Dinefwr", language="cy")

    async def texts(q: str) -> set[str]:
        return {hit.text for hit in await search(store, q)}

    assert await texts("cafe") == {"the Café in Zürich", "a meeting at the café"}
    assert await texts("CAFÉ zurich") == {"the Café in Zürich"}
    assert await texts('"at the cafe"') == {"a meeting at the café"}  # "at the" are words
    assert await texts("the") == {"the Café in Zürich", "a meeting at the café"}
    assert await texts("reunion geneve") == {"Réunion à Genève"}
    assert await texts("la") == {"la réunion est finie"}
    assert await texts("llanelli") == {"cyfarfod yn Llanelli"}
    assert await texts("gymraeg -dinefwr") == set()


async def test_snippets_mark_the_matched_words(store: MetadataStore) -> None:
    await recorded(store, "we talked about the budget and the forecast at length today")
    [hit] = await search(store, "budget")
    assert f"{HIGHLIGHT_START}budget{HIGHLIGHT_END}" in hit.snippet
    assert hit.text == "we talked about the budget and the forecast at length today"
    [hit] = await search(store, "forecast budget")
    assert f"{HIGHLIGHT_START}forecast{HIGHLIGHT_END}" in hit.snippet
    # Marker characters in stored text cannot forge a highlight.
    await recorded(store, f"plain {HIGHLIGHT_START}fake{HIGHLIGHT_END} words", minutes=1)
    [hit] = await search(store, "plain")
    assert hit.snippet.count(HIGHLIGHT_START) == 1
    assert f"{HIGHLIGHT_START}plain{HIGHLIGHT_END}" in hit.snippet


async def test_snippets_keep_text_that_looks_like_markup(store: MetadataStore) -> None:
    # Transcripts carry tags of their own (WebVTT voice spans, sound labels); PostgreSQL's
    # headline parser would take them for HTML and leave them out of the snippet.
    after = " is <laughter> fine, <v Anna>yes</v> & a<b or c>d"
    await recorded(store, "the budget" + after)
    [hit] = await search(store, "budget")
    assert f"budget{HIGHLIGHT_END}{after}" in hit.snippet
    assert f"{HIGHLIGHT_START}budget{HIGHLIGHT_END}" in hit.snippet


# ---- filters, paging, ranking, grouping ---------------------------------------------------------


async def test_filters(store: MetadataStore) -> None:
    early = await recorded(
        store, (1.0, "launch plan", "Ana"), (2.0, "launch date", "Bob"), minutes=1, tags=["a"]
    )
    middle = await recorded(store, (3.0, "launch party", "Ana"), minutes=5, language="en-US")
    late = await recorded(
        store, (4.0, "launch lancement", "Zoé"), minutes=9, tags=["a", "b"], language="fr"
    )
    untagged = await recorded(store, (5.0, "launch silence"), minutes=11, language=None)

    async def which(**filters: Any) -> list[tuple[str, float]]:
        return sorted(await found(store, "launch", **filters))

    assert await which(tag="a") == sorted([(early.id, 1.0), (early.id, 2.0), (late.id, 4.0)])
    assert await which(tag="b") == [(late.id, 4.0)]
    assert await which(tag="c") == []
    assert await which(speaker="Ana") == sorted([(early.id, 1.0), (middle.id, 3.0)])
    assert await which(speaker="Zoé") == [(late.id, 4.0)]
    assert await which(language="en") == sorted(
        [(early.id, 1.0), (early.id, 2.0), (middle.id, 3.0)]
    )
    assert await which(language="en-GB") == await which(language="en")
    assert await which(language="fr") == [(late.id, 4.0)]
    assert await which(language="de") == []
    assert await which(recording_id=middle.id) == [(middle.id, 3.0)]
    assert await which(recording_id=untagged.id) == [(untagged.id, 5.0)]
    after = BASE_TIME + timedelta(minutes=5)
    assert await which(created_after=after) == sorted([(late.id, 4.0), (untagged.id, 5.0)])
    assert await which(created_before=after) == sorted([(early.id, 1.0), (early.id, 2.0)])
    assert await which(
        created_after=BASE_TIME + timedelta(minutes=2),
        created_before=BASE_TIME + timedelta(minutes=10),
    ) == sorted([(middle.id, 3.0), (late.id, 4.0)])
    assert await which(tag="a", speaker="Bob") == [(early.id, 2.0)]


async def test_pages_do_not_overlap_and_cover_every_hit(store: MetadataStore) -> None:
    for n in range(7):
        await recorded(store, *[f"topic item {n} {i}" for i in range(5)], minutes=n)
    everything = await found(store, "topic")
    assert len(everything) == 35
    paged: list[tuple[str, float]] = []
    for offset in range(0, 40, 8):
        hits = await search(store, "topic", offset=offset, limit=8)
        paged += [(h.recording_id, h.start) for h in hits]
    assert paged == everything
    assert len(set(paged)) == 35
    page = await store.search(WS, parse_query("topic"), SearchFilters(), offset=0, limit=3)
    assert (page.total, page.truncated) == (35, False)


async def test_better_matches_rank_first_and_ties_go_to_newer_recordings(
    store: MetadataStore,
) -> None:
    older = await recorded(store, "a budget", minutes=1)
    newer = await recorded(store, "a budget", minutes=2)
    strong = await recorded(
        store, "budget budget budget, the budget is all about budget", minutes=0
    )
    hits = await found(store, "budget")
    assert hits == [(strong.id, 0.0), (newer.id, 0.0), (older.id, 0.0)]


async def test_grouping_gives_each_recording_once_with_its_best_hits(store: MetadataStore) -> None:
    busy = await recorded(
        store,
        "budget",
        "budget budget budget plan",
        "budget again",
        "budget once more",
        "no match",
        minutes=1,
    )
    quiet = await recorded(store, "budget", minutes=2)
    other = await recorded(store, "forecast only", minutes=3)
    hits = await search(store, "budget", per_group=2)
    groups: dict[str, list[float]] = {}
    for hit in hits:
        groups.setdefault(hit.recording_id, []).append(hit.start)
    assert list(groups) == [busy.id, quiet.id]  # ranked by their best hit
    assert groups[busy.id][0] == 1.0
    assert len(groups[busy.id]) == 2
    assert groups[quiet.id] == [0.0]
    assert [hit.group for hit in hits] == [1, 1, 2]
    page = await store.search(
        WS, parse_query("budget"), SearchFilters(), offset=1, limit=1, per_group=2
    )
    assert [(h.recording_id, h.group) for h in page.hits] == [(quiet.id, 2)]
    assert page.groups == 2
    assert other.id not in groups


# ---- a large library ----------------------------------------------------------------------------

RECORDINGS = 300
SEGMENTS = 40
PLANTED = 10


def vocabulary(rng: random.Random, size: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ren", "to", "sa", "vu", "dor", "pe", "li", "qua", "ne"]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def planted_phrases(rng: random.Random, words: Sequence[str]) -> list[str]:
    """Phrases of common words with one word in them nothing else says (no 'ka'-syllables)."""
    return [
        f"{rng.choice(words[:20])} {rng.choice(words[:50])} zyx{n}wib {rng.choice(words[:20])}"
        for n in range(PLANTED)
    ]


async def test_planted_phrases_are_found_at_their_recording_and_second(
    store: MetadataStore,
) -> None:
    rng = random.Random(20261121)
    words = vocabulary(rng, 2_000)
    weights = [1 / (rank + 1) for rank in range(len(words))]  # Zipf-ish
    phrases = planted_phrases(rng, words)
    where = {phrase: (rng.randrange(RECORDINGS), rng.randrange(SEGMENTS)) for phrase in phrases}
    at = {spot: phrase for phrase, spot in where.items()}
    assert len(at) == PLANTED
    ids: list[str] = []
    for n in range(RECORDINGS):
        lines: list[Spoken] = []
        for i in range(SEGMENTS):
            text = " ".join(rng.choices(words, weights, k=rng.randint(6, 14)))
            if (n, i) in at:
                text = f"{text} {at[n, i]} {rng.choice(words)}"
            lines.append((i * 3.5, text))
        ids.append((await recorded(store, *lines, minutes=n)).id)
    for phrase, (n, i) in where.items():
        for q in (f'"{phrase}"', phrase):
            hits = await search(store, q, limit=5)
            assert hits, q
            assert (hits[0].recording_id, hits[0].start) == (ids[n], i * 3.5), q
    # A common word: the window bounds the ranking and says so.
    page = await store.search(WS, parse_query(words[0]), SearchFilters(), offset=0, limit=5)
    assert len(page.hits) == 5
    assert page.truncated is True

"""Conformance suite for the MetadataStore port: a new adapter passes by adding a fixture param."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

from tests.postgres import postgres_database
from voxvault.errors import InvalidRequest, NotFound
from voxvault.metadata import DEFAULT_WORKSPACE, MetadataStore
from voxvault.metadata.sql import SqlMetadataStore
from voxvault.metadata.tables import workspaces
from voxvault.models import (
    Artifact,
    Recording,
    RecordingQuery,
    RecordingStatus,
    Segment,
    Transcript,
    TranscriptInput,
)

pytestmark = pytest.mark.anyio
WS = DEFAULT_WORKSPACE
OTHER_WS = "other"
BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)
T = TypeVar("T")


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MetadataStore]:
    with ExitStack() as cleanup:
        if request.param == "sqlite":
            opened: MetadataStore = SqlMetadataStore(f"sqlite:///{tmp_path / 'meta.db'}")
        elif request.param == "postgresql":
            opened = SqlMetadataStore(cleanup.enter_context(postgres_database()))
        try:
            await opened.migrate()
            yield opened
        finally:
            await opened.close()


async def add_workspace(store: MetadataStore, workspace: str) -> None:
    """A second workspace with rows of its own (the port has no method to create one)."""
    if not isinstance(store, SqlMetadataStore):  # pragma: no cover - the only adapter today
        raise NotImplementedError(f"no way to add a workspace to {type(store).__name__}")
    async with store.engine.begin() as conn:
        await conn.execute(
            workspaces.insert().values(id=workspace, name=workspace, created_at=BASE_TIME)
        )


def make_recording(minutes: int = 0, tags: list[str] | None = None, **changes: object) -> Recording:
    when = BASE_TIME + timedelta(minutes=minutes)
    fields: dict[str, object] = {
        "id": uuid.uuid4().hex,
        "status": RecordingStatus.STORED,
        "title": f"take {minutes}",
        "filename": "take.wav",
        "content_type": "audio/wav",
        "size_bytes": 1000 + minutes,
        "sha256": "0" * 64,
        "duration_s": 1.5,
        "sample_rate": 16000,
        "channels": 1,
        "codec": "pcm_s16le",
        "tags": tags or [],
        "metadata": {"n": minutes},
        "created_at": when,
        "updated_at": when,
    }
    fields.update(changes)
    return Recording.model_validate(fields)


async def concurrently(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T | Exception]:
    """Start the calls at once and return each one's result or error, in order.

    One call's error does not cancel the others: a database call cancelled half way can leave
    the event loop unable to close, so a broken store would hang the suite instead of failing it.
    """
    outcomes: list[T | Exception | None] = [None] * len(calls)

    async def run(i: int) -> None:
        try:
            outcomes[i] = await calls[i]()
        except Exception as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as group:
        for i in range(len(calls)):
            group.start_soon(run, i)
    return [o for o in outcomes if o is not None]


def transcript(*texts: str) -> TranscriptInput:
    segments = [Segment(start=i, end=i + 0.5, text=t) for i, t in enumerate(texts)]
    return TranscriptInput(language="en", segments=segments)


async def test_insert_and_get_round_trip(store: MetadataStore) -> None:
    recording = make_recording(tags=["a", "b"])
    await store.insert_recording(WS, recording)
    assert await store.get_recording(WS, recording.id) == recording


async def test_workspaces_are_isolated(store: MetadataStore) -> None:
    recording = make_recording()
    await store.insert_recording(WS, recording)
    with pytest.raises(NotFound):
        await store.get_recording("elsewhere", recording.id)
    assert (await store.list_recordings("elsewhere", RecordingQuery())).items == []
    with pytest.raises(NotFound):
        await store.update_recording("elsewhere", recording.id, title="stolen")
    assert await store.purge_recording("elsewhere", recording.id) is False
    assert (await store.get_recording(WS, recording.id)).title == recording.title


async def test_list_is_newest_first_and_cursor_pages_cover_everything_once(
    store: MetadataStore,
) -> None:
    made = [make_recording(minutes=i % 7) for i in range(23)]  # ties on created_at on purpose
    for recording in made:
        await store.insert_recording(WS, recording)
    seen: list[Recording] = []
    query = RecordingQuery(limit=5)
    while True:
        page = await store.list_recordings(WS, query)
        seen += page.items
        assert len(seen) <= len(made), "the pages never end"
        if page.next_cursor is None:
            break
        query = query.model_copy(update={"cursor": page.next_cursor})
    assert sorted(r.id for r in seen) == sorted(r.id for r in made)
    assert len(seen) == len(made)
    keys = [(r.created_at, r.id) for r in seen]
    assert keys == sorted(keys, reverse=True)


async def test_list_filters(store: MetadataStore) -> None:
    early = make_recording(minutes=1, tags=["meeting"])
    middle = make_recording(minutes=5, tags=["pitch", "meeting"], status=RecordingStatus.READY)
    late = make_recording(minutes=9, tags=["pitch"])
    for recording in (early, middle, late):
        await store.insert_recording(WS, recording)

    async def ids(**query: object) -> list[str]:
        page = await store.list_recordings(WS, RecordingQuery.model_validate(query))
        return [r.id for r in page.items]

    assert await ids(tag="meeting") == [middle.id, early.id]
    assert await ids(tag="pitch") == [late.id, middle.id]
    assert await ids(tag="none") == []
    assert await ids(status="ready") == [middle.id]
    assert await ids(created_after=BASE_TIME + timedelta(minutes=2)) == [late.id, middle.id]
    assert await ids(created_before=BASE_TIME + timedelta(minutes=5)) == [early.id]
    assert await ids(tag="meeting", status="stored") == [early.id]


@pytest.mark.parametrize("cursor", ["garbage", "!!", "eyJ4IjoxfQ", "WyJub3QtYS1kYXRlIiwgImlkIl0"])
async def test_bad_cursor_is_invalid_request(store: MetadataStore, cursor: str) -> None:
    with pytest.raises(InvalidRequest):
        await store.list_recordings(WS, RecordingQuery(cursor=cursor))


async def test_update_changes_only_given_fields_and_tags_follow(store: MetadataStore) -> None:
    recording = make_recording(tags=["old"])
    await store.insert_recording(WS, recording)
    updated = await store.update_recording(WS, recording.id, tags=["new", "other"])
    assert updated.tags == ["new", "other"]
    assert updated.title == recording.title
    assert updated.metadata == recording.metadata
    assert updated.updated_at > recording.updated_at
    updated = await store.update_recording(WS, recording.id, title="renamed", metadata={"k": [1]})
    assert (updated.title, updated.metadata, updated.tags) == (
        "renamed",
        {"k": [1]},
        ["new", "other"],
    )
    assert (await store.list_recordings(WS, RecordingQuery(tag="old"))).items == []
    assert len((await store.list_recordings(WS, RecordingQuery(tag="new"))).items) == 1
    with pytest.raises(NotFound):
        await store.update_recording(WS, uuid.uuid4().hex, title="x")


async def test_tombstoned_recording_is_invisible(store: MetadataStore) -> None:
    recording = make_recording()
    await store.insert_recording(WS, recording)
    await store.update_recording(WS, recording.id, status=RecordingStatus.DELETING)
    with pytest.raises(NotFound):
        await store.get_recording(WS, recording.id)
    assert (await store.list_recordings(WS, RecordingQuery())).items == []
    assert (await store.usage(WS)).recordings == 0
    assert await store.list_tombstones() == [(WS, recording.id)]
    assert await store.purge_recording(WS, recording.id) is True
    assert await store.list_tombstones() == []


async def test_transcript_versions_count_up_and_are_kept(store: MetadataStore) -> None:
    recording = make_recording()
    await store.insert_recording(WS, recording)
    with pytest.raises(NotFound):
        await store.get_transcript(WS, recording.id)
    first = await store.add_transcript(WS, recording.id, transcript("hello"))
    second = await store.add_transcript(WS, recording.id, transcript("hello", "again"))
    assert (first.version, second.version) == (1, 2)
    current = await store.get_transcript(WS, recording.id)
    assert current.version == 2
    assert [s.text for s in current.segments] == ["hello", "again"]
    assert [s.text for s in (await store.get_transcript(WS, recording.id, 1)).segments] == ["hello"]
    with pytest.raises(NotFound):
        await store.get_transcript(WS, recording.id, 3)
    versions = await store.list_transcript_versions(WS, recording.id)
    assert [(v.version, v.segment_count, v.language) for v in versions] == [
        (1, 1, "en"),
        (2, 2, "en"),
    ]


async def test_concurrent_transcripts_get_distinct_versions(store: MetadataStore) -> None:
    recording = make_recording()
    await store.insert_recording(WS, recording)
    versions: list[int] = []

    async def add(i: int) -> None:
        versions.append((await store.add_transcript(WS, recording.id, transcript(str(i)))).version)

    async with anyio.create_task_group() as group:
        for i in range(10):
            group.start_soon(add, i)
    assert sorted(versions) == list(range(1, 11))


async def test_transcript_words_round_trip(store: MetadataStore) -> None:
    recording = make_recording()
    await store.insert_recording(WS, recording)
    given = TranscriptInput.model_validate(
        {
            "language": "en",
            "segments": [
                {
                    "start": 0.0,
                    "end": 1.0,
                    "speaker": "S1",
                    "text": "héllo wörld 🎙",
                    "words": [
                        {"start": 0.0, "end": 0.4, "word": "héllo", "probability": 0.9},
                        {"start": 0.5, "end": 1.0, "word": "wörld", "probability": 0.8},
                    ],
                }
            ],
        }
    )
    await store.add_transcript(WS, recording.id, given)
    assert (await store.get_transcript(WS, recording.id)).segments == given.segments


async def test_artifacts_upsert_list_delete(store: MetadataStore) -> None:
    recording = make_recording()
    await store.insert_recording(WS, recording)
    first = Artifact(
        name="summary.json",
        content_type="application/json",
        size_bytes=10,
        sha256="a" * 64,
        created_at=BASE_TIME,
    )
    await store.upsert_artifact(WS, recording.id, first)
    replaced = first.model_copy(
        update={"size_bytes": 20, "sha256": "b" * 64, "created_at": BASE_TIME + timedelta(hours=1)}
    )
    await store.upsert_artifact(WS, recording.id, replaced)
    got = await store.get_artifact(WS, recording.id, "summary.json")
    assert (got.size_bytes, got.sha256, got.created_at) == (20, "b" * 64, BASE_TIME)
    other = first.model_copy(update={"name": "a.srt", "content_type": "text/plain"})
    await store.upsert_artifact(WS, recording.id, other)
    assert [a.name for a in await store.list_artifacts(WS, recording.id)] == [
        "a.srt",
        "summary.json",
    ]
    assert await store.delete_artifact(WS, recording.id, "a.srt") is True
    assert await store.delete_artifact(WS, recording.id, "a.srt") is False
    with pytest.raises(NotFound):
        await store.get_artifact(WS, recording.id, "a.srt")
    with pytest.raises(NotFound):
        await store.upsert_artifact(WS, uuid.uuid4().hex, first)


async def test_concurrent_upserts_of_one_artifact_leave_one_of_them(store: MetadataStore) -> None:
    recording = make_recording()
    await store.insert_recording(WS, recording)
    for name in ("a.json", "b.json", "c.json"):  # several rounds, since one need not collide
        given = [
            Artifact(
                name=name,
                content_type="application/json",
                size_bytes=i,
                sha256=f"{i:064x}",
                created_at=BASE_TIME + timedelta(seconds=i),
            )
            for i in range(1, 9)
        ]
        errors = await concurrently(
            [partial(store.upsert_artifact, WS, recording.id, artifact) for artifact in given]
        )
        assert errors == []  # each upsert returns None, so only errors are left
        got = await store.get_artifact(WS, recording.id, name)
        assert got.sha256 == f"{got.size_bytes:064x}"  # one upsert's fields, not a mix
    assert [a.name for a in await store.list_artifacts(WS, recording.id)] == [
        "a.json",
        "b.json",
        "c.json",
    ]


async def test_purge_removes_the_recording_and_everything_of_it(store: MetadataStore) -> None:
    kept, gone = make_recording(tags=["t"]), make_recording(tags=["t"])
    for recording in (kept, gone):
        await store.insert_recording(WS, recording)
        await store.add_transcript(WS, recording.id, transcript("x"))
        await store.upsert_artifact(
            WS,
            recording.id,
            Artifact(
                name="n",
                content_type="text/plain",
                size_bytes=5,
                sha256="c" * 64,
                created_at=BASE_TIME,
            ),
        )
    assert await store.purge_recording(WS, gone.id) is True
    assert await store.purge_recording(WS, gone.id) is False
    with pytest.raises(NotFound):
        await store.get_recording(WS, gone.id)
    usage = await store.usage(WS)
    assert (usage.recordings, usage.transcripts, usage.artifacts) == (1, 1, 1)
    assert usage.recording_bytes == kept.size_bytes
    assert usage.artifact_bytes == 5
    assert [r.id for r in (await store.list_recordings(WS, RecordingQuery(tag="t"))).items] == [
        kept.id
    ]


async def test_migrate_is_idempotent_and_check_passes(store: MetadataStore) -> None:
    recording = make_recording()
    await store.insert_recording(WS, recording)
    await store.migrate()
    await store.check()
    assert (await store.get_recording(WS, recording.id)).id == recording.id
    assert store.describe()["backend"]


# ---- pipeline results: error, playback rendition, where a transcript came from ------------------


async def test_a_new_status_always_replaces_the_error(store: MetadataStore) -> None:
    recording = make_recording()
    await store.insert_recording(WS, recording)
    assert (await store.get_recording(WS, recording.id)).error is None
    failed = await store.update_recording(
        WS, recording.id, status=RecordingStatus.FAILED, error="decoder crashed"
    )
    assert (failed.status, failed.error) == (RecordingStatus.FAILED, "decoder crashed")
    renamed = await store.update_recording(WS, recording.id, title="renamed")
    assert (renamed.title, renamed.error) == ("renamed", "decoder crashed")  # no status: kept
    again = await store.update_recording(
        WS, recording.id, status=RecordingStatus.FAILED, error="out of memory"
    )
    assert again.error == "out of memory"
    queued = await store.update_recording(WS, recording.id, status=RecordingStatus.QUEUED)
    assert (queued.status, queued.error) == (RecordingStatus.QUEUED, None)
    await store.update_recording(WS, recording.id, status=RecordingStatus.FAILED, error="boom")
    bare = await store.update_recording(WS, recording.id, status=RecordingStatus.FAILED)
    assert bare.error is None  # the old failure's error does not outlive the new status
    assert (await store.get_recording(WS, recording.id)).error is None
    listed = (await store.list_recordings(WS, RecordingQuery())).items
    assert [(r.id, r.error) for r in listed] == [(recording.id, None)]


async def test_playback_checksum_is_recorded_and_forgotten(store: MetadataStore) -> None:
    recording, other = make_recording(), make_recording()
    for made in (recording, other):
        await store.insert_recording(WS, made)
    assert await store.get_playback(WS, recording.id) is None
    await store.set_playback(WS, recording.id, "a" * 64)
    assert await store.get_playback(WS, recording.id) == "a" * 64
    assert await store.get_playback(WS, other.id) is None
    await store.set_playback(WS, recording.id, "b" * 64)
    assert await store.get_playback(WS, recording.id) == "b" * 64
    await store.set_playback(WS, recording.id, None)
    assert await store.get_playback(WS, recording.id) is None
    unknown = uuid.uuid4().hex
    with pytest.raises(NotFound):
        await store.set_playback(WS, unknown, "a" * 64)
    with pytest.raises(NotFound):
        await store.get_playback(WS, unknown)


async def test_playback_of_a_recording_being_deleted_is_not_found(store: MetadataStore) -> None:
    recording = make_recording()
    await store.insert_recording(WS, recording)
    await store.set_playback(WS, recording.id, "a" * 64)
    await store.update_recording(WS, recording.id, status=RecordingStatus.DELETING)
    with pytest.raises(NotFound):
        await store.get_playback(WS, recording.id)
    with pytest.raises(NotFound):
        await store.set_playback(WS, recording.id, "b" * 64)


async def test_playback_is_scoped_to_the_workspace(store: MetadataStore) -> None:
    await add_workspace(store, OTHER_WS)
    mine, theirs = make_recording(), make_recording()
    await store.insert_recording(WS, mine)
    await store.insert_recording(OTHER_WS, theirs)
    await store.set_playback(WS, mine.id, "a" * 64)
    await store.set_playback(OTHER_WS, theirs.id, "c" * 64)
    with pytest.raises(NotFound):
        await store.get_playback(OTHER_WS, mine.id)
    with pytest.raises(NotFound):
        await store.set_playback(OTHER_WS, mine.id, "b" * 64)
    with pytest.raises(NotFound):
        await store.get_playback(WS, theirs.id)
    with pytest.raises(NotFound):
        await store.set_playback(WS, theirs.id, None)
    assert await store.get_playback(WS, mine.id) == "a" * 64
    assert await store.get_playback(OTHER_WS, theirs.id) == "c" * 64


async def test_a_transcript_keeps_its_engine_model_timings_and_job(store: MetadataStore) -> None:
    recording = make_recording()
    await store.insert_recording(WS, recording)
    job_id = uuid.uuid4().hex
    given = transcript("hello").model_copy(update={"engine": "faster-whisper", "model": "tiny.en"})
    timings = {"decode": 0.25, "transcribe": 1.5}
    made = await store.add_transcript(WS, recording.id, given, job_id=job_id, timings=timings)
    assert (made.version, made.engine, made.model, made.timings, made.job_id) == (
        1,
        "faster-whisper",
        "tiny.en",
        timings,
        job_id,
    )
    plain = await store.add_transcript(WS, recording.id, transcript("typed by hand"))
    assert (plain.version, plain.engine, plain.model, plain.timings, plain.job_id) == (
        2,
        None,
        None,
        {},
        None,
    )
    stored = await store.get_transcript(WS, recording.id, 1)
    assert stored == made
    assert await store.get_transcript(WS, recording.id) == plain
    versions = await store.list_transcript_versions(WS, recording.id)
    assert [(v.version, v.engine, v.model, v.job_id) for v in versions] == [
        (1, "faster-whisper", "tiny.en", job_id),
        (2, None, None, None),
    ]


async def test_a_job_stores_one_transcript_however_often_it_runs(store: MetadataStore) -> None:
    recording = make_recording()
    await store.insert_recording(WS, recording)
    job_id = uuid.uuid4().hex
    first = await store.add_transcript(
        WS, recording.id, transcript("first run"), job_id=job_id, timings={"transcribe": 1.0}
    )
    rerun = await store.add_transcript(
        WS, recording.id, transcript("second", "run"), job_id=job_id, timings={"transcribe": 9.0}
    )
    assert rerun == first  # the stored result, not the rerun's
    assert [s.text for s in rerun.segments] == ["first run"]
    assert [v.version for v in await store.list_transcript_versions(WS, recording.id)] == [1]
    other_job = await store.add_transcript(
        WS, recording.id, transcript("another job"), job_id=uuid.uuid4().hex
    )
    assert other_job.version == 2
    assert (await store.add_transcript(WS, recording.id, transcript("manual"))).version == 3


async def test_get_job_transcript_finds_what_the_job_made(store: MetadataStore) -> None:
    await add_workspace(store, OTHER_WS)
    recording, sibling, theirs = make_recording(), make_recording(), make_recording()
    await store.insert_recording(WS, recording)
    await store.insert_recording(WS, sibling)
    await store.insert_recording(OTHER_WS, theirs)
    job_id = uuid.uuid4().hex
    assert await store.get_job_transcript(WS, recording.id, job_id) is None
    await store.add_transcript(WS, recording.id, transcript("before"))
    made = await store.add_transcript(WS, recording.id, transcript("by the job"), job_id=job_id)
    await store.add_transcript(WS, recording.id, transcript("after"))
    found = await store.get_job_transcript(WS, recording.id, job_id)
    assert found == made
    assert found is not None
    assert (found.version, [s.text for s in found.segments]) == (2, ["by the job"])
    assert await store.get_job_transcript(WS, recording.id, uuid.uuid4().hex) is None
    assert await store.get_job_transcript(WS, sibling.id, job_id) is None  # another recording's
    with pytest.raises(NotFound):
        await store.get_job_transcript(OTHER_WS, recording.id, job_id)
    with pytest.raises(NotFound):
        await store.get_job_transcript(WS, uuid.uuid4().hex, job_id)
    await store.update_recording(WS, recording.id, status=RecordingStatus.DELETING)
    with pytest.raises(NotFound):
        await store.get_job_transcript(WS, recording.id, job_id)


async def test_concurrent_adds_by_one_job_yield_one_version(store: MetadataStore) -> None:
    for _ in range(5):  # several rounds, since one round need not make the writers collide
        recording = make_recording()
        await store.insert_recording(WS, recording)
        job_id = uuid.uuid4().hex
        outcomes = await concurrently(
            [
                partial(store.add_transcript, WS, recording.id, transcript(str(i)), job_id=job_id)
                for i in range(10)
            ]
        )
        results = [o for o in outcomes if isinstance(o, Transcript)]
        assert len(results) == 10, outcomes
        assert {(r.version, r.job_id) for r in results} == {(1, job_id)}
        assert len({r.segments[0].text for r in results}) == 1  # all got the one stored
        versions = await store.list_transcript_versions(WS, recording.id)
        assert [(v.version, v.job_id) for v in versions] == [(1, job_id)]
        assert await store.get_job_transcript(WS, recording.id, job_id) == results[0]


async def test_concurrent_adds_by_distinct_jobs_yield_distinct_versions(
    store: MetadataStore,
) -> None:
    recording = make_recording()
    await store.insert_recording(WS, recording)
    job_ids = [uuid.uuid4().hex for _ in range(10)]
    outcomes = await concurrently(
        [
            partial(store.add_transcript, WS, recording.id, transcript(job_id), job_id=job_id)
            for job_id in job_ids
        ]
    )
    results = [o for o in outcomes if isinstance(o, Transcript)]
    assert len(results) == 10, outcomes
    made = {r.job_id: r.version for r in results}
    assert sorted(made.values()) == list(range(1, 11))
    versions = await store.list_transcript_versions(WS, recording.id)
    assert {v.job_id: v.version for v in versions} == made
    for job_id in job_ids:
        found = await store.get_job_transcript(WS, recording.id, job_id)
        assert found is not None
        assert (found.version, found.segments[0].text) == (made[job_id], job_id)


async def test_recording_blobs_span_every_workspace_and_tombstones(store: MetadataStore) -> None:
    await add_workspace(store, "other")
    mine = make_recording(1, sha256="1" * 64)
    theirs = make_recording(2, sha256="2" * 64)
    doomed = make_recording(3, sha256="3" * 64)
    await store.insert_recording(DEFAULT_WORKSPACE, mine)
    await store.insert_recording("other", theirs)
    await store.insert_recording(DEFAULT_WORKSPACE, doomed)
    await store.set_playback(DEFAULT_WORKSPACE, mine.id, "4" * 64)
    summary = Artifact(
        name="summary.json",
        content_type="application/json",
        size_bytes=2,
        sha256="5" * 64,
        created_at=BASE_TIME,
    )
    await store.upsert_artifact("other", theirs.id, summary)
    await store.update_recording(DEFAULT_WORKSPACE, doomed.id, status=RecordingStatus.DELETING)

    listed = await store.list_recording_blobs()
    assert [row.recording_id for row in listed] == sorted([mine.id, theirs.id, doomed.id])
    by_id = {row.recording_id: row for row in listed}
    assert (by_id[mine.id].workspace, by_id[mine.id].sha256) == (DEFAULT_WORKSPACE, "1" * 64)
    assert by_id[mine.id].playback_sha256 == "4" * 64
    assert by_id[mine.id].artifacts == {}
    assert by_id[theirs.id].workspace == "other"
    assert by_id[theirs.id].playback_sha256 is None
    assert by_id[theirs.id].artifacts == {"summary.json": "5" * 64}
    assert by_id[doomed.id].status is RecordingStatus.DELETING

    # Pages follow the id order.
    first = await store.list_recording_blobs(limit=2)
    rest = await store.list_recording_blobs(after=first[-1].recording_id, limit=2)
    assert [row.recording_id for row in first + rest] == [row.recording_id for row in listed]
    assert await store.list_recording_blobs(after=listed[-1].recording_id) == []

    assert await store.get_recording_blobs(theirs.id) == by_id[theirs.id]
    assert await store.get_recording_blobs(doomed.id) == by_id[doomed.id]
    assert await store.get_recording_blobs("f" * 32) is None

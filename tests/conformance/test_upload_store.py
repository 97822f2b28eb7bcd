"""Conformance suite for the UploadStore port, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from tests.postgres import postgres_database
from voxvault.errors import NotFound
from voxvault.metadata import DEFAULT_WORKSPACE
from voxvault.metadata.sql import SqlMetadataStore
from voxvault.metadata.uploads import (
    Upload,
    UploadPart,
    UploadStatus,
    UploadStore,
    open_upload_store,
)

pytestmark = pytest.mark.anyio
WS = DEFAULT_WORKSPACE
NOW = datetime(2026, 1, 1, tzinfo=UTC)
LATER = NOW + timedelta(days=1)


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[UploadStore]:
    with ExitStack() as cleanup:
        if request.param == "sqlite":
            metadata = SqlMetadataStore(f"sqlite:///{tmp_path / 'meta.db'}")
        else:
            metadata = SqlMetadataStore(cleanup.enter_context(postgres_database()))
        try:
            await metadata.migrate()
            yield open_upload_store(metadata)
        finally:
            await metadata.close()


async def new_upload(store: UploadStore, length: int = 100) -> Upload:
    upload = Upload(
        id=uuid.uuid4().hex,
        workspace=WS,
        length=length,
        offset=0,
        metadata={"filename": "a.wav"},
        status=UploadStatus.ACTIVE,
        recording_id=uuid.uuid4().hex,
        created_at=NOW,
        updated_at=NOW,
        expires_at=LATER,
    )
    await store.create_upload(upload)
    return upload


async def append(store: UploadStore, upload: Upload, offset: int, size: int) -> Upload | None:
    """A part of ``size`` bytes by a writer that read the upload at ``offset``."""
    read = replace(await store.get_upload(WS, upload.id), offset=offset)
    return await store.append_part(
        read,
        UploadPart(name=f"{offset:08d}-{uuid.uuid4().hex[:8]}", size=size),
        now=NOW,
        expires_at=LATER,
    )


async def test_an_upload_reads_back_as_created(store: UploadStore) -> None:
    upload = await new_upload(store)
    assert await store.get_upload(WS, upload.id) == upload
    with pytest.raises(NotFound):
        await store.get_upload("other", upload.id)
    with pytest.raises(NotFound):
        await store.get_upload(WS, uuid.uuid4().hex)


async def test_parts_move_the_offset_only_from_the_expected_one(store: UploadStore) -> None:
    upload = await new_upload(store)
    first = await append(store, upload, 0, 40)
    assert first is not None
    assert (first.offset, first.status) == (40, UploadStatus.ACTIVE)
    assert await append(store, upload, 0, 10) is None  # stale offset
    assert await append(store, upload, 40, 61) is None  # past the length
    last = await append(store, upload, 40, 60)
    assert last is not None
    assert (last.offset, last.status) == (100, UploadStatus.COMPLETING)
    stored = await store.get_upload(WS, upload.id)
    assert [p.size for p in stored.parts] == [40, 60]
    assert stored == last  # the row reads back as the store said it wrote it
    assert await append(store, upload, 100, 1) is None


async def test_an_appended_row_s_times_compare_as_every_other_statement_s(
    store: UploadStore,
) -> None:
    upload = await new_upload(store)
    at = NOW  # whole seconds: stored in another format, they would sort before equal times
    appended = await store.append_part(
        upload, UploadPart(name="a", size=10), now=at, expires_at=at + timedelta(seconds=1)
    )
    assert appended == await store.get_upload(WS, upload.id)
    # Times written by the append compare with times written by every other statement.
    listed = await store.list_expired_uploads(at + timedelta(seconds=1, microseconds=1))
    assert [u.id for u in listed] == [upload.id]
    assert await store.list_expired_uploads(at + timedelta(seconds=1)) == []


async def test_of_racing_parts_at_one_offset_exactly_one_lands(store: UploadStore) -> None:
    upload = await new_upload(store)
    results: list[Upload | None] = []

    async def one() -> None:
        results.append(await append(store, upload, 0, 10))

    async with anyio.create_task_group() as group:
        for _ in range(8):
            group.start_soon(one)
    assert len([r for r in results if r is not None]) == 1
    stored = await store.get_upload(WS, upload.id)
    assert (stored.offset, len(stored.parts)) == (10, 1)


async def test_an_expired_upload_takes_no_part(store: UploadStore) -> None:
    upload = await new_upload(store)
    assert (
        await store.append_part(
            upload,
            UploadPart(name="late", size=1),
            now=LATER + timedelta(seconds=1),
            expires_at=LATER + timedelta(days=1),
        )
        is None
    )


async def test_a_completion_is_claimed_once_and_taken_over_when_stale(
    store: UploadStore,
) -> None:
    upload = await new_upload(store, length=10)
    assert await append(store, upload, 0, 10) is not None  # completing, claimed at NOW
    fresh = await store.claim_completion(WS, upload.id, now=NOW, stale_before=NOW)
    assert fresh is None
    later = NOW + timedelta(minutes=5)
    taken = await store.claim_completion(WS, upload.id, now=later, stale_before=later)
    assert taken is not None
    assert (taken.status, taken.updated_at) == (UploadStatus.COMPLETING, later)
    await store.renew_claim(WS, upload.id, later + timedelta(seconds=10))
    assert await store.claim_completion(WS, upload.id, now=later, stale_before=later) is None


async def test_settling_needs_the_expected_status(store: UploadStore) -> None:
    upload = await new_upload(store, length=10)
    assert await append(store, upload, 0, 10) is not None
    assert not await store.settle_upload(
        WS,
        upload.id,
        UploadStatus.TERMINATED,
        from_statuses=[UploadStatus.ACTIVE],
        now=NOW,
        expires_at=LATER,
    )
    assert await store.settle_upload(
        WS,
        upload.id,
        UploadStatus.COMPLETED,
        from_statuses=[UploadStatus.COMPLETING],
        now=NOW,
        expires_at=LATER,
    )
    settled = await store.get_upload(WS, upload.id)
    assert (settled.status, settled.parts) == (UploadStatus.COMPLETED, ())


async def test_expired_uploads_are_listed_across_workspaces_and_deleted(
    store: UploadStore,
) -> None:
    old = await new_upload(store)
    await new_upload(store)
    assert await store.list_expired_uploads(LATER) == []
    assert await store.settle_upload(
        WS,
        old.id,
        UploadStatus.TERMINATED,
        from_statuses=[UploadStatus.ACTIVE],
        now=NOW,
        expires_at=NOW,
    )
    assert [u.id for u in await store.list_expired_uploads(LATER)] == [old.id]
    assert await store.delete_upload(WS, old.id)
    assert not await store.delete_upload(WS, old.id)
    assert len(await store.list_expired_uploads(LATER + timedelta(seconds=1))) == 1


async def test_uploads_are_found_by_id_in_any_workspace_and_status(store: UploadStore) -> None:
    live = await new_upload(store)
    done = await new_upload(store, length=10)
    assert await append(store, done, 0, 10) is not None
    missing = uuid.uuid4().hex
    found = await store.find_uploads([live.id, done.id, missing])
    assert set(found) == {live.id, done.id}
    assert found[live.id] == live
    assert found[done.id].status is UploadStatus.COMPLETING
    assert await store.find_uploads([]) == {}


async def test_stalled_completions_are_listed_only_once_stale(store: UploadStore) -> None:
    full = await new_upload(store, length=10)
    assert await append(store, full, 0, 10) is not None  # completing, claimed at NOW
    await new_upload(store)  # active: never listed
    assert await store.list_stalled_completions(NOW) == []
    (stalled,) = await store.list_stalled_completions(NOW + timedelta(seconds=1))
    assert (stalled.id, stalled.status) == (full.id, UploadStatus.COMPLETING)


async def test_a_part_named_as_the_last_one_extends_it(store: UploadStore) -> None:
    upload = await new_upload(store)
    first = await store.append_part(
        upload, UploadPart(name="grown", size=30), now=NOW, expires_at=LATER
    )
    assert first is not None
    second = await store.append_part(
        first, UploadPart(name="grown", size=70), now=NOW, expires_at=LATER
    )
    assert second is not None
    assert (second.offset, second.status) == (100, UploadStatus.COMPLETING)
    stored = await store.get_upload(WS, upload.id)
    assert stored.parts == second.parts == (UploadPart(name="grown", size=100),)


# ---- parts of a multipart upload ----------------------------------------------------------------


async def test_racing_claims_get_distinct_numbers_and_the_first_multipart_id_stays(
    store: UploadStore,
) -> None:
    upload = await new_upload(store)
    claims: list[tuple[str, int] | None] = []

    async def claim(multipart_id: str) -> None:
        claims.append(await store.claim_part_number(upload, multipart_id=multipart_id, now=NOW))

    async with anyio.create_task_group() as group:
        for n in range(8):
            group.start_soon(claim, f"mp-{n}")
    assert all(c is not None for c in claims)
    numbers = sorted(c[1] for c in claims if c is not None)
    assert numbers == list(range(1, 9))
    (kept,) = {c[0] for c in claims if c is not None}  # every claim names the same upload
    assert (await store.get_upload(WS, upload.id)).multipart_id == kept


async def test_part_numbers_are_claimed_only_at_the_offset_and_grow_with_it(
    store: UploadStore,
) -> None:
    upload = await new_upload(store)
    first = await store.claim_part_number(upload, multipart_id="mp", now=NOW)
    assert first == ("mp", 1)
    part = UploadPart(name="multipart-00001", size=40, part_number=1, etag='"e1"')
    appended = await store.append_part(
        replace(upload, multipart_id="mp"), part, now=NOW, expires_at=LATER
    )
    assert appended is not None
    assert appended.parts == (part,)
    assert appended == await store.get_upload(WS, upload.id)  # the part's number and ETag too
    # A writer still at the old offset gets no number; one at the new offset a greater one.
    assert await store.claim_part_number(upload, multipart_id="other", now=NOW) is None
    assert await store.claim_part_number(appended, multipart_id="other", now=NOW) == ("mp", 2)
    # Not once expired, nor once settled.
    expired = LATER + timedelta(seconds=1)
    assert await store.claim_part_number(appended, multipart_id="mp", now=expired) is None
    settled = await store.settle_upload(
        WS,
        upload.id,
        UploadStatus.TERMINATED,
        from_statuses=[UploadStatus.ACTIVE],
        now=NOW,
        expires_at=LATER,
    )
    assert settled is not None
    assert (settled.status, settled.multipart_id, settled.parts) == (
        UploadStatus.TERMINATED,
        "mp",
        (),
    )
    assert await store.claim_part_number(appended, multipart_id="mp", now=NOW) is None

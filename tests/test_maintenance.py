"""``voxvault fsck`` and ``voxvault gc``, on the local store and on S3 (moto), beside live traffic.

Age is set, not waited for: files get old modification times (``os.utime``), and where a store
cannot be aged (S3) the grace period is set to 0 instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner, Result

from tests.conftest import within
from tests.media import wav_bytes
from tests.s3 import S3Bucket, s3_bucket
from voxvault import Settings, Vault
from voxvault.blobs import keys as blob_keys
from voxvault.blobs.local import LocalBlobStore
from voxvault.cli import app
from voxvault.jobs import open_job_queue
from voxvault.metadata.uploads import UploadPart
from voxvault.models import Recording, RecordingStatus
from voxvault.pipeline.worker import run_workers
from voxvault.uploads import COMPLETION_LEASE_S

pytestmark = pytest.mark.anyio

HOUR = 3600.0
TRANSCRIPT = {"language": "en", "segments": [{"start": 0.0, "end": 1.0, "text": "Hello."}]}


async def once(data: bytes) -> AsyncIterator[bytes]:
    yield data


@pytest.fixture
def bucket(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    if getattr(request, "param", "local") == "local":
        yield None
        return
    with s3_bucket(monkeypatch) as opened:
        yield opened


@pytest.fixture
def stack_settings(data_dir: Path, bucket: S3Bucket | None) -> Settings:
    if bucket is None:
        return Settings(data_dir=data_dir)
    return Settings(data_dir=data_dir, blob_url=bucket.url)


@pytest.fixture
async def store(stack_settings: Settings) -> AsyncIterator[Vault]:
    async with await Vault.open(stack_settings) as opened:
        yield opened


both = pytest.mark.parametrize("bucket", ["local", "s3"], indirect=True)


async def full_recording(vault: Vault) -> Recording:
    """A recording with a transcript (and its five files), an artifact and a playback rendition."""
    recording = await vault.create_recording(once(wav_bytes(1.0)), transcribe=False)
    await vault.put_transcript(recording.id, TRANSCRIPT)
    await vault.put_artifact(recording.id, "summary.json", once(b'{"summary": "hi"}'))
    playback = await vault.blobs.put_bytes(blob_keys.recording_playback(recording.id), b"opus")
    await vault.metadata.set_playback(vault.workspace, recording.id, playback.sha256)
    return recording


def blob_path(vault: Vault, key: str) -> Path:
    assert isinstance(vault.blobs, LocalBlobStore)
    return vault.blobs.root / key


def age(path: Path, seconds: float = 2 * HOUR) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


async def replace_bytes(vault: Vault, key: str, data: bytes) -> None:
    """Change a blob's bytes behind its row's back (bit rot, a stray write)."""
    if isinstance(vault.blobs, LocalBlobStore):
        blob_path(vault, key).write_bytes(data)
        age(blob_path(vault, key))
    else:
        await vault.blobs.put_bytes(key, data)


def grace_for(vault: Vault) -> float | None:
    """The grace that makes what the test just wrote old: none needed where files are aged."""
    return None if isinstance(vault.blobs, LocalBlobStore) else 0


async def keys(vault: Vault) -> list[str]:
    return [info.key async for info in vault.blobs.list()]


# ---- fsck ---------------------------------------------------------------------------------


@both
async def test_fsck_is_clean_on_a_fresh_vault(store: Vault) -> None:
    first, second = await full_recording(store), await full_recording(store)
    report = await store.fsck(grace_s=0)
    # Per recording: original, playback, summary.json and five transcript files.
    assert report.as_json() == {
        "ok": True,
        "checked": 16,
        "corrupt": [],
        "missing": [],
        "orphans": [],
    }
    assert {first.id, second.id} == {k.split("/")[1] for k in await keys(store)}


@both
async def test_a_flipped_byte_in_an_original_is_corrupt(store: Vault) -> None:
    recording = await full_recording(store)
    key = blob_keys.recording_original(recording.id)
    data = bytearray(await store.blobs.read_all(key))
    data[100] ^= 0x01
    await replace_bytes(store, key, bytes(data))
    report = (await store.fsck(grace_s=grace_for(store))).as_json()
    assert report["ok"] is False
    (corrupt,) = report["corrupt"]
    assert corrupt["recording_id"] == recording.id
    assert corrupt["key"] == key
    assert corrupt["expected_sha256"] == recording.sha256
    assert corrupt["actual_sha256"] == hashlib.sha256(data).hexdigest()
    assert report["missing"] == report["orphans"] == []


@both
async def test_a_corrupt_artifact_is_found_too(store: Vault) -> None:
    recording = await full_recording(store)
    key = blob_keys.recording_artifact(recording.id, "summary.json")
    await replace_bytes(store, key, b'{"summary": "HI"}')
    report = (await store.fsck(grace_s=grace_for(store))).as_json()
    assert [(p["recording_id"], p["key"]) for p in report["corrupt"]] == [(recording.id, key)]


@both
async def test_a_deleted_blob_is_missing(store: Vault) -> None:
    recording = await full_recording(store)
    original = blob_keys.recording_original(recording.id)
    playback = blob_keys.recording_playback(recording.id)
    await store.blobs.delete(original)
    await store.blobs.delete(playback)
    report = (await store.fsck()).as_json()
    assert report["ok"] is False
    assert sorted((p["recording_id"], p["key"]) for p in report["missing"]) == sorted(
        [(recording.id, original), (recording.id, playback)]
    )
    assert report["corrupt"] == report["orphans"] == []


@both
async def test_a_blob_without_a_row_is_an_orphan_once_older_than_the_grace(store: Vault) -> None:
    await full_recording(store)
    stray = blob_keys.recording_original("0" * 32)
    unreferenced = blob_keys.recording_artifact((await full_recording(store)).id, "left.bin")
    for key in (stray, unreferenced):
        await store.blobs.put_bytes(key, b"nobody's")
    # Young: it may be an upload whose row is about to be committed.
    assert (await store.fsck()).ok
    if isinstance(store.blobs, LocalBlobStore):
        for key in (stray, unreferenced):
            age(blob_path(store, key))
    report = (await store.fsck(grace_s=grace_for(store))).as_json()
    assert report["ok"] is False
    assert sorted((p["recording_id"], p["key"]) for p in report["orphans"]) == sorted(
        [("0" * 32, stray), (unreferenced.split("/")[1], unreferenced)]
    )
    assert all(p["kind"] == "blob" and p["size"] == 8 for p in report["orphans"])


@both
async def test_recordings_being_deleted_are_neither_missing_nor_orphans(store: Vault) -> None:
    recording = await full_recording(store)
    # A delete in progress (or cut short): tombstoned, some of its blobs already gone.
    await store.metadata.update_recording(
        store.workspace, recording.id, status=RecordingStatus.DELETING
    )
    await store.blobs.delete(blob_keys.recording_original(recording.id))
    assert (await store.fsck(grace_s=0)).ok


@both
async def test_an_artifact_replaced_under_a_check_is_not_corrupt(store: Vault) -> None:
    """put_artifact writes the bytes, then the row: between the two, the row has the old
    checksum. Young, that is a write in progress; old, it is a put that crashed in between."""
    recording = await full_recording(store)
    key = blob_keys.recording_artifact(recording.id, "summary.json")
    await store.blobs.put_bytes(key, b'{"summary": "newer"}')
    assert (await store.fsck()).ok
    (corrupt,) = (await store.fsck(grace_s=0)).corrupt
    assert corrupt.key == key


# ---- gc -----------------------------------------------------------------------------------


async def test_gc_removes_old_orphans_and_staging_leftovers_and_keeps_young_ones(
    vault: Vault,
) -> None:
    assert isinstance(vault.blobs, LocalBlobStore)
    kept = await full_recording(vault)
    old_orphan, young_orphan = (blob_keys.recording_original(c * 32) for c in "ab")
    for key in (old_orphan, young_orphan):
        await vault.blobs.put_bytes(key, b"orphan")
    age(blob_path(vault, old_orphan))
    old_staging, young_staging = (
        vault.blobs.staging / "old.part",
        vault.blobs.staging / "young.part",
    )
    old_staging.write_bytes(b"x" * 10)
    young_staging.write_bytes(b"y" * 10)
    age(old_staging)

    report = (await vault.collect_garbage()).as_json()

    assert [p["key"] for p in report["orphans"]] == [old_orphan]
    assert [p["key"] for p in report["staging"]] == [".staging/old.part"]
    assert report["removed"] == 2
    assert not old_staging.exists()
    assert young_staging.exists()
    assert young_orphan in await keys(vault)
    assert old_orphan not in await keys(vault)
    assert not blob_path(vault, old_orphan).parent.exists()  # its directory went with it
    # What is left is clean, and the kept recording reads back whole.
    assert (await vault.fsck()).ok
    assert (await vault.open_audio(kept.id)).size == kept.size_bytes


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)
async def test_gc_on_s3_removes_orphans_past_the_grace_only(store: Vault) -> None:
    kept = await full_recording(store)
    orphan = blob_keys.recording_original("a" * 32)
    await store.blobs.put_bytes(orphan, b"orphan")
    young = (await store.collect_garbage()).as_json()
    assert young["orphans"] == []
    assert orphan in await keys(store)
    assert young["staging_listed"] is False  # the bucket's lifecycle rule's job
    report = (await store.collect_garbage(grace_s=0)).as_json()
    assert [p["key"] for p in report["orphans"]] == [orphan]
    assert all(key.split("/")[1] == kept.id for key in await keys(store))
    assert (await store.fsck(grace_s=0)).ok


@both
async def test_after_a_sweep_nothing_is_left_and_fsck_is_clean(store: Vault) -> None:
    """A crash left everything at once: orphans, a cut-short delete, a job's scratch."""
    survivor = await full_recording(store)
    doomed = await full_recording(store)
    await store.metadata.update_recording(
        store.workspace, doomed.id, status=RecordingStatus.DELETING
    )
    await store.blobs.put_bytes(blob_keys.recording_original("c" * 32), b"orphan")
    await store.blobs.put_bytes(blob_keys.recording_artifact(survivor.id, "x.bin"), b"stray")
    scratch = store.settings.data_dir / "work" / ("d" * 32)
    (scratch / "audio").mkdir(parents=True)
    (scratch / "audio" / "pcm").write_bytes(b"0" * 100)
    if isinstance(store.blobs, LocalBlobStore):
        (store.blobs.staging / "crashed.part").write_bytes(b"partial")

    report = (await store.collect_garbage(grace_s=0)).as_json()

    assert report["interrupted_deletes"] == 1
    assert len(report["orphans"]) == 2
    assert report["scratch"] == ["d" * 32]
    assert not scratch.exists()
    assert {key.split("/")[1] for key in await keys(store)} == {survivor.id}
    if isinstance(store.blobs, LocalBlobStore):
        assert list(store.blobs.staging.iterdir()) == []
    assert (await store.fsck(grace_s=0)).as_json() == {
        "ok": True,
        "checked": 8,
        "corrupt": [],
        "missing": [],
        "orphans": [],
    }


async def test_gc_removes_scratch_of_finished_and_gone_jobs_only(vault: Vault) -> None:
    recording = await vault.create_recording(once(wav_bytes(1.0)), transcribe=False)
    live_job = await vault.transcribe(recording.id)  # queued: its worker may start any time
    work = vault.settings.data_dir / "work"
    gone, young, not_a_job = "e" * 32, "f" * 32, "notes"
    for name in (live_job.id, gone, young, not_a_job):
        (work / name).mkdir(parents=True)
        (work / name / "source").write_bytes(b"pcm")
        if name != young:
            age(work / name / "source")
            age(work / name)

    assert (await vault.collect_garbage()).scratch == [gone]
    assert sorted(p.name for p in work.iterdir()) == sorted([live_job.id, young, not_a_job])

    await vault.cancel_job(live_job.id)  # finished now: its scratch is stale
    assert (await vault.collect_garbage()).scratch == [live_job.id]
    assert sorted(p.name for p in work.iterdir()) == sorted([young, not_a_job])


@both
async def test_a_sweep_while_an_upload_is_in_flight_leaves_it_alone(store: Vault) -> None:
    audio = wav_bytes(2.0)
    sent_some, go_on = anyio.Event(), anyio.Event()

    async def held() -> AsyncIterator[bytes]:
        yield audio[:20_000]
        sent_some.set()
        await go_on.wait()
        yield audio[20_000:]

    uploaded: list[Recording] = []

    async def upload() -> None:
        uploaded.append(await store.create_recording(held(), transcribe=False))

    # A sweep that waited for the upload (which waits for the sweep) would wait forever.
    with within(60, "the sweep beside the upload in flight"):
        async with anyio.create_task_group() as group:
            group.start_soon(upload)
            await sent_some.wait()
            await anyio.wait_all_tasks_blocked()
            if isinstance(store.blobs, LocalBlobStore):
                (staged,) = store.blobs.staging.iterdir()
                age(staged)  # even an upload stalled for hours keeps its staging while alive
            report = (await store.collect_garbage(grace_s=0)).as_json()
            assert report["staging"] == []
            assert report["orphans"] == []
            assert (await store.fsck(grace_s=0)).ok
            go_on.set()
    (recording,) = uploaded
    assert await store.blobs.read_all(blob_keys.recording_original(recording.id)) == audio
    assert (await store.fsck(grace_s=0)).ok


@both
async def test_an_original_stored_before_its_row_survives_gc_within_the_grace(
    store: Vault,
) -> None:
    """create_recording stores the bytes, probes them, then commits the row: meanwhile the
    blob has no row. Within the grace it is an upload in progress, not an orphan."""
    key = blob_keys.recording_original("1" * 32)
    await store.blobs.put_bytes(key, wav_bytes(0.5))
    report = await store.collect_garbage()
    assert report.orphans == []
    assert key in await keys(store)
    assert (await store.fsck()).ok


# ---- the periodic sweeper -----------------------------------------------------------------


async def test_the_embedded_sweeper_runs_gc_periodically(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, sweep_interval_s=1, gc_grace_s=0)
    async with await Vault.open(settings) as vault:
        orphan = blob_keys.recording_original("2" * 32)
        await vault.blobs.put_bytes(orphan, b"orphan")
        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                # No workers: an API-only process on the embedded queue still sweeps.
                group.start_soon(run_workers, vault, 0)
                while orphan in await keys(vault):
                    await anyio.sleep(0.1)
                group.cancel_scope.cancel()
        assert (await vault.fsck()).ok


def test_procrastinate_sweeps_on_the_same_interval(tmp_path: Path) -> None:
    pytest.importorskip("procrastinate")
    from voxvault.jobs.procrastinate import (
        SWEEP_EVERY_S,
        SWEEP_TASK,
        ProcrastinateJobQueue,
        every,
    )
    from voxvault.metadata.sql import SqlMetadataStore

    metadata = SqlMetadataStore(f"sqlite:///{tmp_path / 'v.db'}")
    for every_s, cron in ((600, "*/10 * * * *"), (3600, "*/60 * * * *"), (None, None)):
        # Nothing connects before open(): the queue is only built here.
        queue = open_job_queue("postgresql://u@localhost/db", metadata, sweep_every_s=every_s)
        assert isinstance(queue, ProcrastinateJobQueue)
        tasks = queue.app.periodic_registry.periodic_tasks
        (sweep,) = [task for (name, _), task in tasks.items() if name == SWEEP_TASK]
        assert sweep.cron == (cron or every(SWEEP_EVERY_S))


@pytest.mark.parametrize("value", [0, 1, 30, 60, 600, 3600])
def test_sweep_interval_on_a_clock_is_accepted(value: int) -> None:
    assert Settings(sweep_interval_s=value).sweep_interval_s == value


@pytest.mark.parametrize("value", [7, 90, 420, 7200])
def test_sweep_interval_off_the_clock_is_refused(value: int) -> None:
    with pytest.raises(ValidationError, match="divisor of 60 s"):
        Settings(sweep_interval_s=value)


def test_sweep_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOXVAULT_GC_GRACE_S", "120")
    monkeypatch.setenv("VOXVAULT_SWEEP_INTERVAL_S", "0")
    settings = Settings()
    assert (settings.gc_grace_s, settings.sweep_interval_s) == (120, 0)


# ---- the CLI --------------------------------------------------------------------------------


def cli(data_dir: Path, *args: str) -> Result:
    return CliRunner().invoke(app, ["--data-dir", str(data_dir), *args])


def make_recording(data_dir: Path) -> Recording:
    async def go() -> Recording:
        async with await Vault.open(Settings(data_dir=data_dir)) as vault:
            return await full_recording(vault)

    return anyio.run(go)


def test_cli_fsck_json_and_exit_codes(data_dir: Path) -> None:
    recording = make_recording(data_dir)
    clean = cli(data_dir, "fsck", "--json")
    assert clean.exit_code == 0, clean.output
    assert json.loads(clean.stdout) == {
        "ok": True,
        "checked": 8,
        "corrupt": [],
        "missing": [],
        "orphans": [],
    }
    key = blob_keys.recording_original(recording.id)
    (data_dir / "blobs" / key).unlink()
    broken = cli(data_dir, "fsck", "--json")
    assert broken.exit_code == 1
    report = json.loads(broken.stdout)
    assert set(report) == {"ok", "checked", "corrupt", "missing", "orphans"}
    assert report["ok"] is False
    assert [(p["recording_id"], p["key"]) for p in report["missing"]] == [(recording.id, key)]


def test_cli_fsck_table_names_each_problem(data_dir: Path) -> None:
    recording = make_recording(data_dir)
    key = blob_keys.recording_playback(recording.id)
    (data_dir / "blobs" / key).unlink()
    result = cli(data_dir, "fsck")
    assert result.exit_code == 1
    out = " ".join(result.stdout.split())
    assert f"missing {recording.id} {key} (expected sha256" in out
    assert "checked 7 blobs: 0 corrupt, 1 missing, 0 orphans: problems found" in out
    assert cli(data_dir, "fsck").exit_code == 1


def test_cli_gc_removes_and_reports(data_dir: Path) -> None:
    make_recording(data_dir)
    staging = data_dir / "blobs" / ".staging" / "crashed.part"
    staging.write_bytes(b"partial")
    age(staging)
    orphan = data_dir / "blobs" / blob_keys.recording_original("3" * 32)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"orphan")
    age(orphan)
    result = cli(data_dir, "gc", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [p["key"] for p in report["orphans"]] == [blob_keys.recording_original("3" * 32)]
    assert [p["key"] for p in report["staging"]] == [".staging/crashed.part"]
    assert report["removed"] == 2
    assert not staging.exists()
    assert not orphan.exists()
    human = cli(data_dir, "gc")
    assert human.exit_code == 0
    assert "removed 0 orphaned blob(s), 0 staging leftover(s)" in " ".join(human.stdout.split())
    assert cli(data_dir, "fsck").exit_code == 0


async def test_gc_removes_expired_uploads_with_their_parts(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, upload_ttl=1)
    async with await Vault.open(settings) as vault:
        abandoned = await vault.uploads.create(100_000)
        await vault.uploads.append(abandoned.id, once(b"x" * 1000), offset=0)
        assert await keys(vault) != []
        # Expiry is the uploads service's clock: gc is run until the upload's second is up.
        with anyio.fail_after(30):
            while not (report := await vault.collect_garbage()).expired_uploads:
                await anyio.sleep(0.2)
        assert report.expired_uploads == 1
        assert await keys(vault) == []
        assert (await vault.fsck(grace_s=0)).ok


async def test_gc_removes_unrecorded_upload_parts_once_old_and_keeps_recorded_ones(
    data_dir: Path,
) -> None:
    async with await Vault.open(Settings(data_dir=data_dir)) as vault:
        live = await vault.uploads.create(100_000)
        await vault.uploads.append(live.id, once(b"x" * 1000), offset=0)
        recorded = await keys(vault)
        # A chunk whose process died before recording it, and one of an upload with no row.
        unrecorded = blob_keys.upload_part(live.id, "00001000-deadbeef")
        rowless = blob_keys.upload_part("f" * 32, "00000000-deadbeef")
        for key in (unrecorded, rowless):
            await vault.blobs.put_bytes(key, b"y" * 10)
        young = await vault.collect_garbage()  # within the grace: a chunk may be landing
        assert young.upload_parts == []
        old = await vault.collect_garbage(grace_s=0)
        assert sorted(old.upload_parts) == sorted([unrecorded, rowless])
        assert await keys(vault) == recorded
        state = await vault.uploads.get(live.id)
        assert state.offset == 1000
        assert (await vault.fsck(grace_s=0)).ok


async def test_gc_completes_a_full_upload_whose_completion_died(data_dir: Path) -> None:
    data = wav_bytes(seconds=1.0)
    async with await Vault.open(Settings(data_dir=data_dir)) as vault:
        upload = await vault.uploads.create(len(data), {"transcribe": "false"})
        # The last chunk lands and the upload is claimed for completion by a process that then
        # dies: the claim's last sign of life is older than the completion lease.
        name = "00000000-cafebabe"
        await vault.blobs.put_bytes(blob_keys.upload_part(upload.id, name), data)
        claimed_at = datetime.now(UTC) - timedelta(seconds=COMPLETION_LEASE_S + 5)
        full = await vault.uploads.store.append_part(
            upload,
            UploadPart(name=name, size=len(data)),
            now=claimed_at,
            expires_at=claimed_at + timedelta(days=1),
        )
        assert full is not None
        report = await vault.collect_garbage(grace_s=0)
        assert report.completed_uploads == [upload.recording_id]
        recording = await vault.get_recording(upload.recording_id)
        assert recording.sha256 == hashlib.sha256(data).hexdigest()
        assert recording.status is RecordingStatus.STORED
        assert [key for key in await keys(vault) if key.startswith("uploads/")] == []
        assert (await vault.fsck(grace_s=0)).ok

"""Crash safety of ingest: ``voxvault serve`` SIGKILLed at random moments while clients send
plain and resumable (tus) uploads, restarted on the same data each time (tests/crash.py).

After every restart: each recording a client was told about is listed and reads back its exact
bytes, and each recording listed at all is one attempt's complete bytes. At the end: every tus
upload resumed to the sha256 of its file, ``voxvault gc --grace 0`` leaves no orphans, staging
leftovers or parts of finished or terminated uploads, ``voxvault fsck --grace 0`` is clean, and
once abandoned uploads expire nothing is left of them either. A server started afterwards still
serves every acknowledged recording. On the embedded stack (SQLite, local files) and on
PostgreSQL with S3 (moto).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import stored_files
from tests.crash import (
    CHUNK_TYPE,
    RECORDING_ID,
    TUS,
    CrashingServer,
    CrashRun,
    b64,
    pick_seed,
)
from tests.media import wav_bytes
from tests.postgres import postgres_database
from tests.s3 import new_bucket
from tests.stacks import child_environment
from voxvault import Vault
from voxvault.api import create_app
from voxvault.errors import BackendUnavailable

pytestmark = pytest.mark.slow

MAX_DELAY_S = 0.3
PLAIN_CLIENTS = 2
TUS_CLIENTS = 3


@dataclass
class Stack:
    """Where a crash run keeps its data, and the test's own look at the blob store."""

    data_dir: Path
    env: dict[str, str]
    database_url: str
    kills: int
    blob_keys: Callable[[], list[str]]
    """Every blob's key, staging excluded."""
    staging: Callable[[], list[str]]
    """What unfinished puts left: local staging files, or S3's pending multipart uploads."""
    gc_sweeps_staging: bool


def local_files(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(params=["local", "postgres-s3"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    data_dir = tmp_path / "data"
    if request.param == "local":
        blobs = data_dir / "blobs"
        yield Stack(
            data_dir=data_dir,
            env={},
            database_url=f"sqlite:///{data_dir / 'voxvault.db'}",
            kills=10,
            blob_keys=lambda: [k for k in local_files(blobs) if not k.startswith(".staging/")],
            staging=lambda: local_files(blobs / ".staging"),
            gc_sweeps_staging=True,
        )
        return
    with ExitStack() as resources:
        database_url = resources.enter_context(postgres_database())
        bucket = resources.enter_context(new_bucket())
        prefix = f"{bucket.prefix}/"
        yield Stack(
            data_dir=data_dir,
            env=child_environment(
                {"VOXVAULT_DATABASE_URL": database_url, "VOXVAULT_BLOB_URL": bucket.url}
            ),
            database_url=database_url,
            kills=6,
            blob_keys=lambda: sorted(n.removeprefix(prefix) for n in bucket.object_names()),
            staging=bucket.pending_uploads,
            gc_sweeps_staging=False,
        )


def upload_parts(data_dir: Path) -> list[Path]:
    return [p for p in stored_files(data_dir) if "uploads" in p.relative_to(data_dir).parts]


def upload_ids_with_bytes(keys: list[str]) -> set[str]:
    return {key.split("/")[1] for key in keys if key.startswith("uploads/")}


def test_nothing_a_client_was_told_is_stored_is_lost_through_kills(stack: Stack) -> None:
    seed = pick_seed()
    server = CrashingServer(stack.data_dir, stack.env, stack.database_url)
    run = CrashRun(server, seed)
    try:
        run.run(kills=stack.kills, max_delay_s=MAX_DELAY_S, plain=PLAIN_CLIENTS, tus=TUS_CLIENTS)
    finally:
        server.stop()
    run.assert_no_violations()
    ledger = run.ledger
    counts = ledger.counts
    print(f"crash run: seed {seed}, {server.kills} kills; {run.summary()}")

    # The run went through the paths it is about: cut requests of both kinds, resumed uploads.
    assert server.kills == stack.kills
    assert counts.get("plain requests cut", 0) >= 1, run.fail_message("no plain upload was cut")
    assert counts.get("tus requests cut", 0) >= 1, run.fail_message("no tus request was cut")
    assert counts.get("tus stored after a cut", 0) >= 1, run.fail_message("no upload resumed")

    # Every tus upload a client knows of ended: a recording of its file's bytes, or terminated.
    assert set(ledger.tus_uploads) == set(ledger.tus_finished) | ledger.terminated, (
        run.fail_message("tus uploads neither finished nor terminated")
    )
    listed = {item["id"]: item for item in run.listed}
    for upload_id, recording_id in ledger.tus_finished.items():
        assert listed[recording_id]["sha256"] == ledger.tus_uploads[upload_id].sha256
    terminated_titles = {ledger.tus_uploads[u].title for u in ledger.terminated}
    assert not terminated_titles & {item["title"] for item in run.listed}, run.fail_message(
        "a terminated upload became a recording"
    )

    # The sweep, then the check, as an operator runs them on the stopped server's data.
    code, gc = server.cli("gc", "--grace", "0")
    assert code == 0, run.fail_message(f"gc: {gc}")
    code, fsck = server.cli("fsck", "--grace", "0")
    assert (code, fsck["ok"]) == (0, True), run.fail_message(f"fsck after gc: {fsck}")
    assert (fsck["corrupt"], fsck["missing"], fsck["orphans"]) == ([], [], [])

    keys = stack.blob_keys()
    recording_keys = {key for key in keys if key.startswith("recordings/")}
    assert recording_keys == {f"recordings/{rid}/original" for rid in listed}, run.fail_message(
        f"blobs under recordings/ besides the recordings' originals: {sorted(recording_keys)}"
    )
    assert not (set(keys) - recording_keys - {k for k in keys if k.startswith("uploads/")}), (
        run.fail_message(f"other blobs left: {keys}")
    )
    if stack.gc_sweeps_staging:
        assert stack.staging() == [], run.fail_message(f"staging left: {stack.staging()}")

    # Parts left may only be those of uploads whose creation answer a kill swallowed: their
    # clients never learnt the URL, and they wait for their expiry. (Judged at the end, so the
    # rest of the run is checked too.)
    rows = server.upload_rows()
    outlived = {
        upload_id: (rows.get(upload_id), [k for k in keys if k.startswith(f"uploads/{upload_id}/")])
        for upload_id in upload_ids_with_bytes(keys)
        if upload_id in ledger.tus_uploads or rows.get(upload_id) != "active"
    }
    abandoned = upload_ids_with_bytes(keys) - set(outlived)
    assert len(abandoned) <= counts.get("tus creations cut", 0), run.fail_message(
        f"more uploads unknown to their clients than creations cut: {abandoned}"
    )

    # Once every upload's time is up, the sweep removes them all, abandoned ones included.
    expiring = server.let_uploads_expire()
    code, gc = server.cli("gc", "--grace", "0")
    assert (code, gc["expired_uploads"]) == (0, expiring), run.fail_message(f"gc: {gc}")
    assert server.upload_rows() == {}
    assert upload_ids_with_bytes(stack.blob_keys()) == set()
    code, fsck = server.cli("fsck", "--grace", "0")
    assert (code, fsck["ok"]) == (0, True), run.fail_message(f"fsck after expiry: {fsck}")

    # A server started on what is left serves every acknowledged recording, byte for byte.
    server.start()
    try:
        run.check_visible(reread=True)
    finally:
        server.stop()
    assert {item["id"] for item in run.listed} == set(listed)

    assert not outlived, run.fail_message(
        "parts of finished or terminated uploads outlived them past gc --grace 0 "
        f"(upload id: state, keys): {outlived}"
    )


# ---- one crash point, pinned down ---------------------------------------------------------------
# A completion settles the upload's row, then removes its parts (``_settle`` in
# ``voxvault.uploads.completion``). A process that dies between the two leaves a completed upload
# with all its parts; the same state is made here without a kill, by a blob store that fails to
# remove them that once.


@pytest.mark.anyio
async def test_parts_of_an_upload_completed_just_before_a_crash_go_with_the_next_sweep(
    vault: Vault, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = wav_bytes(seconds=1.0)
    transport = httpx.ASGITransport(app=create_app(vault))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        created = await client.post(
            "/files/v1/uploads",
            headers={
                **TUS,
                "Upload-Length": str(len(data)),
                "Upload-Metadata": f"transcribe {b64('false')}",
            },
        )
        url = httpx.URL(created.headers["Location"]).path
        first = await client.patch(
            url, content=data[:1000], headers={**TUS, **CHUNK_TYPE, "Upload-Offset": "0"}
        )
        assert first.status_code == 204
        real_delete_prefix = type(vault.blobs).delete_prefix

        async def dies_before_removing_parts(store: Any, prefix: str) -> int:
            if prefix.startswith("uploads/"):
                raise BackendUnavailable("the process died here")
            return await real_delete_prefix(store, prefix)

        monkeypatch.setattr(type(vault.blobs), "delete_prefix", dies_before_removing_parts)
        last = await client.patch(
            url, content=data[1000:], headers={**TUS, **CHUNK_TYPE, "Upload-Offset": "1000"}
        )
        monkeypatch.setattr(type(vault.blobs), "delete_prefix", real_delete_prefix)
        # The recording is made; the parts left behind are the next sweep's.
        assert last.status_code == 204
        assert last.headers[RECORDING_ID]
        # What a restarted server answers: the recording is there, complete.
        state = await client.head(url, headers=TUS)
        recording_id = state.headers[RECORDING_ID]
        audio = await client.get(f"/v1/recordings/{recording_id}/audio")
        assert audio.content == data
    assert upload_parts(data_dir) != []  # the state a kill at that point leaves

    report = await vault.collect_garbage(grace_s=0)
    assert upload_parts(data_dir) == [], (
        f"gc --grace 0 kept the parts of completed upload {url.rsplit('/', 1)[1]} "
        f"(report: {report.as_json()})"
    )

"""Two API processes racing on the same recording end in one consistent state.

They run on the scale-out stack of the API suites (``tests/stacks.py``): two ``voxvault serve
--workers 0`` processes over one PostgreSQL database, S3 on moto, Redis events, and two workers,
because a DELETE racing with a transcription must also stop or outlive a job that a worker
really runs. Each request goes to a process chosen on purpose (``A`` or ``B``), many at once
(``asyncio.gather``), a few rounds each. The end state is read back from both processes and
checked in PostgreSQL and the bucket directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import httpx
import psycopg
import pytest

from tests.media import wav_bytes
from tests.stacks import FINISHED_JOBS, ScaleOutStack, delete_every_recording

pytestmark = pytest.mark.anyio

ROUNDS = 3
WRITERS = 12  # concurrent requests per race, split across the two processes
SETTLE_S = 120


@pytest.fixture
async def apis(scaleout_stack: ScaleOutStack) -> AsyncIterator[list[httpx.AsyncClient]]:
    """One client per API process: ``[A, B]``."""
    clients = [httpx.AsyncClient(base_url=api.url, timeout=60) for api in scaleout_stack.apis]
    try:
        yield clients
    finally:
        await delete_every_recording(clients[0])
        for http in clients:
            await http.aclose()
        scaleout_stack.check_alive()


async def upload(api: httpx.AsyncClient, *, transcribe: bool = False, seconds: float = 1.0) -> str:
    response = await api.post(
        "/v1/recordings",
        params={"transcribe": str(transcribe).lower(), "title": "raced"},
        content=wav_bytes(seconds=seconds),
        headers={"Content-Type": "audio/wav"},
    )
    assert response.status_code == 201, response.text
    recording_id: str = response.json()["id"]
    return recording_id


async def race(*requests: Awaitable[httpx.Response]) -> list[httpx.Response]:
    """All the requests at once; none may be a server error."""
    responses = await asyncio.gather(*requests)
    for response in responses:
        assert response.status_code < 500, (response.request.method, response.text)
    return list(responses)


def statuses(responses: list[httpx.Response]) -> list[int]:
    return sorted(response.status_code for response in responses)


# ---- what PostgreSQL and the bucket hold ---------------------------------------------------------


def rows_of(stack: ScaleOutStack, recording_id: str) -> dict[str, int]:
    """Rows that name the recording, per table: any table with a ``recording_id`` column, and
    the recording's own row."""
    found: dict[str, int] = {}
    with psycopg.connect(stack.database_url) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.columns"
            " WHERE table_schema = 'public' AND column_name = 'recording_id'"
        ).fetchall()
        for (table,) in tables:
            row = conn.execute(
                f'SELECT count(*) FROM "{table}" WHERE recording_id = %s',
                (recording_id,),
            ).fetchone()
            assert row is not None
            if row[0]:
                found[table] = row[0]
        own = conn.execute(
            "SELECT count(*) FROM recordings WHERE id = %s", (recording_id,)
        ).fetchone()
        assert own is not None
        if own[0]:
            found["recordings"] = own[0]
    return found


def live_queue_entries(stack: ScaleOutStack, job_ids: set[str]) -> list[tuple[str, str]]:
    """The procrastinate queue's entries of these jobs that are still to do or being done."""
    if not job_ids:
        return []
    with psycopg.connect(stack.database_url) as conn:
        rows = conn.execute(
            "SELECT args->>'job_id', status::text FROM procrastinate_jobs"
            " WHERE args->>'job_id' = ANY(%s) AND status IN ('todo', 'doing')",
            (sorted(job_ids),),
        ).fetchall()
    return [(str(job_id), str(status)) for job_id, status in rows]


def job_ids_of(stack: ScaleOutStack, recording_id: str) -> set[str]:
    with psycopg.connect(stack.database_url) as conn:
        rows = conn.execute("SELECT id FROM jobs WHERE recording_id = %s", (recording_id,))
        return {str(job_id) for (job_id,) in rows.fetchall()}


def keys_of(stack: ScaleOutStack, recording_id: str) -> list[str]:
    return [key for key in stack.stored_keys() if recording_id in key]


async def assert_gone_everywhere(
    stack: ScaleOutStack, apis: list[httpx.AsyncClient], recording_id: str, job_ids: set[str]
) -> None:
    """404 from both processes; once no job of it is queued or running any more, no row and
    no blob of it is left."""
    for api in apis:
        for path in ("", "/audio", "/transcript", "/artifacts", "/jobs"):
            response = await api.get(f"/v1/recordings/{recording_id}{path}")
            assert response.status_code == 404, (api.base_url, path, response.text)
    deadline = time.monotonic() + SETTLE_S
    while live_queue_entries(stack, job_ids):
        assert time.monotonic() < deadline, live_queue_entries(stack, job_ids)
        await asyncio.sleep(0.2)
    # A worker that was mid-run when the recording went must not write anything back after.
    await asyncio.sleep(1.0)
    assert rows_of(stack, recording_id) == {}
    assert keys_of(stack, recording_id) == []
    for job_id in job_ids:
        for api in apis:
            response = await api.get(f"/v1/jobs/{job_id}")
            assert response.status_code == 404 or response.json()["status"] in FINISHED_JOBS


async def wait_until_jobs_finish(api: httpx.AsyncClient, recording_id: str) -> list[Any]:
    deadline = time.monotonic() + SETTLE_S
    while True:
        response = await api.get(f"/v1/recordings/{recording_id}/jobs")
        assert response.status_code == 200, response.text
        jobs: list[Any] = response.json()["items"]
        if all(job["status"] in FINISHED_JOBS for job in jobs):
            return jobs
        assert time.monotonic() < deadline, jobs
        await asyncio.sleep(0.1)


# ---- the races -----------------------------------------------------------------------------------


@pytest.mark.parametrize("round_", range(ROUNDS))
async def test_concurrent_patches_end_in_one_written_state_on_both_processes(
    scaleout_stack: ScaleOutStack, apis: list[httpx.AsyncClient], round_: int
) -> None:
    recording_id = await upload(apis[0])
    url = f"/v1/recordings/{recording_id}"
    written = {(f"title {round_}-{n}", (f"tag-{n}", f"shared-{n % 3}")) for n in range(WRITERS)}
    patches = [{"title": title, "tags": list(tags)} for title, tags in written]
    responses = await race(*(apis[n % 2].patch(url, json=patch) for n, patch in enumerate(patches)))
    assert statuses(responses) == [200] * WRITERS
    # Each answer is the state its own PATCH wrote, whole.
    for response, patch in zip(responses, patches, strict=True):
        assert (response.json()["title"], response.json()["tags"]) == (
            patch["title"],
            patch["tags"],
        )
    seen = [(await api.get(url)).json() for api in apis]
    assert seen[0] == seen[1]
    assert (seen[0]["title"], tuple(seen[0]["tags"])) in written
    # The list (tags are rows of their own) agrees with the record.
    for tag in seen[0]["tags"]:
        listed = (await apis[1].get("/v1/recordings", params={"tag": tag})).json()["items"]
        assert [item["id"] for item in listed] == [recording_id]
    for title, tags in written:
        if title != seen[0]["title"]:
            listed = (await apis[0].get("/v1/recordings", params={"tag": tags[0]})).json()
            assert listed["items"] == []


@pytest.mark.parametrize("round_", range(ROUNDS))
async def test_delete_racing_patches_leaves_the_recording_gone_everywhere(
    scaleout_stack: ScaleOutStack, apis: list[httpx.AsyncClient], round_: int
) -> None:
    recording_id = await upload(apis[0])
    url = f"/v1/recordings/{recording_id}"
    artifact = await apis[1].put(f"{url}/artifacts/notes.txt", content=b"notes")
    assert artifact.status_code == 200, artifact.text
    patches = [
        apis[n % 2].patch(url, json={"title": f"patched {n}", "tags": [f"p{n}"]})
        for n in range(WRITERS)
    ]
    deletes = [apis[(round_ + n) % 2].delete(url) for n in range(2)]
    responses = await race(*patches[: WRITERS // 2], *deletes, *patches[WRITERS // 2 :])
    delete_statuses = statuses(responses[WRITERS // 2 : WRITERS // 2 + 2])
    assert delete_statuses in ([204, 404], [204, 204]), delete_statuses
    assert set(statuses(responses)) <= {200, 204, 404}
    await assert_gone_everywhere(scaleout_stack, apis, recording_id, set())


@pytest.mark.parametrize("round_", range(ROUNDS))
async def test_delete_racing_transcribe_leaves_no_job_no_blob_no_row(
    scaleout_stack: ScaleOutStack, apis: list[httpx.AsyncClient], round_: int
) -> None:
    recording_id = await upload(apis[0], seconds=3.0)
    url = f"/v1/recordings/{recording_id}"
    if round_ > 0:
        # Later rounds delete while a run is under way: queued, or on a worker already.
        first = await apis[1].post(f"{url}/transcribe")
        assert first.status_code == 202, first.text
        if round_ == 2:
            deadline = time.monotonic() + SETTLE_S
            while (await apis[0].get(f"{url}/jobs")).json()["items"][0]["status"] == "queued":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
    transcribes = [apis[n % 2].post(f"{url}/transcribe") for n in range(3)]
    deletes = [apis[(n + 1) % 2].delete(url) for n in range(2)]
    job_ids_before = job_ids_of(scaleout_stack, recording_id)
    responses = await race(transcribes[0], deletes[0], transcribes[1], transcribes[2], deletes[1])
    assert set(statuses(responses)) <= {202, 204, 404, 409}
    assert 204 in statuses(responses)
    started = {r.json()["id"] for r in responses if r.status_code == 202}
    await assert_gone_everywhere(scaleout_stack, apis, recording_id, job_ids_before | started)


@pytest.mark.parametrize("round_", range(ROUNDS))
async def test_concurrent_transcribe_starts_exactly_one_job(
    scaleout_stack: ScaleOutStack, apis: list[httpx.AsyncClient], round_: int
) -> None:
    recording_id = await upload(apis[round_ % 2])
    url = f"/v1/recordings/{recording_id}"
    started: list[str] = []
    for _ in range(2):  # a second race once the first run has finished
        responses = await race(*(apis[n % 2].post(f"{url}/transcribe") for n in range(WRITERS)))
        assert statuses(responses) == [202] + [409] * (WRITERS - 1)
        (accepted,) = [r.json() for r in responses if r.status_code == 202]
        for refused in (r for r in responses if r.status_code == 409):
            assert refused.json()["error"]["code"] == "conflict"
        started.append(accepted["id"])
        jobs = await wait_until_jobs_finish(apis[1], recording_id)
        assert [job["id"] for job in jobs] == list(reversed(started))
        assert {job["status"] for job in jobs} == {"succeeded"}
    versions = (await apis[0].get(f"{url}/transcript/versions")).json()["items"]
    assert [v["version"] for v in versions] == [1, 2]
    assert [(await api.get(url)).json()["status"] for api in apis] == ["ready", "ready"]


@pytest.mark.parametrize("round_", range(ROUNDS))
async def test_transcript_puts_racing_patches_keep_every_version_and_one_title(
    scaleout_stack: ScaleOutStack, apis: list[httpx.AsyncClient], round_: int
) -> None:
    recording_id = await upload(apis[0])
    url = f"/v1/recordings/{recording_id}"
    texts = [f"version text {round_}-{n}" for n in range(WRITERS // 2)]
    titles = [f"title {round_}-{n}" for n in range(WRITERS // 2)]
    puts = [
        apis[n % 2].put(
            f"{url}/transcript", json={"segments": [{"start": 0, "end": 1, "text": text}]}
        )
        for n, text in enumerate(texts)
    ]
    patches = [
        apis[(n + 1) % 2].patch(url, json={"title": title}) for n, title in enumerate(titles)
    ]
    mixed = [request for pair in zip(puts, patches, strict=True) for request in pair]
    responses = await race(*mixed)
    put_responses, patch_responses = responses[0::2], responses[1::2]
    assert statuses(put_responses) == [201] * len(texts)
    assert statuses(patch_responses) == [200] * len(titles)
    numbers = sorted(r.json()["version"] for r in put_responses)
    assert numbers == list(range(1, len(texts) + 1))  # one version each, none lost or doubled
    by_version = {r.json()["version"]: r.json()["segments"][0]["text"] for r in put_responses}

    seen = [(await api.get(url)).json() for api in apis]
    assert seen[0] == seen[1]
    assert seen[0]["title"] in titles
    assert seen[0]["status"] == "ready"
    for api in apis:
        current = (await api.get(f"{url}/transcript")).json()
        assert current["version"] == len(texts)
        assert current["segments"][0]["text"] == by_version[len(texts)]
        assert (await api.get(f"{url}/transcript.txt")).text == f"{by_version[len(texts)]}\n"
    # The exported files follow the newest version, whichever process wrote it last.
    for api in apis:
        exported = (await api.get(f"{url}/artifacts/transcript.txt")).text
        assert exported == f"{by_version[len(texts)]}\n"

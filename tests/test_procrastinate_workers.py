"""Workers on the procrastinate queue, as separate ``voxvault worker`` processes behind an API
that runs none (``serve --workers 0``), all on one PostgreSQL database: the scale-out layout.

The worker that holds a job is SIGKILLed mid-transcription; another worker must finish the job
within two minutes, with exactly one transcript version.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psycopg
import pytest

from tests.conftest import VOXVAULT_BIN, LiveServer
from tests.postgres import postgres_database
from tests.test_pipeline_server import (
    LIBRARY,
    TRANSCRIBE_START,
    assert_transcribed,
    jobs_of,
    library,
    upload,
    wait_for_job,
    wait_for_status,
)

pytestmark = pytest.mark.slow
__all__ = ["library"]  # a fixture of the pipeline tests, used here too

LEASE_S = 5
RETRY_WITHIN_S = 120  # the bound for a dead worker's job to run again


@contextmanager
def worker_process(
    data_dir: Path, env: dict[str, str], name: str
) -> Iterator[subprocess.Popen[bytes]]:
    log = data_dir.parent / f"{name}.log"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(VOXVAULT_BIN), "--data-dir", str(data_dir), "worker", "--concurrency", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def lease_owner(database_url: str, job_id: str) -> str | None:
    """Who holds the job's lease: ``host/pid/token/index``, or None."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT lease_owner FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return None if row[0] is None else str(row[0])


def lease_holder_pid(database_url: str, job_id: str) -> int:
    owner = lease_owner(database_url, job_id)
    assert owner is not None
    return int(owner.split("/")[1])


def test_a_killed_worker_s_job_is_finished_by_another_worker_once(
    data_dir: Path, library: Path
) -> None:
    with ExitStack() as stack:
        url = stack.enter_context(postgres_database())
        env = {
            "VOXVAULT_DATABASE_URL": url,
            "VOXVAULT_QUEUE_URL": url,
            "VOXVAULT_JOB_LEASE_S": str(LEASE_S),
        }
        api = LiveServer(data_dir, env=env, args=["--workers", "0"])
        stack.callback(api.stop)
        workers = [
            stack.enter_context(worker_process(data_dir, env, f"worker-{n}")) for n in (1, 2)
        ]

        recording = upload(api.url, library.read_bytes(), "library.wav")
        recording_id = recording["id"]
        job = wait_for_job(
            api.url,
            recording_id,
            lambda job: job["stage"] == "transcribe" and job["progress"] > TRANSCRIBE_START + 0.01,
        )
        assert (job["status"], job["attempts"]) == ("running", 1)
        holder = lease_holder_pid(url, job["id"])
        (victim,) = [w for w in workers if w.pid == holder]
        (survivor,) = [w for w in workers if w.pid != holder]
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=10) == -signal.SIGKILL
        killed_at = time.monotonic()

        wait_for_job(api.url, recording_id, lambda j: j["attempts"] == 2, timeout=RETRY_WITHIN_S)
        assert time.monotonic() - killed_at < RETRY_WITHIN_S
        finished = wait_for_status(api.url, recording_id, timeout=180)
        assert finished["status"] == "ready", finished
        jobs = jobs_of(api.url, recording_id)
        assert len(jobs) == 1
        assert jobs[0]["id"] == job["id"]
        assert (jobs[0]["status"], jobs[0]["attempts"]) == ("succeeded", 2)
        assert lease_owner(url, job["id"]) is None
        transcript = assert_transcribed(api.url, recording_id, LIBRARY)
        assert transcript["job_id"] == job["id"]
        assert survivor.poll() is None
        assert api.process.poll() is None


def test_an_api_with_its_own_workers_runs_them_on_the_queue_and_stops_cleanly(
    data_dir: Path, library: Path
) -> None:
    with postgres_database() as url:
        env = {"VOXVAULT_DATABASE_URL": url, "VOXVAULT_QUEUE_URL": url}
        api = LiveServer(data_dir, env=env, args=["--workers", "1"])
        try:
            recording = upload(api.url, library.read_bytes(), "library.wav")
            finished = wait_for_status(api.url, recording["id"])
            assert finished["status"] == "ready", finished
            assert_transcribed(api.url, recording["id"], LIBRARY)
        finally:
            api.process.terminate()
            # uvicorn shuts down gracefully, then re-raises the signal it caught.
            assert api.process.wait(timeout=30) in (0, -signal.SIGTERM)
        with psycopg.connect(url) as conn:  # the worker said goodbye to the cluster
            row = conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone()
        assert row == (0,)


def test_a_worker_stopped_with_sigterm_hands_its_job_to_another_at_once(
    data_dir: Path, library: Path
) -> None:
    long_lease = 600  # far longer than the test may wait: only a hand-back explains a retry
    with ExitStack() as stack:
        url = stack.enter_context(postgres_database())
        env = {
            "VOXVAULT_DATABASE_URL": url,
            "VOXVAULT_QUEUE_URL": url,
            "VOXVAULT_JOB_LEASE_S": str(long_lease),
        }
        api = LiveServer(data_dir, env=env, args=["--workers", "0"])
        stack.callback(api.stop)
        first = stack.enter_context(worker_process(data_dir, env, "first"))
        recording = upload(api.url, library.read_bytes(), "library.wav")
        job = wait_for_job(
            api.url,
            recording["id"],
            lambda job: job["stage"] == "transcribe" and job["progress"] > TRANSCRIBE_START + 0.01,
        )
        first.terminate()
        assert first.wait(timeout=30) in (0, 1, -signal.SIGTERM)
        assert lease_owner(url, job["id"]) is not None  # still its row, its lease ended
        stack.enter_context(worker_process(data_dir, env, "second"))
        wait_for_job(api.url, recording["id"], lambda j: j["attempts"] == 2, timeout=120)
        finished = wait_for_status(api.url, recording["id"], timeout=180)
        assert finished["status"] == "ready", finished
        assert_transcribed(api.url, recording["id"], LIBRARY)

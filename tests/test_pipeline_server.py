"""The transcription pipeline end to end, against real ``voxvault serve`` processes: a server
killed mid-transcription, progress as Server-Sent Events, a separate ``voxvault worker``,
``voxvault ingest`` with and without a server, and media that only fails once decoded."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from tests.conftest import VOXVAULT_BIN, LiveServer, run_voxvault
from tests.media import encode_audio, speak, wav_bytes
from voxvault.cli import app
from voxvault.pipeline.steps import StageProgress, overall_progress, pipeline_steps

pytestmark = pytest.mark.slow

FOX = "The quick brown fox jumps over the lazy dog. Storage should never lose a recording."
# About forty seconds of speech: more than one 30 s window of the speech engine, so the
# transcribe step reports progress before it ends.
LIBRARY = " ".join(
    [
        "The library opens at nine in the morning and closes at six in the evening.",
        "Every visitor must sign the register at the front desk.",
        "Children under twelve need an adult with them at all times.",
        "The reading room on the second floor is reserved for quiet study.",
        "Books may be borrowed for three weeks and renewed twice online.",
        "Please return the keys to the front desk before you leave.",
        "The garden behind the building is open on weekends during the summer.",
        "Parking is free for the first two hours on every weekday.",
        "Printing costs ten cents a page and copies are made at the counter.",
        "Lost items are kept in the office for one month.",
    ]
)
STAGES = ["probe", "normalize", "transcribe", "export", "playback"]
TRANSCRIPT_FILES = {f"transcript.{ext}" for ext in ("json", "srt", "vtt", "txt", "md")}
EVENT_KEYS = {"type", "status", "stage", "progress", "job_id", "error"}
# Overall progress when the transcribe step starts (probe and normalize done).
TRANSCRIBE_START = overall_progress(pipeline_steps(), StageProgress(stage="transcribe"))
INGEST_TIMEOUT_S = 180


def normalized(text: str) -> str:
    return " ".join(re.sub(r"[^a-z ]", " ", text.lower()).split())


# ---- speech ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About six seconds of speech."""
    return speak(FOX, tmp_path_factory.mktemp("speech") / "fox.wav")


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About forty seconds of speech."""
    return speak(LIBRARY, tmp_path_factory.mktemp("speech") / "library.wav")


# ---- HTTP helpers ---------------------------------------------------------------------------


def upload(
    url: str,
    data: bytes,
    filename: str,
    *,
    content_type: str = "audio/wav",
    transcribe: bool = True,
) -> dict[str, Any]:
    params = {"filename": filename, "transcribe": str(transcribe).lower()}
    response = httpx.post(
        f"{url}/v1/recordings",
        params=params,
        content=data,
        headers={"Content-Type": content_type},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    recording: dict[str, Any] = response.json()
    assert recording["status"] == ("queued" if transcribe else "stored")
    return recording


def get_json(url: str) -> Any:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def jobs_of(url: str, recording_id: str) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = get_json(f"{url}/v1/recordings/{recording_id}/jobs")["items"]
    return jobs


def wait_for_status(url: str, recording_id: str, *, timeout: float = 120) -> dict[str, Any]:
    """Poll the recording until it is ready or failed."""
    deadline = time.monotonic() + timeout
    while True:
        recording: dict[str, Any] = get_json(f"{url}/v1/recordings/{recording_id}")
        if recording["status"] in ("ready", "failed"):
            return recording
        assert time.monotonic() < deadline, f"still {recording['status']} after {timeout} s"
        time.sleep(0.1)


def wait_for_job(
    url: str, recording_id: str, until: Callable[[dict[str, Any]], bool], *, timeout: float = 120
) -> dict[str, Any]:
    """Poll the recording's newest job until ``until`` holds; fail if it finishes first."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = jobs_of(url, recording_id)
        if jobs and until(jobs[0]):
            return jobs[0]
        assert not jobs or jobs[0]["status"] in ("queued", "running"), jobs[0]
        assert time.monotonic() < deadline, f"job never got there: {jobs}"
        time.sleep(0.05)


def assert_says(text: str, script: str, share: float = 0.7) -> None:
    """The transcript has most longer words of the script: tiny.en mishears a few ("round fox"),
    and the test speech differs a little from run to run (sox dithers)."""
    expected = {word for word in normalized(script).split() if len(word) >= 4}
    missing = expected - set(normalized(text).split())
    assert len(missing) <= (1 - share) * len(expected), (sorted(missing), text)


def assert_transcribed(url: str, recording_id: str, script: str) -> dict[str, Any]:
    """One pipeline-made transcript version saying the script, and its five files."""
    versions = get_json(f"{url}/v1/recordings/{recording_id}/transcript/versions")["items"]
    assert len(versions) == 1, versions
    transcript: dict[str, Any] = get_json(f"{url}/v1/recordings/{recording_id}/transcript")
    assert transcript["version"] == versions[0]["version"] == 1
    assert (transcript["engine"], transcript["model"]) == ("faster-whisper", "tiny.en")
    assert_says(" ".join(segment["text"] for segment in transcript["segments"]), script)
    artifacts = get_json(f"{url}/v1/recordings/{recording_id}/artifacts")["items"]
    assert {artifact["name"] for artifact in artifacts} >= TRANSCRIPT_FILES
    exported = httpx.get(f"{url}/v1/recordings/{recording_id}/artifacts/transcript.txt")
    assert exported.status_code == 200
    assert_says(exported.text, script)
    return transcript


# ---- Server-Sent Events ---------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    id: str | None
    data: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.data.get(key)


def parse_sse(lines: Iterable[str], deadline: float) -> Iterator[Event]:
    """Events as sent, each with its own ``id:`` field (None when it had none)."""
    event_id: str | None = None
    data: list[str] = []
    for line in lines:
        assert time.monotonic() < deadline, "the event stream did not end"
        if line.startswith(":"):  # keep-alive comment
            continue
        if line:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "id":
                event_id = value
            elif field == "data":
                data.append(value)
            continue
        if data:
            parsed = json.loads("\n".join(data))
            assert isinstance(parsed, dict)
            yield Event(event_id, parsed)
        event_id, data = None, []


@contextmanager
def event_stream(
    url: str, recording_id: str, *, last_event_id: str | None = None, timeout: float = 120
) -> Iterator[Iterator[Event]]:
    """``GET /v1/recordings/{id}/events``, read as it comes."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    deadline = time.monotonic() + timeout
    with httpx.stream(
        "GET",
        f"{url}/v1/recordings/{recording_id}/events",
        headers=headers,
        timeout=httpx.Timeout(30),
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield parse_sse(response.iter_lines(), deadline)


def read_events(url: str, recording_id: str, *, last_event_id: str | None = None) -> list[Event]:
    """Every event until the server ends the stream by itself."""
    with event_stream(url, recording_id, last_event_id=last_event_id) as events:
        return list(events)


def assert_well_formed(events: list[Event]) -> None:
    for event in events:
        assert set(event.data) <= EVENT_KEYS, event
        assert {"type", "status", "progress"} <= set(event.data), event
        assert 0.0 <= event["progress"] <= 1.0, event
        if event["type"] == "progress":
            assert event["status"] == "processing", event
            assert event["stage"] in STAGES, event
    ids = [event.id for event in events if event.id is not None]
    assert ids == sorted(ids), ids
    assert len(set(ids)) == len(ids), ids


def assert_orderly_run(events: list[Event], job_id: str) -> None:
    """Progress only grows while processing, stages come in pipeline order, ``ready`` ends."""
    assert_well_formed(events)
    assert all(event["job_id"] == job_id for event in events), events
    processing = [event["progress"] for event in events if event["status"] == "processing"]
    assert processing, events
    assert processing == sorted(processing), events
    stages = [STAGES.index(event["stage"]) for event in events if event["stage"] is not None]
    assert stages == sorted(stages), events
    assert STAGES.index("transcribe") in stages, events  # seconds long: never skipped
    *before, last = events
    assert (last["status"], last["progress"]) == ("ready", 1.0), events
    assert all(event["status"] not in ("ready", "failed") for event in before), events


# ---- one server and one finished run for the event-stream tests ------------------------------


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with pytest.MonkeyPatch.context() as env:
        for name in list(os.environ):
            if name.startswith("VOXVAULT_"):
                env.delenv(name)
        server = LiveServer(tmp_path_factory.mktemp("shared") / "data")
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class FinishedRun:
    url: str
    recording_id: str
    job_id: str
    events: list[Event]


@pytest.fixture(scope="module")
def finished_run(shared_server: LiveServer, fox: Path) -> FinishedRun:
    """Speech uploaded, its event stream followed from right after the upload to its end."""
    url = shared_server.url
    recording = upload(url, fox.read_bytes(), "fox.wav")
    events = read_events(url, recording["id"])
    jobs = jobs_of(url, recording["id"])
    assert len(jobs) == 1
    return FinishedRun(url, recording["id"], jobs[0]["id"], events)


def test_events_follow_a_run_from_a_snapshot_to_ready(finished_run: FinishedRun) -> None:
    events = finished_run.events
    first = events[0]
    assert first["type"] == "snapshot"
    assert first.id is None  # the state read from the database, not a bus event
    assert first["status"] in ("queued", "processing")
    assert {"type", "status", "progress", "job_id"} <= set(first.data)
    assert_orderly_run(events, finished_run.job_id)
    # What the stream said is what the API says.
    recording = get_json(f"{finished_run.url}/v1/recordings/{finished_run.recording_id}")
    assert recording["status"] == "ready"
    job = get_json(f"{finished_run.url}/v1/jobs/{finished_run.job_id}")
    assert (job["status"], job["attempts"], job["progress"]) == ("succeeded", 1, 1.0)
    assert_transcribed(finished_run.url, finished_run.recording_id, FOX)


def test_a_late_subscriber_gets_one_snapshot_and_the_stream_closes(
    finished_run: FinishedRun,
) -> None:
    url, recording_id = finished_run.url, finished_run.recording_id
    for last_event_id in (None, "0000000000001-000000", "not-an-id", "9" * 200):
        events = read_events(url, recording_id, last_event_id=last_event_id)
        assert len(events) == 1, (last_event_id, events)
        (event,) = events
        assert event.id is None
        assert event.data == {
            "type": "snapshot",
            "status": "ready",
            "progress": 1.0,
            "job_id": finished_run.job_id,
        }


def test_resuming_after_the_end_still_says_ready(finished_run: FinishedRun) -> None:
    mid_run = next(e.id for e in finished_run.events if e.id and e["status"] == "processing")
    events = read_events(finished_run.url, finished_run.recording_id, last_event_id=mid_run)
    assert events, "an empty stream: an EventSource reconnects forever, never told it is ready"
    assert all(event.id is None or event.id > mid_run for event in events), events
    assert (events[-1]["status"], events[-1]["progress"]) == ("ready", 1.0)


def test_resuming_mid_run_sends_only_newer_events(shared_server: LiveServer, fox: Path) -> None:
    url = shared_server.url
    recording = upload(url, fox.read_bytes(), "resume.wav")
    with event_stream(url, recording["id"]) as stream:
        seen: list[Event] = []
        for event in stream:
            seen.append(event)
            if event.id is not None and event["status"] == "processing":
                break  # the connection drops here, mid-run
    last_id = seen[-1].id
    assert last_id is not None, seen
    resumed = read_events(url, recording["id"], last_event_id=last_id)
    assert resumed, "nothing after the reconnect"
    # Retained events after the id, then live ones: nothing at or before the id. (Events
    # without an id are the state re-read from the database when the bus was quiet a second.)
    assert all(event.id > last_id for event in resumed if event.id is not None), resumed
    assert all(event["type"] == "snapshot" for event in resumed if event.id is None), resumed
    assert_orderly_run(seen + resumed, jobs_of(url, recording["id"])[0]["id"])


def test_a_recording_not_transcribed_gets_one_stored_snapshot(shared_server: LiveServer) -> None:
    url = shared_server.url
    recording = upload(url, wav_bytes(seconds=1.0), "tone.wav", transcribe=False)
    events = read_events(url, recording["id"])
    assert [event.data for event in events] == [
        {"type": "snapshot", "status": "stored", "progress": 0.0}
    ]
    assert jobs_of(url, recording["id"]) == []


def test_events_of_an_unknown_recording_are_a_json_404(shared_server: LiveServer) -> None:
    response = httpx.get(
        f"{shared_server.url}/v1/recordings/{'0' * 32}/events",
        headers={"Accept": "text/event-stream"},
        timeout=10,
    )
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "not_found"


# ---- a server killed mid-transcription --------------------------------------------------------


def test_a_server_killed_mid_transcription_finishes_the_job_once_after_restart(
    data_dir: Path, library: Path
) -> None:
    env = {"VOXVAULT_JOB_LEASE_S": "5"}
    first = LiveServer(data_dir, env=env)
    second: LiveServer | None = None
    try:
        recording = upload(first.url, library.read_bytes(), "library.wav")
        recording_id = recording["id"]
        assert recording["duration_s"] > 32  # two windows of the engine
        job = wait_for_job(
            first.url,
            recording_id,
            lambda job: job["stage"] == "transcribe" and job["progress"] > TRANSCRIBE_START + 0.01,
        )
        assert (job["status"], job["attempts"]) == ("running", 1)
        # LiveServer runs the voxvault script itself (no shell), so this is the server.
        os.kill(first.process.pid, signal.SIGKILL)
        assert first.process.wait(timeout=10) == -signal.SIGKILL
        scratch = data_dir / "work" / job["id"]
        assert scratch.is_dir()  # the killed run left its decoded audio behind

        second = LiveServer(data_dir, env=env)
        finished = wait_for_status(second.url, recording_id, timeout=180)
        assert finished["status"] == "ready", finished
        assert finished["error"] is None
        jobs = jobs_of(second.url, recording_id)
        assert len(jobs) == 1
        assert jobs[0]["id"] == job["id"]
        assert (jobs[0]["status"], jobs[0]["attempts"]) == ("succeeded", 2)
        transcript = assert_transcribed(second.url, recording_id, LIBRARY)
        assert transcript["job_id"] == job["id"]
        work = data_dir / "work"
        assert not work.exists() or list(work.iterdir()) == []
        assert second.process.poll() is None
    finally:
        first.stop()
        if second is not None:
            second.stop()


# ---- a worker in its own process ---------------------------------------------------------------


def test_a_separate_worker_process_runs_the_pipeline_the_api_streams_it(
    data_dir: Path, library: Path
) -> None:
    # The API sees another process's progress by re-reading the stores each second, so the
    # speech is long enough (forty seconds) for its transcription to span such a read.
    server = LiveServer(data_dir, args=["--workers", "0"])
    log = data_dir.parent / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [str(VOXVAULT_BIN), "--data-dir", str(data_dir), "worker", "--concurrency", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        recording = upload(server.url, library.read_bytes(), "library.wav")
        events = read_events(server.url, recording["id"])
        assert worker.poll() is None, log.read_text()
        jobs = jobs_of(server.url, recording["id"])
        assert len(jobs) == 1
        assert (jobs[0]["status"], jobs[0]["attempts"]) == ("succeeded", 1)
        # The worker's events stay in its process: the API sends what it reads from the stores.
        assert events[0]["type"] == "snapshot"
        assert all(event["type"] == "snapshot" for event in events), events
        assert any(event["status"] == "processing" for event in events), events
        assert_orderly_run(events, jobs[0]["id"])
        assert_transcribed(server.url, recording["id"], LIBRARY)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        server.stop()


# ---- voxvault ingest ---------------------------------------------------------------------------


def cli(*args: str) -> Result:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def test_ingest_through_a_server_waits_until_ready(
    shared_server: LiveServer, tmp_path: Path, fox: Path
) -> None:
    unused = tmp_path / "unused"
    # In a child process: the command follows the run's events for as long as the server
    # sends them, so only a deadline of the test's own ends a run that never finishes.
    result = run_voxvault(
        "--data-dir",
        str(unused),
        "ingest",
        "--server",
        shared_server.url,
        str(fox),
        "--json",
        timeout=INGEST_TIMEOUT_S,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    (recording,) = json.loads(result.stdout)
    assert recording["status"] == "ready", recording
    assert recording["filename"] == "fox.wav"
    assert_transcribed(shared_server.url, recording["id"], FOX)
    assert not unused.exists()  # everything went through the server


def test_ingest_without_a_server_runs_the_pipeline_itself(data_dir: Path, fox: Path) -> None:
    result = cli("--data-dir", str(data_dir), "ingest", str(fox), "--json")
    (recording,) = json.loads(result.stdout)
    assert recording["status"] == "ready", recording
    assert recording["error"] is None
    shown = json.loads(cli("--data-dir", str(data_dir), "show", recording["id"]).stdout)
    assert len(shown["transcript_versions"]) == 1
    assert shown["transcript_versions"][0]["engine"] == "faster-whisper"
    assert {artifact["name"] for artifact in shown["artifacts"]} >= TRANSCRIPT_FILES
    exported = cli("--data-dir", str(data_dir), "export", recording["id"], "--format", "txt")
    assert_says(exported.stdout, FOX)


# ---- media that fails only once decoded --------------------------------------------------------


def test_media_that_fails_to_decode_fails_once_and_the_server_stays_healthy(
    shared_server: LiveServer,
) -> None:
    url = shared_server.url
    # A real Ogg Opus file, then garbage: the upload's probe decodes its first frames, the
    # pipeline's full decode runs into the garbage.
    ogg = encode_audio("ogg", "libopus", seconds=2.0, rate=48000)
    damaged = ogg + random.Random(7).randbytes(400_000)
    recording = upload(url, damaged, "damaged.ogg", content_type="audio/ogg")

    failed = wait_for_status(url, recording["id"])
    assert failed["status"] == "failed", failed
    error = failed["error"]
    assert isinstance(error, str)
    assert error.strip()
    assert "Traceback" not in error
    assert "\n" not in error
    jobs = jobs_of(url, recording["id"])
    assert len(jobs) == 1
    assert (jobs[0]["status"], jobs[0]["attempts"], jobs[0]["error"]) == ("failed", 1, error)
    events = read_events(url, recording["id"])
    assert [event.data for event in events] == [
        {
            "type": "snapshot",
            "status": "failed",
            "progress": 0.0,
            "job_id": jobs[0]["id"],
            "error": error,
        }
    ]
    versions = get_json(f"{url}/v1/recordings/{recording['id']}/transcript/versions")
    assert versions["items"] == []

    assert shared_server.process.poll() is None
    health = httpx.get(f"{url}/healthz", timeout=10)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    # The worker is still there for the next upload.
    after = upload(url, wav_bytes(seconds=1.0), "tone.wav")
    assert wait_for_status(url, after["id"])["status"] == "ready"

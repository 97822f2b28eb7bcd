"""The transcription pipeline in one process: real faster-whisper (tiny.en) on generated speech.

Workers are driven one job at a time (``Worker.run_one``) so that each test controls when work
happens; the server-level behaviour (SIGKILL, SSE over HTTP) is in ``test_pipeline_server.py``.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import av
import httpx
import numpy as np
import psutil
import pytest

from tests.conftest import stored_files
from tests.media import riff_declaring, speak, wav_bytes
from voxvault import RecordingStatus, Vault
from voxvault.api import create_app
from voxvault.errors import Conflict, NotFound
from voxvault.events import ProgressEvent
from voxvault.jobs import Job, JobStatus
from voxvault.media import normalize as normalize_module
from voxvault.pipeline import steps as steps_module
from voxvault.pipeline.steps import PipelineRun, StageProgress, pipeline_steps, run_steps
from voxvault.pipeline.worker import Worker
from voxvault.settings import Settings
from voxvault.transcription import Transcriber, TranscriptionResult, open_transcriber
from voxvault.transcription.base import ProgressCallback

pytestmark = pytest.mark.anyio

SPOKEN = "The quick brown fox jumps over the lazy dog. This recording is a test."
TRANSCRIPT_FILES = ["transcript.json", "transcript.md", "transcript.srt", "transcript.txt",
                    "transcript.vtt"]  # fmt: skip


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = speak(SPOKEN, tmp_path_factory.mktemp("speech") / "plants.wav")
    return path.read_bytes()


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def store(vault: Vault, data: bytes, filename: str = "memo.wav", **options: Any) -> str:
    recording = await vault.create_recording(chunks(data), filename=filename, **options)
    return recording.id


async def run_job(vault: Vault, worker: Worker | None = None) -> Job:
    job = await (worker or Worker(vault)).run_one()
    assert job is not None, "no job was runnable"
    return job


def flac_silence(seconds: int, rate: int = 8000) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="flac") as out:
        stream = out.add_stream("flac", rate=rate)
        assert isinstance(stream, av.AudioStream)
        for index in range(seconds):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, rate), dtype=np.int16), format="s16", layout="mono"
            )
            frame.sample_rate, frame.pts = rate, index * rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def speech_video(wav: bytes, container: str = "mp4") -> bytes:
    """The speech as the audio track of a small video (MPEG-4 video + AAC, or VP8 + Opus)."""
    samples = np.frombuffer(wav[44:], dtype=np.int16)
    rate = 48000 if container == "webm" else 16000
    video_codec, audio_codec = ("libvpx", "libopus") if container == "webm" else ("mpeg4", "aac")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        video = out.add_stream(video_codec, rate=2)
        assert isinstance(video, av.VideoStream)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream(audio_codec, rate=rate)
        assert isinstance(audio, av.AudioStream)
        for index in range(int(len(samples) / 16000 * 2) + 1):
            image = av.VideoFrame.from_ndarray(
                np.full((48, 64, 3), index * 30 % 255, dtype=np.uint8), format="rgb24"
            )
            image.pts = index
            for packet in video.encode(image):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        source = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        source.sample_rate, source.pts = 16000, 0
        resampler = av.AudioResampler(
            format=audio.codec_context.format, layout="mono", rate=rate,
            frame_size=audio.codec_context.frame_size or 1024,
        )  # fmt: skip
        for chunk in [*resampler.resample(source), *resampler.resample(None)]:
            for packet in audio.encode(chunk):
                out.mux(packet)
        for packet in audio.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def words_of(text: str) -> set[str]:
    return {w.strip(".,!?").lower() for w in text.split()}


async def test_speech_becomes_a_ready_transcript_with_words_files_and_playback(
    vault: Vault, speech: bytes, data_dir: Path
) -> None:
    recording_id = await store(vault, speech)
    assert (await vault.get_recording(recording_id)).status is RecordingStatus.QUEUED
    events: list[ProgressEvent] = []

    async def follow() -> None:
        async for _, event in vault.watch(recording_id):
            events.append(event)

    async with anyio.create_task_group() as group:
        group.start_soon(follow)
        job = await run_job(vault)

    assert (job.status, job.attempts, job.progress, job.error) == (
        JobStatus.SUCCEEDED, 1, 1.0, None
    )  # fmt: skip
    recording = await vault.get_recording(recording_id)
    assert (recording.status, recording.error) == (RecordingStatus.READY, None)

    transcript = await vault.get_transcript(recording_id)
    assert transcript.version == 1
    assert (transcript.engine, transcript.model, transcript.language) == (
        "faster-whisper", "tiny.en", "en"
    )  # fmt: skip
    assert transcript.job_id == job.id
    assert {"probe_s", "normalize_s", "transcribe_s"} <= set(transcript.timings)
    heard = words_of(" ".join(s.text for s in transcript.segments))
    assert {"fox", "lazy", "dog"} <= heard, heard
    words = [w for s in transcript.segments for w in s.words or []]
    assert len(words) >= 6
    assert all(0 <= w.start <= w.end <= recording.duration_s + 0.5 for w in words)  # type: ignore[operator]

    # The five transcript files follow the current version, byte for byte what the API exports.
    artifacts = {a.name: a for a in await vault.list_artifacts(recording_id)}
    assert sorted(artifacts) == TRANSCRIPT_FILES
    for name in TRANSCRIPT_FILES:
        stored = await vault.open_artifact(recording_id, name)
        body = b"".join([part async for part in stored.stream()])
        text, media_type, _ = await vault.export_transcript(recording_id, name.split(".")[1])
        assert body == text.encode(), name
        assert artifacts[name].content_type == media_type
    assert b'"faster-whisper"' in await vault.blobs.read_all(
        f"recordings/{recording_id}/artifacts/transcript.json"
    )

    # Playback prefers the Opus rendition; the original stays untouched.
    playback = await vault.open_playback(recording_id)
    assert playback.content_type == "audio/ogg; codecs=opus"
    opus = b"".join([part async for part in playback.stream()])
    with av.open(io.BytesIO(opus), mode="r") as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name == "opus"
        assert float(container.duration or 0) / av.time_base == pytest.approx(
            recording.duration_s, abs=0.2
        )
    original = await vault.open_audio(recording_id)
    assert b"".join([part async for part in original.stream()]) == speech
    assert not (data_dir / "work" / job.id).exists()

    # Events: queued → processing with stages in order and rising progress → ready.
    assert events[0].type == "snapshot"
    assert events[-1].status == "ready"
    assert events[-1].progress == 1.0
    processing = [e for e in events if e.status == "processing"]
    progress = [e.progress for e in processing]
    assert progress == sorted(progress)
    stages = [e.stage for e in processing if e.stage]
    order = ["probe", "normalize", "transcribe", "export", "playback"]
    assert [order.index(s) for s in stages] == sorted(order.index(s) for s in stages)
    assert "transcribe" in stages
    assert {e.job_id for e in events[1:]} == {job.id}


@pytest.mark.parametrize(
    "audio",
    [
        pytest.param(wav_bytes(seconds=3.0), id="tone"),
        pytest.param(riff_declaring(96000, bytes(96000)), id="silence"),
    ],
)
async def test_no_speech_ends_ready_with_an_empty_transcript(vault: Vault, audio: bytes) -> None:
    recording_id = await store(vault, audio)
    job = await run_job(vault)
    assert job.status is JobStatus.SUCCEEDED
    recording = await vault.get_recording(recording_id)
    assert recording.status is RecordingStatus.READY
    transcript = await vault.get_transcript(recording_id)
    assert transcript.segments == []
    assert sorted(a.name for a in await vault.list_artifacts(recording_id)) == TRANSCRIPT_FILES


@pytest.mark.parametrize("container", ["mp4", "webm"])
async def test_a_video_is_transcribed_from_its_audio_track(
    vault: Vault, speech: bytes, container: str
) -> None:
    recording_id = await store(vault, speech_video(speech, container), f"talk.{container}")
    recording = await vault.get_recording(recording_id)
    assert recording.content_type.startswith("video/")
    job = await run_job(vault)
    assert job.status is JobStatus.SUCCEEDED, job.error
    transcript = await vault.get_transcript(recording_id)
    assert {"fox", "lazy", "dog"} <= words_of(" ".join(s.text for s in transcript.segments))
    assert (await vault.open_playback(recording_id)).content_type == "audio/ogg; codecs=opus"


async def test_transcribe_false_stores_only(vault: Vault) -> None:
    recording_id = await store(vault, wav_bytes(1.0), transcribe=False)
    assert (await vault.get_recording(recording_id)).status is RecordingStatus.STORED
    assert await Worker(vault).run_one() is None
    assert await vault.list_jobs(recording_id) == []


async def test_retranscription_adds_a_version_and_the_files_follow_it(
    vault: Vault, speech: bytes
) -> None:
    recording_id = await store(vault, speech, transcribe=False)
    submitted = await vault.put_transcript(
        recording_id, {"language": "en", "segments": [{"start": 0, "end": 1, "text": "draft"}]}
    )
    assert submitted.version == 1
    assert (await vault.get_recording(recording_id)).status is RecordingStatus.READY
    assert b"draft" in await vault.blobs.read_all(
        f"recordings/{recording_id}/artifacts/transcript.txt"
    )

    job = await vault.transcribe(recording_id, {"language": "en"})
    assert (job.status, job.payload) == (JobStatus.QUEUED, {"language": "en"})
    assert (await vault.get_recording(recording_id)).status is RecordingStatus.QUEUED
    with pytest.raises(Conflict):
        await vault.transcribe(recording_id)
    finished = await run_job(vault)
    assert finished.id == job.id
    assert finished.status is JobStatus.SUCCEEDED

    versions = await vault.list_transcript_versions(recording_id)
    assert [(v.version, v.engine, v.job_id) for v in versions] == [
        (1, None, None),
        (2, "faster-whisper", job.id),
    ]
    text = (
        await vault.blobs.read_all(f"recordings/{recording_id}/artifacts/transcript.txt")
    ).decode()
    assert "draft" not in text
    assert "lazy dog" in text.lower()
    assert (await vault.get_recording(recording_id)).status is RecordingStatus.READY


class FlakyTranscriber(Transcriber):
    """The real engine, failing the first ``failures`` calls the way a crashed engine would."""

    engine = "faster-whisper"

    def __init__(self, inner: Transcriber, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    def transcribe(
        self,
        audio: Path,
        *,
        language: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TranscriptionResult:
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("the speech engine crashed")
        return self.inner.transcribe(audio, language=language, on_progress=on_progress)


def flaky(failures: int) -> Callable[[Settings, str | None], Transcriber]:
    shared: dict[str, FlakyTranscriber] = {}

    def factory(settings: Settings, model: str | None) -> Transcriber:
        if "t" not in shared:
            shared["t"] = FlakyTranscriber(open_transcriber(settings, model=model), failures)
        return shared["t"]

    return factory


async def test_a_failed_attempt_is_retried_with_backoff_then_succeeds(
    data_dir: Path, speech: bytes
) -> None:
    settings = Settings(data_dir=data_dir, job_retry_delay_s=0.2, job_max_attempts=3)
    async with await Vault.open(settings) as vault:
        recording_id = await store(vault, speech)
        worker = Worker(vault, transcribers=flaky(1))
        first = await run_job(vault, worker)
        assert (first.status, first.attempts) == (JobStatus.QUEUED, 1)
        assert first.error == "RuntimeError: the speech engine crashed"
        assert (await vault.get_recording(recording_id)).status is RecordingStatus.QUEUED
        assert await worker.run_one() is None  # not before the backoff delay
        await anyio.sleep(0.3)
        second = await run_job(vault, worker)
        assert (second.status, second.attempts, second.error) == (JobStatus.SUCCEEDED, 2, None)
        assert (await vault.get_recording(recording_id)).status is RecordingStatus.READY
        assert [v.version for v in await vault.list_transcript_versions(recording_id)] == [1]


async def test_failing_every_attempt_ends_failed_with_the_error_kept(
    data_dir: Path, speech: bytes
) -> None:
    settings = Settings(data_dir=data_dir, job_retry_delay_s=0, job_max_attempts=2)
    async with await Vault.open(settings) as vault:
        recording_id = await store(vault, speech)
        worker = Worker(vault, transcribers=flaky(5))
        assert (await run_job(vault, worker)).status is JobStatus.QUEUED
        last = await run_job(vault, worker)
        assert (last.status, last.attempts) == (JobStatus.FAILED, 2)
        recording = await vault.get_recording(recording_id)
        assert recording.status is RecordingStatus.FAILED
        assert recording.error == "RuntimeError: the speech engine crashed"
        with pytest.raises(NotFound):
            await vault.get_transcript(recording_id)
        assert not (data_dir / "work" / last.id).exists()
        # A failed recording can be run again.
        again = await vault.transcribe(recording_id)
        assert (await vault.get_recording(recording_id)).error is None
        assert again.status is JobStatus.QUEUED


class InterruptingTranscriber(Transcriber):
    """The real engine; at its first progress report ``interrupt`` runs on the event loop, and
    the engine keeps reporting until the worker stops it (or a deadline says it never did)."""

    engine = "faster-whisper"

    def __init__(self, inner: Transcriber, interrupt: Callable[[], Any]) -> None:
        self.inner = inner
        self.interrupt = interrupt
        self.stopped = threading.Event()

    def transcribe(
        self,
        audio: Path,
        *,
        language: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TranscriptionResult:
        assert on_progress is not None

        def report(fraction: float) -> None:
            anyio.from_thread.run(self.interrupt)
            try:
                for _ in range(200):
                    on_progress(fraction)
                    anyio.from_thread.run(anyio.sleep, 0.05)
            except BaseException:
                self.stopped.set()
                raise

        return self.inner.transcribe(audio, language=language, on_progress=report)


async def interrupted_run(vault: Vault, speech: bytes, interrupt: Callable[[str], Any]) -> str:
    recording_id = await store(vault, speech)
    holder: dict[str, InterruptingTranscriber] = {}

    async def act() -> None:
        await interrupt(recording_id)

    def factory(settings: Settings, model: str | None) -> Transcriber:
        holder["t"] = InterruptingTranscriber(open_transcriber(settings, model=model), act)
        return holder["t"]

    await Worker(vault, transcribers=factory).run_one()
    assert holder["t"].stopped.is_set(), "the worker never stopped the engine"
    return recording_id


async def test_a_recording_deleted_mid_run_stops_the_job_and_leaves_nothing(
    vault: Vault, speech: bytes, data_dir: Path
) -> None:
    recording_id = await interrupted_run(vault, speech, vault.delete_recording)
    with pytest.raises(NotFound):
        await vault.get_recording(recording_id)
    assert stored_files(data_dir) == []
    assert list((data_dir / "work").iterdir()) == []
    usage = await vault.metadata.usage(vault.workspace)
    assert (usage.recordings, usage.transcripts, usage.artifacts) == (0, 0, 0)
    assert await Worker(vault).run_one() is None


async def test_cancelling_a_running_job_stops_it_and_restores_the_status(
    vault: Vault, speech: bytes, data_dir: Path
) -> None:
    async def cancel(recording_id: str) -> None:
        [job] = await vault.list_jobs(recording_id)
        cancelled = await vault.cancel_job(job.id)
        assert cancelled.status is JobStatus.CANCELLED

    recording_id = await interrupted_run(vault, speech, cancel)
    recording = await vault.get_recording(recording_id)
    assert recording.status is RecordingStatus.STORED
    with pytest.raises(NotFound):
        await vault.get_transcript(recording_id)
    [job] = await vault.list_jobs(recording_id)
    assert job.status is JobStatus.CANCELLED
    assert list((data_dir / "work").iterdir()) == []
    # Cancelling a finished job changes nothing.
    assert (await vault.cancel_job(job.id)).status is JobStatus.CANCELLED


async def test_cancelling_a_queued_job(vault: Vault) -> None:
    recording_id = await store(vault, wav_bytes(1.0))
    [job] = await vault.list_jobs(recording_id)
    assert (await vault.cancel_job(job.id)).status is JobStatus.CANCELLED
    assert (await vault.get_recording(recording_id)).status is RecordingStatus.STORED
    assert await Worker(vault).run_one() is None


async def test_a_recording_longer_than_the_limit_is_refused_at_upload(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, max_duration_s=60)
    async with await Vault.open(settings) as vault:
        transport = httpx.ASGITransport(app=create_app(vault))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            # 90 s of FLAC silence: a small file that decodes to more than the limit.
            small = flac_silence(seconds=90)
            assert len(small) < 100_000
            response = await client.post(
                "/v1/recordings", content=small, headers={"Content-Type": "audio/flac"}
            )
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert error["code"] == "media_limit_exceeded"
            assert "limit of 60 s" in error["message"]
            assert error["detail"] == {"duration_s": 90.0, "max_duration_s": 60.0}
            assert (await client.get("/v1/recordings")).json()["items"] == []
        assert stored_files(data_dir) == []


async def test_jobs_api_and_bad_transcribe_requests(client: httpx.AsyncClient) -> None:
    created = await client.post(
        "/v1/recordings?transcribe=false",
        content=wav_bytes(1.0),
        headers={"Content-Type": "audio/wav"},
    )
    recording_id = created.json()["id"]
    base = f"/v1/recordings/{recording_id}"
    for body, status in [
        ({"model": "../../etc"}, 422),
        ({"language": "english please"}, 422),
        ({"unknown": 1}, 422),
        ([1, 2], 422),
    ]:
        response = await client.post(f"{base}/transcribe", json=body)
        assert response.status_code == status, (body, response.text)
        assert "error" in response.json()
    bad_json = await client.post(
        f"{base}/transcribe", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert bad_json.status_code == 400
    assert (await client.get(f"{base}/jobs")).json() == {"items": []}

    started = await client.post(f"{base}/transcribe", json={"model": "tiny.en", "language": "en"})
    assert started.status_code == 202, started.text
    job = started.json()
    assert (job["status"], job["recording_id"], job["payload"]) == (
        "queued", recording_id, {"model": "tiny.en", "language": "en"}
    )  # fmt: skip
    assert (await client.get(f"/v1/jobs/{job['id']}")).json()["id"] == job["id"]
    again = await client.post(f"{base}/transcribe")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"
    listed = (await client.get(f"{base}/jobs")).json()["items"]
    assert [j["id"] for j in listed] == [job["id"]]
    cancelled = await client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.json()["status"] == "cancelled"
    assert (await client.get(base)).json()["status"] == "stored"

    for path in ("/v1/jobs/nope", f"/v1/jobs/{'0' * 32}", "/v1/jobs/%00"):
        assert (await client.get(path)).status_code == 404
        assert (await client.post(f"{path}/cancel")).status_code == 404
    assert (await client.post(f"/v1/recordings/{'0' * 32}/transcribe")).status_code == 404
    assert (await client.get(f"/v1/recordings/{'0' * 32}/events")).status_code == 404


async def test_an_unavailable_model_fails_the_job_once_with_a_clear_error(
    vault: Vault, speech: bytes
) -> None:
    recording_id = await store(vault, speech, transcribe=False)
    await vault.transcribe(recording_id, {"model": "voxvault-test/no-such-model"})
    job = await run_job(vault)
    assert (job.status, job.attempts) == (JobStatus.FAILED, 1)
    recording = await vault.get_recording(recording_id)
    assert recording.status is RecordingStatus.FAILED
    assert recording.error is not None
    assert "voxvault-test/no-such-model" in recording.error


# ---- the playback rendition, made in the background -------------------------------------------


def decoder_processes(outputs: str | None = None) -> list[psutil.Process]:
    """This process's decoder children, those making ``outputs`` only when given."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            command = child.cmdline()
            if any(arg.endswith("decoder.py") for arg in command) and (
                outputs is None or outputs in command
            ):
                found.append(child)
    return found


class EncoderWatcher(Transcriber):
    """No engine: waits for the background playback decoder to be running, runs ``interrupt``
    on the event loop while it still runs, then reports progress until the worker stops it."""

    engine = "faster-whisper"

    def __init__(self, interrupt: Callable[[], Any]) -> None:
        self.interrupt = interrupt
        self.encoder: psutil.Process | None = None
        self.running_after_interrupt = False
        self.stopped = threading.Event()

    def transcribe(
        self,
        audio: Path,
        *,
        language: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TranscriptionResult:
        assert on_progress is not None
        deadline = time.monotonic() + 30
        while self.encoder is None:
            found = decoder_processes("playback")
            if found:
                self.encoder = found[0]
            else:
                assert time.monotonic() < deadline, "no playback decoder was started"
                time.sleep(0.02)
        anyio.from_thread.run(self.interrupt)
        self.running_after_interrupt = self.encoder.is_running()
        try:
            for _ in range(400):
                on_progress(0.5)
                time.sleep(0.05)
        except BaseException:
            self.stopped.set()
            raise
        raise AssertionError("the worker never stopped the engine")


@pytest.fixture(scope="module")
def twenty_minutes() -> bytes:
    # Its Opus encode takes many seconds (more at the rendition's low priority): still running
    # when the job is stopped. Its speech decode, before the engine starts, takes about one.
    return flac_silence(seconds=1200, rate=16000)


@pytest.mark.parametrize("interruption", ["cancel", "delete"])
async def test_stopping_a_job_while_its_playback_encoder_runs_leaves_no_process_and_no_files(
    vault: Vault, data_dir: Path, twenty_minutes: bytes, interruption: str
) -> None:
    recording_id = await store(vault, twenty_minutes, "long.flac")

    async def interrupt() -> None:
        if interruption == "delete":
            await vault.delete_recording(recording_id)
        else:
            [job] = await vault.list_jobs(recording_id)
            await vault.cancel_job(job.id)

    watcher = EncoderWatcher(interrupt)
    await Worker(vault, transcribers=lambda settings, model: watcher).run_one()

    assert watcher.stopped.is_set(), "the worker never stopped the engine"
    assert watcher.encoder is not None
    assert watcher.running_after_interrupt, "the encoder had finished: nothing was tested"
    assert not watcher.encoder.is_running(), "the playback encoder outlived its job"
    assert decoder_processes() == []
    assert list((data_dir / "work").iterdir()) == []
    if interruption == "delete":
        assert stored_files(data_dir) == []
        with pytest.raises(NotFound):
            await vault.get_recording(recording_id)
    else:
        recording = await vault.get_recording(recording_id)
        assert recording.status is RecordingStatus.STORED
        assert await vault.metadata.get_playback(vault.workspace, recording_id) is None
        assert [p.name for p in stored_files(data_dir)] == ["original"]


class CountingTranscriber(Transcriber):
    engine = "faster-whisper"

    def __init__(self, inner: Transcriber) -> None:
        self.inner = inner
        self.calls = 0

    def transcribe(
        self,
        audio: Path,
        *,
        language: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TranscriptionResult:
        self.calls += 1
        return self.inner.transcribe(audio, language=language, on_progress=on_progress)


async def test_a_failed_rendition_fails_the_attempt_and_the_retry_makes_only_the_rendition(
    data_dir: Path, speech: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes: list[str] = []
    failures = [RuntimeError("the encoder crashed")]

    def speech_only(*args: Any, **kwargs: Any) -> Any:
        decodes.append("speech")
        return normalize_module.normalize_speech(*args, **kwargs)

    def playback_failing_once(*args: Any, **kwargs: Any) -> Any:
        decodes.append("playback")
        if failures:
            raise failures.pop()
        return normalize_module.normalize_playback(*args, **kwargs)

    monkeypatch.setattr(steps_module, "normalize_speech", speech_only)
    monkeypatch.setattr(steps_module, "normalize_playback", playback_failing_once)
    settings = Settings(data_dir=data_dir, job_retry_delay_s=0, job_max_attempts=3)
    async with await Vault.open(settings) as vault:
        recording_id = await store(vault, speech)
        counting: dict[str, CountingTranscriber] = {}

        def factory(settings: Settings, model: str | None) -> Transcriber:
            if "t" not in counting:
                counting["t"] = CountingTranscriber(open_transcriber(settings, model=model))
            return counting["t"]

        worker = Worker(vault, transcribers=factory)
        first = await run_job(vault, worker)
        assert (first.status, first.attempts) == (JobStatus.QUEUED, 1)
        assert first.error == "RuntimeError: the encoder crashed"
        # The transcript was stored before the rendition's failure was known.
        assert (await vault.get_transcript(recording_id)).job_id == first.id
        assert (await vault.open_playback(recording_id)).content_type == "audio/wav"
        assert sorted(decodes) == ["playback", "speech"]  # in two threads, in either order

        decodes.clear()
        second = await run_job(vault, worker)
        assert (second.id, second.status, second.attempts) == (first.id, JobStatus.SUCCEEDED, 2)
        assert decodes == ["playback"]
        assert counting["t"].calls == 1
        assert [v.version for v in await vault.list_transcript_versions(recording_id)] == [1]
        assert (await vault.get_recording(recording_id)).status is RecordingStatus.READY
        assert (await vault.open_playback(recording_id)).content_type == "audio/ogg; codecs=opus"
        assert list((data_dir / "work").iterdir()) == []


class StageLog(StageProgress):
    def __init__(self) -> None:
        super().__init__()
        self.started: list[str] = []

    def start(self, stage: str) -> None:
        self.started.append(stage)
        super().start(stage)


class NoEngine(Transcriber):
    engine = "faster-whisper"

    def transcribe(
        self,
        audio: Path,
        *,
        language: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TranscriptionResult:
        raise AssertionError("transcribed again")


async def test_a_job_run_again_after_its_transcript_and_rendition_skips_both(
    vault: Vault, speech: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recording_id = await store(vault, speech)
    job = await run_job(vault)
    assert job.status is JobStatus.SUCCEEDED
    playback = await vault.metadata.get_playback(vault.workspace, recording_id)
    assert playback is not None

    def no_decoding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decoded again")

    monkeypatch.setattr(steps_module, "normalize_speech", no_decoding)
    monkeypatch.setattr(steps_module, "normalize_playback", no_decoding)
    progress = StageLog()
    run = PipelineRun(
        vault=vault,
        job=job,
        recording=await vault.get_recording(recording_id),
        transcriber=NoEngine(),
        scratch=tmp_path / "work" / job.id,
        progress=progress,
    )
    await run_steps(run, pipeline_steps())
    assert progress.started == ["probe", "export"]
    assert await vault.metadata.get_playback(vault.workspace, recording_id) == playback
    assert [v.version for v in await vault.list_transcript_versions(recording_id)] == [1]
    assert not run.scratch.exists()

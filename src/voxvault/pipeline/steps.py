"""The pipeline's steps: ``probe → normalize → transcribe → export → playback`` (handbook §4).

The contract every step keeps:

- ``able_to_run(run)`` says whether the step still has work to do for this job. A job that runs
  again after a crash skips what it already finished: a step's result is keyed by (recording,
  step, transcript version), and the transcript version by the job that made it.
- ``run(run)`` does the work. Blocking work (decoding, the speech engine) runs on a worker
  thread, reports progress as a fraction of the step through ``run.progress`` and stops early,
  raising ``JobStopped``, once ``run.stopped`` is set (cancel, lost lease, deleted recording).
  Work a step leaves running beside the later steps is started in ``run.background``; it must
  end early too once ``run.stopped`` is set, and whatever it raises is for a later step to
  re-raise. ``run_steps`` waits for it before any cleanup.
- ``cleanup(run)`` removes what the step left in the job's scratch directory; it is always called,
  whether the step ran, was skipped or failed, once nothing runs in the background any more.

The playback rendition (Ogg Opus for browsers) is the one piece of background work: ``normalize``
decodes the speech WAV the engine needs and starts the rendition beside it, in a decoder child
at a lower CPU priority, so that its encoding (several times the work of the speech decoding)
uses the core the engine leaves idle instead of delaying the transcription. ``playback`` waits
for it and stores it. The job, and so the recording's ``ready``, ends only after that step: a
ready recording has its rendition, as before, and the wait is usually nil because the rendition
needs a fraction of the engine's time. Until it is stored, playback links serve the original. A
failed rendition fails the job like any other failure, in ``playback``, after the transcript and
its files were stored: a retry of the job then makes only the rendition.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import anyio.to_thread

from voxvault.blobs import keys as blob_keys
from voxvault.errors import NotFound
from voxvault.jobs import Job
from voxvault.media.normalize import (
    DecodeCancelled,
    DecodeLimits,
    PlaybackAudio,
    SpeechAudio,
    normalize_playback,
    normalize_speech,
)
from voxvault.media.probe import probe
from voxvault.models import Recording, TranscribeRequest, TranscriptInput
from voxvault.transcription import Transcriber, TranscriptionResult

if TYPE_CHECKING:
    from voxvault.vault import Vault

log = logging.getLogger("voxvault.pipeline")


class JobStopped(Exception):
    """The job must stop now: it was cancelled, its recording deleted, or its lease lost."""


@dataclass
class StageProgress:
    """The step running now and how far it is: written by worker threads, read by the loop."""

    stage: str | None = None
    fraction: float = 0.0

    def start(self, stage: str) -> None:
        self.stage, self.fraction = stage, 0.0

    def update(self, fraction: float) -> None:
        self.fraction = min(1.0, max(self.fraction, fraction))


@dataclass
class PipelineRun:
    """Everything the steps of one job share."""

    vault: Vault
    job: Job
    recording: Recording
    transcriber: Transcriber
    scratch: Path
    progress: StageProgress = field(default_factory=StageProgress)
    stopped: threading.Event = field(default_factory=threading.Event)
    keep_lease: Callable[[], Awaitable[bool]] | None = None
    """Renews the job's lease now; False once the job is no longer this worker's to finish."""
    transcribed: bool = False
    """Whether an earlier run of this job already stored its transcript."""
    source: Path | None = None
    audio: SpeechAudio | None = None
    rendition: PlaybackRendition | None = None
    """The playback rendition being made in the background, when this run makes one."""
    background: anyio.abc.TaskGroup | None = None
    """Where steps start work that goes on beside the later steps; set by ``run_steps``."""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def request(self) -> TranscribeRequest:
        return TranscribeRequest.model_validate(self.job.payload)

    def check_stopped(self) -> None:
        if self.stopped.is_set():
            raise JobStopped

    async def confirm_held(self) -> None:
        """Stop unless the job is still ours: checked right before results are written."""
        self.check_stopped()
        if self.keep_lease is not None and not await self.keep_lease():
            self.stopped.set()
            raise JobStopped


class Step(ABC):
    name: str
    weight: float
    """Share of the whole pipeline's time, for the overall progress figure."""

    async def able_to_run(self, run: PipelineRun) -> bool:
        return True

    @abstractmethod
    async def run(self, run: PipelineRun) -> None: ...

    def cleanup(self, run: PipelineRun) -> None:  # noqa: B027 - most steps leave nothing
        pass


class Probe(Step):
    """Fetch the original (a local path for local stores) and check it is audio, not too long."""

    name, weight = "probe", 0.02

    async def run(self, run: PipelineRun) -> None:
        original = blob_keys.recording_original(run.recording.id)
        run.source = await run.vault.blobs.local_copy(original, run.scratch)
        media = await anyio.to_thread.run_sync(probe, str(run.source))
        run.vault._check_duration(media.duration_s)
        run.progress.update(1.0)

    def cleanup(self, run: PipelineRun) -> None:
        if run.source is not None and run.source.is_relative_to(run.scratch):
            run.source.unlink(missing_ok=True)


def _decode_limits(run: PipelineRun) -> DecodeLimits:
    settings = run.vault.settings
    return DecodeLimits(
        timeout_s=settings.decode_timeout_s,
        memory_bytes=settings.decode_memory_bytes,
        max_duration_s=settings.max_duration_s,
    )


class PlaybackRendition:
    """The playback rendition made on a worker thread while the job goes on.

    Its decoder child runs at a lower CPU priority, and is killed once the job stops or the
    steps end without waiting for it (``abandon``). Errors are kept for ``result``.
    """

    PROGRESS_EVERY_S = 0.2

    def __init__(self, run: PipelineRun) -> None:
        self.workdir = run.scratch / "playback"
        self.job_stopped = run.stopped
        self.abandoned = threading.Event()
        self.ended = anyio.Event()
        self.fraction = 0.0
        self.audio: PlaybackAudio | None = None
        self.error: Exception | None = None
        self.seconds = 0.0
        """How long the rendition took, from its start to its end."""

    def should_stop(self) -> bool:
        return self.job_stopped.is_set() or self.abandoned.is_set()

    def abandon(self) -> None:
        """Stop the decoder unless it has finished; ``make`` then ends within a poll."""
        self.abandoned.set()

    async def make(self, source: Path, limits: DecodeLimits) -> None:
        """The background task: never raises, ``result`` reports its outcome."""
        started = time.perf_counter()

        def decode() -> PlaybackAudio:
            return normalize_playback(
                source,
                self.workdir,
                limits,
                on_progress=self._progress,
                should_stop=self.should_stop,
            )

        try:
            # Not abandoned on a cancel: the thread ends soon after ``abandon``, and the task
            # with it, so whoever waits for the task knows the child is gone.
            self.audio = await anyio.to_thread.run_sync(decode)
        except Exception as exc:
            self.error = exc
        finally:
            self.seconds = time.perf_counter() - started
            self.ended.set()

    def _progress(self, fraction: float) -> None:
        self.fraction = fraction

    async def result(self, on_progress: Callable[[float], None]) -> PlaybackAudio:
        """Wait for the rendition, reporting its progress; raise what it failed with."""
        while not self.ended.is_set():
            on_progress(self.fraction)
            with anyio.move_on_after(self.PROGRESS_EVERY_S):
                await self.ended.wait()
        if isinstance(self.error, DecodeCancelled):
            raise JobStopped from None
        if self.error is not None:
            raise self.error
        assert self.audio is not None
        return self.audio


class Normalize(Step):
    """16 kHz mono for the engine; the Opus rendition for browsers is started beside it.

    The decoding of untrusted media happens in child processes under time and memory limits.
    A run that already has its transcript (a job run again) only starts the rendition; one
    whose recording already has a rendition (it depends on the original alone, which never
    changes) does not make it again.
    """

    name, weight = "normalize", 0.04

    async def able_to_run(self, run: PipelineRun) -> bool:
        return not run.transcribed or not await self._has_playback(run)

    async def run(self, run: PipelineRun) -> None:
        assert run.source is not None
        assert run.background is not None, "steps run inside run_steps"
        limits = _decode_limits(run)
        source = run.source
        if not await self._has_playback(run):
            run.rendition = PlaybackRendition(run)
            run.background.start_soon(run.rendition.make, source, limits)
        if run.transcribed:
            run.progress.update(1.0)
            return

        def decode() -> SpeechAudio:
            return normalize_speech(
                source,
                run.scratch / "audio",
                limits,
                on_progress=run.progress.update,
                should_stop=run.stopped.is_set,
            )

        try:
            run.audio = await anyio.to_thread.run_sync(decode)
        except DecodeCancelled:
            raise JobStopped from None

    @staticmethod
    async def _has_playback(run: PipelineRun) -> bool:
        vault = run.vault
        return await vault.metadata.get_playback(vault.workspace, run.recording.id) is not None

    def cleanup(self, run: PipelineRun) -> None:
        shutil.rmtree(run.scratch / "audio", ignore_errors=True)


class Transcribe(Step):
    """Speech to a new transcript version, stored once per job however often the job runs."""

    name, weight = "transcribe", 0.88

    async def able_to_run(self, run: PipelineRun) -> bool:
        return not run.transcribed

    async def run(self, run: PipelineRun) -> None:
        vault = run.vault
        assert run.audio is not None
        audio = run.audio.speech

        def on_progress(fraction: float) -> None:
            run.check_stopped()  # raised inside the engine's loop: it stops within a segment
            run.progress.update(fraction)

        def transcribe() -> TranscriptionResult:
            return run.transcriber.transcribe(
                audio, language=run.request.language, on_progress=on_progress
            )

        result = await anyio.to_thread.run_sync(transcribe)
        await run.confirm_held()
        run.timings.update({name: round(value, 3) for name, value in result.timings.items()})
        await vault.metadata.add_transcript(
            vault.workspace,
            run.recording.id,
            TranscriptInput(
                language=result.language,
                segments=result.segments,
                engine=result.engine,
                model=result.model,
            ),
            job_id=run.job.id,
            timings=run.timings,
        )


class Export(Step):
    """The transcript files (JSON, SRT, VTT, TXT, Markdown) of the current version."""

    name, weight = "export", 0.04

    async def run(self, run: PipelineRun) -> None:
        await run.vault.write_transcript_files(run.recording.id)
        run.progress.update(1.0)


class Playback(Step):
    """Wait for the playback rendition ``normalize`` started, and store it."""

    name, weight = "playback", 0.02

    async def able_to_run(self, run: PipelineRun) -> bool:
        return run.rendition is not None

    async def run(self, run: PipelineRun) -> None:
        assert run.rendition is not None
        waited = time.perf_counter()
        audio = await run.rendition.result(run.progress.update)
        log.debug(
            "job %s: playback rendition made in %.2f s, waited %.2f s for it",
            run.job.id,
            run.rendition.seconds,
            time.perf_counter() - waited,
        )
        await run.confirm_held()
        await self._store(run, audio.playback)
        run.progress.update(1.0)

    @staticmethod
    async def _store(run: PipelineRun, path: Path) -> None:
        vault, recording_id = run.vault, run.recording.id
        key = blob_keys.recording_playback(recording_id)
        stored = await vault.blobs.put_file(key, path)
        try:
            await vault.metadata.set_playback(vault.workspace, recording_id, stored.sha256)
        except NotFound:
            await vault.blobs.delete(key)  # deleted meanwhile: the bytes belong to no one
            raise

    def cleanup(self, run: PipelineRun) -> None:
        if run.rendition is not None:
            shutil.rmtree(run.rendition.workdir, ignore_errors=True)


def pipeline_steps() -> list[Step]:
    return [Probe(), Normalize(), Transcribe(), Export(), Playback()]


async def run_steps(run: PipelineRun, steps: list[Step]) -> None:
    """Run the steps in order, timing each; then, once the background work has ended too,
    clean up after all of them, whatever happened."""
    vault = run.vault
    made = await vault.metadata.get_job_transcript(vault.workspace, run.recording.id, run.job.id)
    run.transcribed = made is not None
    failure: Exception | None = None
    try:
        async with anyio.create_task_group() as background:
            run.background = background
            try:
                await _run_each(run, steps)
            except Exception as exc:
                # Raised once the background work has ended: out of the task group, which would
                # wrap it in an exception group.
                failure = exc
            finally:
                # Nothing still running is wanted now (a rendition that succeeded was waited
                # for); the task group waits for the decoder thread, which ends with its child.
                if run.rendition is not None:
                    run.rendition.abandon()
    finally:
        run.background = None
        for step in reversed(steps):
            step.cleanup(run)
        shutil.rmtree(run.scratch, ignore_errors=True)
    if failure is not None:
        raise failure


async def _run_each(run: PipelineRun, steps: list[Step]) -> None:
    for step in steps:
        run.check_stopped()
        if not await step.able_to_run(run):
            continue
        run.progress.start(step.name)
        started = time.perf_counter()
        await step.run(run)
        run.timings.setdefault(f"{step.name}_s", round(time.perf_counter() - started, 3))


def overall_progress(steps: list[Step], progress: StageProgress) -> float:
    """Progress of the whole pipeline from the step running now and how far it is."""
    done = 0.0
    for step in steps:
        if step.name == progress.stage:
            return min(1.0, done + step.weight * progress.fraction)
        done += step.weight
    return 0.0

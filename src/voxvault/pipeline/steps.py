"""The pipeline's steps: ``probe → normalize → transcribe → export`` (handbook §4).

The contract every step keeps:

- ``able_to_run(run)`` says whether the step still has work to do for this job. A job that runs
  again after a crash skips what it already finished: a step's result is keyed by (recording,
  step, transcript version), and the transcript version by the job that made it.
- ``run(run)`` does the work. Blocking work (decoding, the speech engine) runs on a worker
  thread, reports progress as a fraction of the step through ``run.progress`` and stops early,
  raising ``JobStopped``, once ``run.stopped`` is set (cancel, lost lease, deleted recording).
- ``cleanup(run)`` removes what the step left in the job's scratch directory; it is always called,
  whether the step ran, was skipped or failed.
"""

from __future__ import annotations

import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio.to_thread

from voxvault.blobs import keys as blob_keys
from voxvault.errors import NotFound
from voxvault.jobs import Job
from voxvault.media.normalize import DecodeCancelled, DecodeLimits, NormalizedAudio, normalize
from voxvault.media.probe import probe
from voxvault.models import Recording, TranscribeRequest, TranscriptInput
from voxvault.transcription import Transcriber, TranscriptionResult

if TYPE_CHECKING:
    from voxvault.vault import Vault


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
    audio: NormalizedAudio | None = None
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


class Normalize(Step):
    """16 kHz mono for the engine, and the Opus rendition for browsers, in one decoding pass.

    The decoding of untrusted media happens in a child process under time and memory limits.
    """

    name, weight = "normalize", 0.10

    async def able_to_run(self, run: PipelineRun) -> bool:
        if not run.transcribed:
            return True
        vault = run.vault
        return await vault.metadata.get_playback(vault.workspace, run.recording.id) is None

    async def run(self, run: PipelineRun) -> None:
        assert run.source is not None
        settings = run.vault.settings
        limits = DecodeLimits(
            timeout_s=settings.decode_timeout_s,
            memory_bytes=settings.decode_memory_bytes,
            max_duration_s=settings.max_duration_s,
        )
        source = run.source

        def decode() -> NormalizedAudio:
            return normalize(
                source,
                run.scratch / "audio",
                limits,
                on_progress=run.progress.update,
                should_stop=run.stopped.is_set,
            )

        try:
            run.audio = audio = await anyio.to_thread.run_sync(decode)
        except DecodeCancelled:
            raise JobStopped from None
        await self._store_playback(run, audio.playback)

    @staticmethod
    async def _store_playback(run: PipelineRun, path: Path) -> None:
        vault, recording_id = run.vault, run.recording.id
        key = blob_keys.recording_playback(recording_id)
        stored = await vault.blobs.put_file(key, path)
        try:
            await vault.metadata.set_playback(vault.workspace, recording_id, stored.sha256)
        except NotFound:
            await vault.blobs.delete(key)  # deleted meanwhile: the bytes belong to no one
            raise

    def cleanup(self, run: PipelineRun) -> None:
        shutil.rmtree(run.scratch / "audio", ignore_errors=True)


class Transcribe(Step):
    """Speech to a new transcript version, stored once per job however often the job runs."""

    name, weight = "transcribe", 0.83

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

    name, weight = "export", 0.05

    async def run(self, run: PipelineRun) -> None:
        await run.vault.write_transcript_files(run.recording.id)
        run.progress.update(1.0)


def pipeline_steps() -> list[Step]:
    return [Probe(), Normalize(), Transcribe(), Export()]


async def run_steps(run: PipelineRun, steps: list[Step]) -> None:
    """Run the steps in order, timing each and always cleaning up after all of them."""
    vault = run.vault
    made = await vault.metadata.get_job_transcript(vault.workspace, run.recording.id, run.job.id)
    run.transcribed = made is not None
    try:
        for step in steps:
            run.check_stopped()
            if not await step.able_to_run(run):
                continue
            run.progress.start(step.name)
            started = time.perf_counter()
            await step.run(run)
            run.timings.setdefault(f"{step.name}_s", round(time.perf_counter() - started, 3))
    finally:
        for step in reversed(steps):
            step.cleanup(run)
        shutil.rmtree(run.scratch, ignore_errors=True)


def overall_progress(steps: list[Step], progress: StageProgress) -> float:
    """Progress of the whole pipeline from the step running now and how far it is."""
    done = 0.0
    for step in steps:
        if step.name == progress.stage:
            return min(1.0, done + step.weight * progress.fraction)
        done += step.weight
    return 0.0

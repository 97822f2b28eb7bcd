"""Workers: claim pipeline jobs from the JobQueue and run them, with a lease and heartbeats.

A worker runs inside ``voxvault serve`` (``--workers N``), in ``voxvault worker``, or for one
CLI ingest. The heavy work runs on threads and in a decoder process, so the event loop keeps
serving the API. While a job runs, a supervisor renews its lease, records its progress and
publishes progress events; when the lease cannot be renewed (the job was cancelled, its
recording deleted, or another worker took it over) the job is told to stop.

Failures: media that cannot be decoded or is too long fails the job at once (``failed`` with a
readable error on the recording); anything else is retried with exponential backoff, up to
``VOXVAULT_JOB_MAX_ATTEMPTS``. A worker that dies is noticed by its expired lease, or at once
by the next worker that starts on the same host.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Collection
from pathlib import Path

import anyio

from voxvault.errors import BackendUnavailable, NotFound, VoxVaultError
from voxvault.events import ProgressEvent
from voxvault.jobs import FINISHED, Job, JobStatus
from voxvault.maintenance import product_sweeps, run_sweeps_periodically
from voxvault.models import RecordingStatus
from voxvault.pipeline.steps import (
    JobStopped,
    PipelineRun,
    Step,
    overall_progress,
    pipeline_steps,
    run_steps,
)
from voxvault.settings import Settings
from voxvault.transcription import Transcriber, open_transcriber
from voxvault.vault import Vault

log = logging.getLogger("voxvault.worker")

IDLE_POLL_SECONDS = 2.0
HAND_BACK_WAIT_S = 5.0
PROGRESS_EVERY_SECONDS = 0.5
HEARTBEAT_MAX_SECONDS = 2.0
# Errors no retry can fix: the media itself, or the model asked for, is the problem.
_PERMANENT_CODES = frozenset(
    {"unsupported_media", "media_limit_exceeded", "validation_failed", "configuration_error"}
)

_PROCESS_TOKEN = secrets.token_hex(4)
TranscriberFactory = Callable[[Settings, str | None], Transcriber]


def _default_transcriber(settings: Settings, model: str | None) -> Transcriber:
    return open_transcriber(settings, model=model)


def transcriber_beside_api(settings: Settings, model: str | None) -> Transcriber:
    """The transcriber of workers that share their process with the HTTP API."""
    return open_transcriber(settings, model=model, beside_api=True)


def worker_name(index: int) -> str:
    """``host/pid/token/index``: enough to tell, on this host, whether its process is alive."""
    return f"{socket.gethostname()}/{os.getpid()}/{_PROCESS_TOKEN}/{index}"


def _owner_is_dead(owner: str) -> bool:
    """Whether a lease owner is a worker of this host whose process is gone."""
    host, _, rest = owner.partition("/")
    pid_text, _, rest = rest.partition("/")
    token = rest.partition("/")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return token != _PROCESS_TOKEN  # an earlier life of this pid (pid 1 in a container)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


async def reclaim_dead_workers(vault: Vault) -> int:
    """Hand the jobs of this host's dead workers back at once instead of after their lease."""
    dead = [owner for owner in await vault.jobs.lease_owners() if _owner_is_dead(owner)]
    return await vault.jobs.expire_leases(dead) if dead else 0


class Worker:
    def __init__(
        self,
        vault: Vault,
        *,
        name: str | None = None,
        transcribers: TranscriberFactory = _default_transcriber,
        job_ids: Collection[str] | None = None,
    ) -> None:
        self.vault = vault
        self.name = name or worker_name(0)
        self.transcribers = transcribers
        self.job_ids = job_ids
        self.settings = vault.settings

    async def run(self) -> None:
        """Process jobs until cancelled; a failing backend pauses the worker, never ends it."""
        while True:
            try:
                ran = await self.run_one()
            except Exception:
                # The job's lease runs out and another attempt picks it up; keep serving.
                log.exception("worker %s: could not run or record a job", self.name)
                ran = None
            if ran is None:
                with anyio.move_on_after(IDLE_POLL_SECONDS):
                    await self.vault.wait_for_jobs()

    async def run_one(self, job_ids: Collection[str] | None = None) -> Job | None:
        """Claim one job (of ``job_ids`` when given, else of this worker's own ids, else any)
        and run it to its end; None when nothing was runnable."""
        job = await self.vault.jobs.claim(
            self.name, self.settings.job_lease_s, job_ids=job_ids or self.job_ids
        )
        if job is None:
            return None
        vault = self.vault.for_workspace(job.workspace)
        try:
            await self._process(vault, job)
        except NotFound:
            log.info("job %s stopped: its recording was deleted", job.id)
        return await self._final(vault, job)

    async def _final(self, vault: Vault, job: Job) -> Job:
        try:
            return await vault.jobs.get(job.workspace, job.id)
        except NotFound:  # purged with its recording
            return job.model_copy(update={"status": JobStatus.CANCELLED})

    async def _process(self, vault: Vault, job: Job) -> None:
        recording = await vault.metadata.update_recording(
            vault.workspace, job.recording_id, status=RecordingStatus.PROCESSING
        )
        run = PipelineRun(
            vault=vault,
            job=job,
            recording=recording,
            transcriber=self.transcribers(self.settings, job.payload.get("model")),
            scratch=self._scratch(job),
            keep_lease=lambda: vault.jobs.heartbeat(job.id, self.name, self.settings.job_lease_s),
        )
        steps = pipeline_steps()
        await self._publish(vault, job, "status", RecordingStatus.PROCESSING, 0.0, None)
        error: BaseException | None = None
        async with anyio.create_task_group() as supervision:
            supervision.start_soon(self._supervise, vault, job, run, steps)
            try:
                await run_steps(run, steps)
            except JobStopped:
                pass
            except Exception as exc:
                error = exc
            finally:
                supervision.cancel_scope.cancel()
        if run.stopped.is_set():
            log.info("job %s stopped before its end", job.id)
            return
        if error is not None:
            if isinstance(error, NotFound) and not await _recording_exists(vault, job):
                raise error  # deleted while running: its job went with it
            await self._failed(vault, job, error)
            return
        if await vault.jobs.complete(job.id, self.name):
            await vault.metadata.update_recording(
                vault.workspace, job.recording_id, status=RecordingStatus.READY
            )
            await self._publish(vault, job, "status", RecordingStatus.READY, 1.0, None)

    def _scratch(self, job: Job) -> Path:
        return self.settings.data_dir / "work" / job.id

    async def _supervise(self, vault: Vault, job: Job, run: PipelineRun, steps: list[Step]) -> None:
        """Renew the lease, record progress and publish it; stop the job when the lease is lost."""
        lease = self.settings.job_lease_s
        every = min(HEARTBEAT_MAX_SECONDS, lease / 3)
        last_sent: tuple[str | None, float] = (None, -1.0)
        last_beat = time.monotonic()
        while True:
            await anyio.sleep(PROGRESS_EVERY_SECONDS)
            stage = run.progress.stage
            progress = round(overall_progress(steps, run.progress), 3)
            changed = (stage, progress) != last_sent
            if changed or time.monotonic() - last_beat >= every:
                try:
                    held = await vault.jobs.heartbeat(
                        job.id, self.name, lease, progress=progress, stage=stage
                    )
                except Exception:  # a database hiccup: try again next time round
                    log.warning("job %s: heartbeat failed", job.id, exc_info=True)
                    continue
                last_beat = time.monotonic()
                if not held:
                    run.stopped.set()
                    return
            if changed:
                last_sent = (stage, progress)
                with contextlib.suppress(BackendUnavailable):  # progress is best effort
                    await self._publish(
                        vault, job, "progress", RecordingStatus.PROCESSING, progress, stage
                    )

    async def _failed(self, vault: Vault, job: Job, error: BaseException) -> None:
        message = _describe(error)
        permanent = isinstance(error, VoxVaultError) and error.code in _PERMANENT_CODES
        delay = self.settings.job_retry_delay_s * 2 ** max(0, job.attempts - 1)
        log.warning("job %s attempt %d failed: %s", job.id, job.attempts, message)
        updated = await vault.jobs.fail(
            job.id, self.name, message, retry_after=delay, retry=not permanent
        )
        if updated is None:
            return  # cancelled or taken over meanwhile: whoever holds it now decides
        if updated.status is JobStatus.FAILED:
            await vault.metadata.update_recording(
                vault.workspace, job.recording_id, status=RecordingStatus.FAILED, error=message
            )
            await self._publish(vault, job, "status", RecordingStatus.FAILED, 0.0, None, message)
        else:
            await vault.metadata.update_recording(
                vault.workspace, job.recording_id, status=RecordingStatus.QUEUED
            )
            await self._publish(vault, job, "retrying", RecordingStatus.QUEUED, 0.0, None, message)

    @staticmethod
    async def _publish(
        vault: Vault,
        job: Job,
        kind: str,
        status: RecordingStatus,
        progress: float,
        stage: str | None,
        error: str | None = None,
    ) -> None:
        await vault.publish(
            job.recording_id,
            ProgressEvent(
                type=kind,
                status=status.value,
                stage=stage,
                progress=progress,
                job_id=job.id,
                error=error,
            ),
        )


async def _recording_exists(vault: Vault, job: Job) -> bool:
    try:
        await vault.get_recording(job.recording_id)
    except NotFound:
        return False
    return True


def _describe(error: BaseException) -> str:
    if isinstance(error, VoxVaultError):
        return error.message
    return f"{type(error).__name__}: {error}"[:4000]


async def run_workers(
    vault: Vault, count: int, *, transcribers: TranscriberFactory = _default_transcriber
) -> None:
    """Run ``count`` workers until cancelled, after handing back dead workers' jobs; when
    cancelled (a stopping process), hand back the jobs they held so that others take them at
    once instead of after their lease.

    The product's sweeps (status repair, gc) run every ``VOXVAULT_SWEEP_INTERVAL_S``: a queue
    that pushes runs them once per cluster in one of its workers; with the embedded queue this
    process runs them itself, even with no workers (an API-only ``serve``).
    """
    sweeps = product_sweeps(vault)
    if count <= 0:
        if not vault.jobs.pushes:
            await run_sweeps_periodically(sweeps, vault.settings.sweep_interval_s)
        return
    await reclaim_dead_workers(vault)
    names = [worker_name(index) for index in range(1 if vault.jobs.pushes else count)]
    try:
        if vault.jobs.pushes:
            worker = Worker(vault, name=names[0], transcribers=transcribers)
            await vault.jobs.serve(lambda job_id: worker.run_one([job_id]), count, sweeps=sweeps)
            return
        async with anyio.create_task_group() as group:
            group.start_soon(run_sweeps_periodically, sweeps, vault.settings.sweep_interval_s)
            for name in names:
                group.start_soon(Worker(vault, name=name, transcribers=transcribers).run)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(HAND_BACK_WAIT_S):
            try:
                await vault.jobs.expire_leases(names)
            except Exception:  # the lease lapses by itself
                log.warning("could not hand back the jobs of %s", names, exc_info=True)


async def run_until_finished(vault: Vault, job_ids: Collection[str]) -> list[Job]:
    """Run the given jobs in this process (or wait for another worker that took one) to
    their end; the CLI's ingest without a server."""
    worker = Worker(vault, name=worker_name(0), job_ids=job_ids)
    pending = set(job_ids)
    finished: dict[str, Job] = {}
    while pending:
        if await worker.run_one() is None:
            with anyio.move_on_after(0.5):
                await vault.wait_for_jobs()
        for job_id in list(pending):
            try:
                job = await vault.get_job(job_id)
            except NotFound:
                pending.discard(job_id)
                continue
            if job.status in FINISHED:
                finished[job_id] = job
                pending.discard(job_id)
    return [finished[j] for j in job_ids if j in finished]

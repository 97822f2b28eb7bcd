"""Store maintenance: ``fsck`` checks every blob against its row; ``gc`` sweeps what nothing owns.

fsck re-hashes every blob a recording row points at (the original, the playback rendition when
one is recorded, each artifact) against the sha256 recorded for it, and reports blobs that do not
match (``corrupt``), rows whose blobs are gone (``missing``), and bytes no row references
(``orphans``: blobs under ``recordings/`` and staging leftovers of puts that never finished).

gc removes orphans and staging leftovers, the pipeline's scratch directories of jobs that are no
longer queued or running, expired resumable uploads and the part blobs no upload needs (those of
settled uploads, and unrecorded chunks), and finishes what a crash cut short: deletes, and the
completion of full uploads whose client did not come back.

Both run beside live traffic, so neither may take work in progress for damage:

- Recordings being uploaded or deleted (``uploading``, ``deleting``) are neither checked nor
  swept: their rows and blobs change under the check by design, and the delete removes them.
- Bytes land before the row that points at them (handbook §2), so a blob without a row, or with
  a row that still records the checksum of the bytes it replaces, is normal for as long as a put
  takes. Anything written within the grace period (``VOXVAULT_GC_GRACE_S``) is left alone, and
  every finding is checked again against the row and the blob, as they are now, before it is
  reported or removed.
- A blob store tells a live put's staging from a dead one's itself (``staging_leftovers``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from voxvault.blobs import BlobInfo, BlobStore
from voxvault.blobs import keys as blob_keys
from voxvault.errors import Conflict, NotFound
from voxvault.metadata import RecordingBlobs
from voxvault.models import RecordingStatus

if TYPE_CHECKING:
    from voxvault.vault import Vault

log = logging.getLogger("voxvault.maintenance")

RECORDINGS_PREFIX = "recordings/"
ROW_PAGE = 500
# Rows in these states change their blobs on purpose right now; checking them would race.
IN_FLIGHT = frozenset({RecordingStatus.UPLOADING, RecordingStatus.DELETING})
_JOB_DIR = re.compile(r"[0-9a-f]{32}")

Sweep = Callable[[], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of fsck, or one thing gc removed; ``recording_id`` is ``None`` for staging."""

    recording_id: str | None
    key: str
    kind: str = "blob"
    """``blob`` (under ``recordings/``) or ``staging`` (a put's leftover, named by the store)."""
    workspace: str | None = None
    expected_sha256: str | None = None
    actual_sha256: str | None = None
    size: int | None = None
    modified_at: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        shown = {"recording_id": self.recording_id, "key": self.key}
        for name, value in asdict(self).items():
            if name not in shown and value is not None:
                shown[name] = value.isoformat() if isinstance(value, datetime) else value
        return shown


@dataclass(slots=True)
class FsckReport:
    checked: int = 0
    """Blobs read and hashed."""
    corrupt: list[Problem] = field(default_factory=list)
    missing: list[Problem] = field(default_factory=list)
    orphans: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.corrupt or self.missing or self.orphans)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "corrupt": [p.as_json() for p in self.corrupt],
            "missing": [p.as_json() for p in self.missing],
            "orphans": [p.as_json() for p in self.orphans],
        }


@dataclass(slots=True)
class GcReport:
    interrupted_deletes: int = 0
    expired_uploads: int = 0
    orphans: list[Problem] = field(default_factory=list)
    staging: list[Problem] = field(default_factory=list)
    scratch: list[str] = field(default_factory=list)
    """Job ids whose scratch directories were removed."""
    upload_parts: list[str] = field(default_factory=list)
    """Part blobs of resumable uploads that no upload needs any more."""
    completed_uploads: list[str] = field(default_factory=list)
    """Recordings made from full uploads whose completion had been cut short."""
    staging_listed: bool = True
    """False when the blob store cannot list its staging (S3: incomplete multipart uploads are
    left to the bucket's ``AbortIncompleteMultipartUpload`` lifecycle rule)."""

    @property
    def removed(self) -> int:
        return len(self.orphans) + len(self.staging) + len(self.scratch) + len(self.upload_parts)

    def as_json(self) -> dict[str, Any]:
        return {
            "removed": self.removed,
            "interrupted_deletes": self.interrupted_deletes,
            "expired_uploads": self.expired_uploads,
            "orphans": [p.as_json() for p in self.orphans],
            "staging": [p.as_json() for p in self.staging],
            "scratch": self.scratch,
            "upload_parts": self.upload_parts,
            "completed_uploads": self.completed_uploads,
            "staging_listed": self.staging_listed,
        }


def referenced_keys(row: RecordingBlobs) -> dict[str, str]:
    """Every key the row points at, with the sha256 recorded for it."""
    keys = {blob_keys.recording_original(row.recording_id): row.sha256}
    if row.playback_sha256 is not None:
        keys[blob_keys.recording_playback(row.recording_id)] = row.playback_sha256
    for name, sha256 in row.artifacts.items():
        keys[blob_keys.recording_artifact(row.recording_id, name)] = sha256
    return keys


def recording_of(key: str) -> str | None:
    parts = key.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] == "recordings" else None


async def sha256_of(blobs: BlobStore, key: str, size: int) -> str:
    """Stream the blob through sha256 (hashing off the event loop); ``NotFound``, ``Conflict``."""
    digest = hashlib.sha256()
    async for chunk in blobs.stream_range(key, 0, size):
        await anyio.to_thread.run_sync(digest.update, chunk)
    return digest.hexdigest()


class _Sweep:
    """One pass over the store: rows, blobs and the grace cutoff they are judged by."""

    def __init__(self, vault: Vault, grace_s: float | None) -> None:
        self.vault = vault
        self.blobs = vault.blobs
        self.metadata = vault.metadata
        grace = vault.settings.gc_grace_s if grace_s is None else grace_s
        self.cutoff = datetime.now(UTC) - timedelta(seconds=grace)

    async def rows(self) -> AsyncIterator[RecordingBlobs]:
        after: str | None = None
        while page := await self.metadata.list_recording_blobs(after=after, limit=ROW_PAGE):
            for row in page:
                yield row
            after = page[-1].recording_id

    async def expected_now(self, recording_id: str, key: str) -> str | None:
        """The sha256 the row records for ``key`` now; ``None`` when the row no longer points
        at it, is gone, or is being uploaded or deleted."""
        row = await self.metadata.get_recording_blobs(recording_id)
        if row is None or row.status in IN_FLIGHT:
            return None
        return referenced_keys(row).get(key)

    async def owned_now(self, recording_id: str | None, key: str) -> bool:
        """Whether a row (in any state) accounts for the key now."""
        if recording_id is None:
            return False
        row = await self.metadata.get_recording_blobs(recording_id)
        return row is not None and (row.status in IN_FLIGHT or key in referenced_keys(row))

    async def stat(self, key: str) -> BlobInfo | None:
        try:
            return await self.blobs.stat(key)
        except NotFound:
            return None

    async def orphans(self, listed: Sequence[BlobInfo], accounted: set[str]) -> list[Problem]:
        """Listed blobs under ``recordings/`` that no row accounts for, older than the grace,
        confirmed against the row and the blob as they are now."""
        found: list[Problem] = []
        for info in listed:
            if info.key in accounted or info.modified_at >= self.cutoff:
                continue
            recording_id = recording_of(info.key)
            if await self.owned_now(recording_id, info.key):
                continue
            now = await self.stat(info.key)
            if now is None or now.modified_at >= self.cutoff:
                continue
            found.append(
                Problem(recording_id, info.key, size=now.size, modified_at=now.modified_at)
            )
        return found

    async def staging(self) -> list[Problem]:
        leftovers = await self.blobs.staging_leftovers(self.cutoff)
        return [
            Problem(None, each.name, kind="staging", size=each.size, modified_at=each.modified_at)
            for each in leftovers
        ]

    async def listed_and_accounted(
        self, on_row: Callable[[RecordingBlobs], Awaitable[None]] | None = None
    ) -> tuple[list[BlobInfo], set[str]]:
        """The blobs under ``recordings/``, listed first, then the keys the rows account for:
        a blob whose row lands in between is young, and so left alone."""
        listed = [info async for info in self.blobs.list(RECORDINGS_PREFIX)]
        accounted: set[str] = set()
        in_flight: set[str] = set()
        async for row in self.rows():
            if row.status in IN_FLIGHT:
                in_flight.add(row.recording_id)
                continue
            accounted.update(referenced_keys(row))
            if on_row is not None:
                await on_row(row)
        accounted.update(info.key for info in listed if recording_of(info.key) in in_flight)
        return listed, accounted


async def fsck(vault: Vault, *, grace_s: float | None = None) -> FsckReport:
    """Check every blob of every recording row (all workspaces) and look for orphans."""
    sweep = _Sweep(vault, grace_s)
    report = FsckReport()

    async def verify(row: RecordingBlobs) -> None:
        for key, expected in referenced_keys(row).items():
            problem = await _verify(sweep, report, row, key, expected)
            if problem is not None:
                kind, found = problem
                (report.corrupt if kind == "corrupt" else report.missing).append(found)

    listed, accounted = await sweep.listed_and_accounted(verify)
    report.orphans = await sweep.orphans(listed, accounted)
    report.orphans += await sweep.staging()
    return report


async def _verify(
    sweep: _Sweep, report: FsckReport, row: RecordingBlobs, key: str, expected: str
) -> tuple[str, Problem] | None:
    """``("corrupt" | "missing", problem)``, or ``None`` when the blob is sound or in flux."""
    actual: str | None = None
    try:
        info = await sweep.blobs.stat(key)
        actual = await sha256_of(sweep.blobs, key, info.size)
        report.checked += 1
    except NotFound:
        pass
    except Conflict:
        actual = ""  # replaced while it was read: judged below, as a mismatch is
    if actual == expected:
        return None
    # Judge by the row and the blob as they are now, not as they were when the pass began.
    expected_now = await sweep.expected_now(row.recording_id, key)
    if expected_now is None:
        return None
    found = Problem(row.recording_id, key, workspace=row.workspace, expected_sha256=expected_now)
    now = await sweep.stat(key)
    if now is None:
        return "missing", found
    if expected_now == actual:
        return None
    if now.modified_at >= sweep.cutoff:
        return None  # just replaced: the put's row update follows
    if expected_now != expected or not actual:
        try:
            actual = await sha256_of(sweep.blobs, key, now.size)
            report.checked += 1
        except (NotFound, Conflict):
            return None
        if actual == expected_now:
            return None
    return "corrupt", Problem(
        row.recording_id,
        key,
        workspace=row.workspace,
        expected_sha256=expected_now,
        actual_sha256=actual,
        size=now.size,
        modified_at=now.modified_at,
    )


async def remove_expired_uploads(vault: Vault) -> int:
    """Remove expired resumable uploads with their parts (``uploads/`` belongs to that service,
    which knows which uploads are live); returns how many."""
    return await vault.uploads.expire_uploads()


async def collect_garbage(vault: Vault, *, grace_s: float | None = None) -> GcReport:
    """Remove what nothing owns and that is older than the grace period; see the module doc."""
    sweep = _Sweep(vault, grace_s)
    report = GcReport(staging_listed=vault.blobs.lists_staging)
    report.interrupted_deletes = await vault.finish_interrupted_deletes()
    report.completed_uploads = await vault.uploads.finish_stalled_completions()
    report.expired_uploads = await remove_expired_uploads(vault)
    report.upload_parts = await vault.uploads.sweep_parts(sweep.cutoff)
    listed, accounted = await sweep.listed_and_accounted()
    for orphan in await sweep.orphans(listed, accounted):
        # A last look just before the delete: a put may have landed since it was found.
        if await sweep.owned_now(orphan.recording_id, orphan.key):
            continue
        now = await sweep.stat(orphan.key)
        if now is None or now.modified_at >= sweep.cutoff:
            continue
        if await vault.blobs.delete(orphan.key):
            report.orphans.append(orphan)
    for leftover in await vault.blobs.staging_leftovers(sweep.cutoff):
        if await vault.blobs.remove_staging(leftover):
            report.staging.append(
                Problem(
                    None,
                    leftover.name,
                    kind="staging",
                    size=leftover.size,
                    modified_at=leftover.modified_at,
                )
            )
    report.scratch = await _sweep_scratch(vault, sweep.cutoff)
    for removed in (*report.orphans, *report.staging):
        log.info("gc removed %s %s", removed.kind, removed.key)
    return report


def _newest_mtime(path: Path) -> float:
    """The latest modification under ``path``: a job writing into it keeps it young."""
    newest = path.stat().st_mtime
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            try:
                newest = max(newest, (Path(dirpath) / name).lstat().st_mtime)
            except FileNotFoundError:
                continue
    return newest


def _scratch_candidates(work: Path, cutoff: datetime) -> list[Path]:
    if not work.is_dir():
        return []
    found = []
    for path in sorted(work.iterdir()):
        if not _JOB_DIR.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        try:
            if _newest_mtime(path) < cutoff.timestamp():
                found.append(path)
        except FileNotFoundError:
            continue
    return found


def _remove_if_still_old(path: Path, cutoff: datetime) -> bool:
    try:
        if _newest_mtime(path) >= cutoff.timestamp():
            return False
    except FileNotFoundError:
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not path.exists()


async def _sweep_scratch(vault: Vault, cutoff: datetime) -> list[str]:
    """Remove ``<data dir>/work/<job id>`` of jobs that are not queued or running (finished,
    or gone with their recording): what a worker that crashed mid-job left on this machine."""
    work = vault.settings.data_dir / "work"
    candidates = await anyio.to_thread.run_sync(_scratch_candidates, work, cutoff)
    if not candidates:
        return []
    # Read after the listing: a job claimed since makes its directory young again.
    live = await vault.jobs.live_job_ids()
    removed = []
    for path in candidates:
        if path.name in live:
            continue
        if await anyio.to_thread.run_sync(_remove_if_still_old, path, cutoff):
            removed.append(path.name)
    return removed


# ---- the periodic sweeper -------------------------------------------------------------------


def logged_sweep(name: str, sweep: Sweep) -> Sweep:
    """``sweep``, whose failure is logged (the next round tries again), not raised."""

    async def run() -> None:
        try:
            await sweep()
        except Exception:  # the next round tries again; a sweep must not stop the server
            log.warning("sweep %s failed", name, exc_info=True)

    return run


def product_sweeps(vault: Vault) -> list[Sweep]:
    """What the server runs every ``VOXVAULT_SWEEP_INTERVAL_S``, once per cluster: nothing
    when that is 0."""
    if vault.settings.sweep_interval_s <= 0:
        return []

    async def gc() -> None:
        report = await collect_garbage(vault)
        if report.removed or report.interrupted_deletes or report.expired_uploads:
            log.info("gc: %s", report.as_json())

    return [
        logged_sweep("repair_statuses", vault.repair_statuses),
        logged_sweep("catch_up_index", vault.catch_up_index),
        logged_sweep("gc", gc),
    ]


async def run_sweeps_periodically(sweeps: Sequence[Sweep], interval_s: float) -> None:
    """Run ``sweeps`` every ``interval_s`` until cancelled: the sweeper of a queue that does
    not run them itself (embedded, where one process is the whole cluster)."""
    if not sweeps or interval_s <= 0:
        return
    while True:
        await anyio.sleep(interval_s)
        for sweep in sweeps:
            await sweep()

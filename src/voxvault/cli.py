"""The ``voxvault`` command: serve the API, or work on the data directory directly.

Every command except ``serve`` opens the same stores the server uses (SQLite in WAL mode allows
both at once), so the CLI works whether or not a server is running.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NamedTuple, TypeVar

import anyio
import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from voxvault.errors import VoxVaultError
from voxvault.events import ProgressEvent
from voxvault.exports import ExportFormat
from voxvault.models import RecordingQuery, RecordingStatus
from voxvault.settings import Settings
from voxvault.tus_client import DEFAULT_CHUNK_BYTES
from voxvault.vault import Vault

app = typer.Typer(
    name="voxvault",
    help="VoxVault: storage for recordings, transcripts and everything derived from them.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
errors = Console(stderr=True)
T = TypeVar("T")

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="VOXVAULT_DATA_DIR", help="Data directory."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
DEFAULT_PUBLIC_URL = "http://127.0.0.1:8000"
"""Where playback links printed by the CLI point unless VOXVAULT_PUBLIC_URL says otherwise."""


@app.callback()
def main(ctx: typer.Context, data_dir: DataDir = None) -> None:
    ctx.obj = Settings(data_dir=data_dir) if data_dir is not None else Settings()


def _run(ctx: typer.Context, action: Callable[[Vault], Awaitable[T]]) -> T:
    """Open the vault of the context's settings, run ``action``, turn errors into exit 1."""
    settings: Settings = ctx.obj

    async def go() -> T:
        async with await Vault.open(settings) as vault:
            return await action(vault)

    try:
        return anyio.run(go)
    except VoxVaultError as exc:
        errors.print(f"[red]error:[/red] {escape(exc.message)}")
        if exc.detail:
            errors.print(json.dumps(exc.detail, default=str), markup=False)
        raise typer.Exit(1) from None


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    workers: Annotated[
        int, typer.Option(min=0, help="Pipeline workers in this process (0: API only).")
    ] = 1,
) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs) and run pipeline workers."""
    import uvicorn

    from voxvault.api import create_app

    settings: Settings = ctx.obj
    console.print(f"VoxVault on http://{host}:{port}  (data: {settings.data_dir})")
    # uvicorn's "auto" picks uvloop and httptools when uvicorn[standard] is installed but falls
    # back to asyncio and h11 without a word when it is not. h11 receives an upload body about a
    # third slower (docs/benchmarks.md, receive-only ceiling), and both fallbacks cost the event
    # loop more CPU per byte, which uploads share with hashing; so ask for the fast pair.
    uvicorn.run(
        create_app(settings=settings, workers=workers),
        host=host,
        port=port,
        log_level=log_level,
        loop="uvloop",
        http="httptools",
        workers=1,  # one process per `serve`: uvicorn's WEB_CONCURRENCY cannot fork an app object
    )


@app.command()
def migrate(ctx: typer.Context) -> None:
    """Bring the database schema up to date (the server also does this at start)."""

    async def action(vault: Vault) -> None:
        await vault.metadata.migrate()

    _run(ctx, action)
    console.print("database schema is up to date")


@app.command()
def ingest(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="Audio or video files.", exists=True)],
    title: Annotated[str | None, typer.Option(help="Title (for a single file).")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="Tag; repeatable.")] = None,
    server: Annotated[
        str | None,
        typer.Option(
            envvar="VOXVAULT_SERVER", help="Upload to this server instead of the data directory."
        ),
    ] = None,
    transcribe: Annotated[
        bool, typer.Option("--transcribe/--no-transcribe", help="Run the pipeline.")
    ] = True,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait for the pipeline to finish.")
    ] = True,
    resumable: Annotated[
        bool,
        typer.Option(
            "--resumable/--no-resumable",
            help="With --server: upload over tus in checksummed chunks, resumable after an "
            "interruption (the default), or in one plain request.",
        ),
    ] = True,
    chunk_bytes: Annotated[
        int, typer.Option(min=1, help="Bytes per resumable-upload chunk.")
    ] = DEFAULT_CHUNK_BYTES,
    upload_store: Annotated[
        Path | None,
        typer.Option(
            envvar="VOXVAULT_UPLOAD_STORE",
            help="JSON file keeping unfinished uploads' URLs "
            "(default: uploads.json in the user's cache directory).",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Store files as recordings and transcribe them, with progress bars.

    Without --server the files go into the data directory and this process runs their
    pipeline (a running server sharing the directory may take some of the jobs). With
    --server they are uploaded over tus: an upload cut short resumes where it stopped when
    the same command runs again.
    """
    if title and len(files) > 1:
        raise typer.BadParameter("--title applies to a single file")
    follow = transcribe and wait
    with _progress(as_json) as progress:
        bars = Bars(progress, files)
        if server is None:

            async def action(vault: Vault) -> list[dict[str, Any]]:
                return await _ingest_locally(vault, files, bars, title, tag, transcribe, follow)

            stored = _run(ctx, action)
        else:
            how = UploadOptions(resumable, chunk_bytes, upload_store)
            stored = _run_client(server, files, bars, title, tag, transcribe, follow, how)
    _report_ingest(stored, as_json)


def _progress(as_json: bool) -> Progress:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    return Progress(*columns, console=errors, transient=as_json)


class Bars:
    """One progress bar per file: bytes stored first, then the pipeline's progress events."""

    def __init__(self, progress: Progress, files: list[Path]) -> None:
        self.progress = progress
        self.tasks = [
            progress.add_task(path.name, total=max(1, path.stat().st_size), detail="uploading")
            for path in files
        ]

    def uploaded(self, index: int) -> Callable[[int], None]:
        task = next(task for task in self.progress.tasks if task.id == self.tasks[index])

        def advance(sent: int) -> None:
            self.progress.advance(task.id, sent)
            total_mb = (task.total or 0) / 1e6
            detail = f"uploading {task.completed / 1e6:,.1f} / {total_mb:,.1f} MB"
            self.progress.update(task.id, detail=detail)

        return advance

    def stored(self, index: int, follow: bool) -> None:
        task = self.tasks[index]
        self.progress.update(task, total=100, completed=0 if follow else 100, detail="stored")

    def event(self, index: int, event: ProgressEvent) -> None:
        detail = event.stage if event.status == RecordingStatus.PROCESSING else event.status
        if event.error:
            detail = f"{detail}: {event.error[:80]}"
        self.progress.update(
            self.tasks[index], completed=round(event.progress * 100), detail=escape(detail or "")
        )


async def _ingest_locally(
    vault: Vault,
    files: list[Path],
    bars: Bars,
    title: str | None,
    tags: list[str] | None,
    transcribe: bool,
    follow: bool,
) -> list[dict[str, Any]]:
    from voxvault.pipeline.worker import run_until_finished

    recordings = []
    for index, path in enumerate(files):
        recording = await vault.add_file(
            path, title=title, tags=tags, on_progress=bars.uploaded(index), transcribe=transcribe
        )
        bars.stored(index, follow)
        recordings.append(recording)
    if follow:
        jobs = [job for r in recordings if (job := await vault.jobs.latest(vault.workspace, r.id))]

        async def watch(index: int, recording_id: str) -> None:
            async for _, event in vault.watch(recording_id):
                bars.event(index, event)

        async with anyio.create_task_group() as group:
            for index, recording in enumerate(recordings):
                group.start_soon(watch, index, recording.id)
            await run_until_finished(vault, [job.id for job in jobs])
        recordings = [await vault.get_recording(r.id) for r in recordings]
    return [r.model_dump(mode="json") for r in recordings]


class UploadOptions(NamedTuple):
    resumable: bool
    chunk_bytes: int
    upload_store: Path | None


def _run_client(
    server: str,
    files: list[Path],
    bars: Bars,
    title: str | None,
    tags: list[str] | None,
    transcribe: bool,
    follow: bool,
    how: UploadOptions,
) -> list[dict[str, Any]]:
    from voxvault.client import VaultClient
    from voxvault.tus_client import UploadUrlStore

    url_store = UploadUrlStore(how.upload_store)

    async def go() -> list[dict[str, Any]]:
        async with VaultClient(server) as client:
            stored = []
            for index, path in enumerate(files):
                if how.resumable:
                    recording = await client.upload_resumable(
                        path,
                        title=title,
                        tags=tags,
                        transcribe=transcribe,
                        chunk_bytes=how.chunk_bytes,
                        url_store=url_store,
                        on_progress=bars.uploaded(index),
                    )
                else:
                    recording = await client.upload(
                        path,
                        title=title,
                        tags=tags,
                        transcribe=transcribe,
                        on_progress=bars.uploaded(index),
                    )
                bars.stored(index, follow)
                stored.append(recording)
            if not follow:
                return stored

            async def watch(index: int, recording_id: str) -> None:
                async for event in client.events(recording_id):
                    bars.event(index, event)

            async with anyio.create_task_group() as group:
                for index, recording in enumerate(stored):
                    group.start_soon(watch, index, recording["id"])
            return [await client.get_recording(r["id"]) for r in stored]

    try:
        return anyio.run(go)
    except VoxVaultError as exc:
        errors.print(f"[red]error:[/red] {escape(exc.message)}")
        raise typer.Exit(1) from None
    except httpx.HTTPError as exc:
        errors.print(f"[red]error:[/red] cannot reach {escape(server)}: {escape(str(exc))}")
        if how.resumable:
            errors.print("run the same command again to resume the upload where it stopped")
        raise typer.Exit(1) from None


def _report_ingest(stored: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        _print_json(stored)
    else:
        for item in stored:
            colour = "red" if item["status"] == RecordingStatus.FAILED else "green"
            line = (
                f"[{colour}]{item['status']}[/{colour}] {item['id']}  "
                f"{escape(item['filename'] or '')}  {item['duration_s']} s"
            )
            if item.get("error"):
                line += f"  {escape(item['error'])}"
            console.print(line)
    if any(item["status"] == RecordingStatus.FAILED for item in stored):
        raise typer.Exit(1)


@app.command()
def worker(
    ctx: typer.Context,
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs run at once.")] = 1,
) -> None:
    """Run pipeline workers without the API (until interrupted)."""
    from voxvault.pipeline.worker import run_workers

    async def action(vault: Vault) -> None:
        await vault.recover()
        console.print(f"{concurrency} worker(s) on {vault.settings.data_dir}")
        await run_workers(vault, concurrency)

    # SIGTERM (a container stopping, a scale-down) stops as Ctrl-C does: the running jobs are
    # handed back to the queue for other workers instead of waiting out their lease.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        _run(ctx, action)


@app.command("ls")
def list_recordings(
    ctx: typer.Context,
    status: Annotated[RecordingStatus | None, typer.Option(help="Only this status.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only recordings with this tag.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 100,
    as_json: JsonFlag = False,
) -> None:
    """List recordings, newest first."""

    async def action(vault: Vault) -> list[dict[str, Any]]:
        query = RecordingQuery(status=status, tag=tag, limit=min(limit, 500))
        found: list[dict[str, Any]] = []
        async for recording in vault.iter_recordings(query):
            found.append(recording.model_dump(mode="json"))
            if len(found) >= limit:
                break
        return found

    found = _run(ctx, action)
    if as_json:
        _print_json(found)
        return
    table = Table(expand=False)
    table.add_column("id", no_wrap=True, min_width=32)
    for column in ("title", "filename", "status", "duration", "size", "tags", "created"):
        table.add_column(column, overflow="fold")
    for item in found:
        cells = (
            item["id"],
            item["title"] or "",
            item["filename"] or "",
            item["status"],
            f"{item['duration_s']:.1f} s" if item["duration_s"] is not None else "",
            f"{item['size_bytes']:,}",
            ", ".join(item["tags"]),
            item["created_at"][:19],
        )
        # Plain Text cells: a title like "[/draft]" is shown as written, never read as markup.
        table.add_row(*(Text(cell) for cell in cells))
    console.print(table)


@app.command()
def show(ctx: typer.Context, recording_id: str) -> None:
    """Show one recording as JSON, with its transcript versions and artifacts."""

    async def action(vault: Vault) -> dict[str, Any]:
        recording = await vault.get_recording(recording_id)
        versions = await vault.list_transcript_versions(recording_id)
        artifacts = await vault.list_artifacts(recording_id)
        shown = recording.model_dump(mode="json")
        shown["transcript_versions"] = [v.model_dump(mode="json") for v in versions]
        shown["artifacts"] = [a.model_dump(mode="json") for a in artifacts]
        return shown

    _print_json(_run(ctx, action))


@app.command()
def export(
    ctx: typer.Context,
    recording_id: str,
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="Export format.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File to write.")] = None,
    version: Annotated[int | None, typer.Option(min=1, help="Transcript version.")] = None,
) -> None:
    """Export the transcript as srt, vtt, txt, md or json."""

    async def action(vault: Vault) -> str:
        text, _, _ = await vault.export_transcript(recording_id, fmt, version)
        return text

    text = _run(ctx, action)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        errors.print(f"wrote {output}")


@app.command("rm")
def remove(ctx: typer.Context, recording_ids: list[str]) -> None:
    """Delete recordings with every byte, transcript and artifact of them."""

    async def action(vault: Vault) -> None:
        for recording_id in recording_ids:
            await vault.delete_recording(recording_id)
            console.print(f"deleted {recording_id}")

    _run(ctx, action)


def _timecode(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@app.command()
def search(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help='Words, "phrases", a OR b, -excluded, prefix*.')],
    tag: Annotated[str | None, typer.Option(help="Only recordings with this tag.")] = None,
    speaker: Annotated[str | None, typer.Option(help="Only segments of this speaker.")] = None,
    language: Annotated[str | None, typer.Option(help="Only transcripts in this language.")] = None,
    recording: Annotated[str | None, typer.Option(help="Only this recording (its id).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100, help="At most this many hits.")] = 20,
    as_json: JsonFlag = False,
) -> None:
    """Find where something was said: recording, speaker and time code of each hit, best first."""

    async def action(vault: Vault) -> dict[str, Any]:
        asked = {
            "q": query,
            "tag": tag,
            "speaker": speaker,
            "language": language,
            "recording_id": recording,
            "limit": limit,
        }
        base_url = vault.settings.public_url or DEFAULT_PUBLIC_URL
        found = await vault.search(
            {k: v for k, v in asked.items() if v is not None}, base_url=base_url
        )
        return found.model_dump(mode="json")

    page = _run(ctx, action)
    if as_json:
        _print_json(page)
        return
    for hit in page["items"]:
        title = hit["recording_title"] or hit["recording_id"]
        who = f"{hit['speaker']}: " if hit["speaker"] else ""
        line = Text(f"{_timecode(hit['start']):>8}  ")
        line.append(title, style="bold")
        line.append(f"  {hit['recording_id']}\n          {who}")
        # The snippet's <mark> (around escaped text) becomes bold; nothing in it is markup.
        for n, part in enumerate(html.unescape(p) for p in re.split(r"</?mark>", hit["snippet"])):
            line.append(part, style="bold yellow" if n % 2 else "")
        console.print(line, soft_wrap=True)
    more = " (more: narrow the query)" if page["next_cursor"] or page["truncated"] else ""
    console.print(f"{len(page['items'])} hit(s){more}")


@app.command()
def reindex(ctx: typer.Context) -> None:
    """Rebuild the search index from the stored transcripts (every workspace)."""
    started = time.monotonic()
    count = _run(ctx, lambda vault: vault.reindex())
    console.print(f"indexed {count} recording(s) in {time.monotonic() - started:.1f} s")


@app.command("storage-info")
def storage_info(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Backends in use, what they hold, and free space."""

    async def action(vault: Vault) -> dict[str, Any]:
        return (await vault.storage_info()).model_dump(mode="json")

    info = _run(ctx, action)
    if as_json:
        _print_json(info)
        return
    table = Table("", "value", show_header=False)
    table.add_row("database", f"{info['database']['backend']}  {info['database']['url']}")
    table.add_row("blobs", f"{info['blobs']['backend']}  {info['blobs'].get('location', '')}")
    if "free_bytes" in info["blobs"]:
        table.add_row("free disk", f"{info['blobs']['free_bytes']:,} bytes")
    for name, value in info["usage"].items():
        table.add_row(name.replace("_", " "), f"{value:,}")
    console.print(table)


@app.command()
def fsck(
    ctx: typer.Context,
    as_json: JsonFlag = False,
    grace: Annotated[
        float | None,
        typer.Option(min=0, help="Seconds within which a write counts as in progress."),
    ] = None,
) -> None:
    """Re-hash every blob against its recorded sha256; report missing blobs and orphans.

    Exits 0 when everything is sound, 1 otherwise.
    """

    async def action(vault: Vault) -> dict[str, Any]:
        return (await vault.fsck(grace_s=grace)).as_json()

    report = _run(ctx, action)
    if as_json:
        _print_json(report)
    else:
        problems = [
            (kind, problem)
            for kind in ("corrupt", "missing", "orphans")
            for problem in report[kind]
        ]
        # One problem per line, never wrapped: ids and keys stay whole for grep and copy.
        for kind, problem in problems:
            if "expected_sha256" in problem:
                detail = f"expected sha256 {problem['expected_sha256'][:16]}…"
            else:
                detail = f"{problem.get('size', 0):,} bytes, {problem['modified_at'][:19]}"
            recording = problem["recording_id"] or "-"
            line = f"{kind.rstrip('s'):<8} {recording:<32}  {problem['key']}  ({detail})"
            console.print(Text(line), soft_wrap=True)
        counts = ", ".join(
            f"{len(report[kind])} {kind}" for kind in ("corrupt", "missing", "orphans")
        )
        verdict = "ok" if report["ok"] else "problems found"
        console.print(f"checked {report['checked']} blobs: {counts}: {verdict}")
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
def gc(
    ctx: typer.Context,
    as_json: JsonFlag = False,
    grace: Annotated[
        float | None,
        typer.Option(min=0, help="Keep what was written within this many seconds."),
    ] = None,
) -> None:
    """Remove orphaned blobs, staging leftovers, stale scratch directories and expired uploads
    older than the grace period (VOXVAULT_GC_GRACE_S), and finish interrupted deletes."""

    async def action(vault: Vault) -> dict[str, Any]:
        return (await vault.collect_garbage(grace_s=grace)).as_json()

    report = _run(ctx, action)
    if as_json:
        _print_json(report)
        return
    for kind in ("orphans", "staging"):
        for removed in report[kind]:
            console.print(Text(f"removed {removed['key']} ({removed.get('size', 0):,} bytes)"))
    for job_id in report["scratch"]:
        console.print(f"removed scratch directory of job {job_id}")
    console.print(
        f"removed {len(report['orphans'])} orphaned blob(s), {len(report['staging'])} staging "
        f"leftover(s), {len(report['scratch'])} scratch director(ies); finished "
        f"{report['interrupted_deletes']} interrupted delete(s), removed "
        f"{report['expired_uploads']} expired upload(s)"
    )
    if not report["staging_listed"]:
        console.print(
            "this blob store's unfinished uploads are removed by its own lifecycle rule "
            "(AbortIncompleteMultipartUpload)"
        )

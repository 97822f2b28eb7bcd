"""The FastAPI application: routers over one ``Vault``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio
from fastapi import FastAPI

from voxvault import __version__
from voxvault.api.errors import install_error_handlers
from voxvault.api.limits import JsonBodyLimit
from voxvault.api.routers import (
    artifacts,
    jobs,
    playback,
    recordings,
    search,
    system,
    transcripts,
    tus,
)
from voxvault.maintenance import logged_sweep
from voxvault.pipeline.worker import run_workers, transcriber_beside_api
from voxvault.settings import Settings
from voxvault.vault import Vault


async def _catch_up_index(vault: Vault) -> None:
    await logged_sweep("catch_up_index", vault.catch_up_index)()


def create_app(
    vault: Vault | None = None, settings: Settings | None = None, *, workers: int = 0
) -> FastAPI:
    """The API over ``vault``; without one, the app opens (and closes) its own from settings.

    ``workers`` pipeline workers run in this process, off the event loop's critical path; their
    engine leaves a core to the API (``engine_threads``).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if vault is None:
                opened = await stack.enter_async_context(await Vault.open(settings))
                await opened.recover()
            else:
                opened = vault
            app.state.vault = opened
            async with anyio.create_task_group() as group:
                group.start_soon(
                    partial(run_workers, transcribers=transcriber_beside_api), opened, workers
                )
                # Transcripts stored before the search index existed (or restored from a
                # backup without it) are indexed while the server already answers.
                group.start_soon(_catch_up_index, opened)
                yield
                group.cancel_scope.cancel()

    app = FastAPI(
        title="VoxVault",
        version=__version__,
        summary="Storage for recordings, transcripts and everything derived from them.",
        lifespan=lifespan,
    )
    if vault is not None:
        app.state.vault = vault
    install_error_handlers(app)
    app.add_middleware(JsonBodyLimit)
    app.add_middleware(tus.TusHeaders)
    # Routes are matched in this order, each request against every route before its own. First
    # the search, whose whole answer takes about a millisecond, then a resumable upload's
    # chunks, the requests that come in the longest runs (each 8 MiB chunk takes about 15 ms).
    for router in (search, tus, system, recordings, jobs, transcripts, artifacts, playback):
        app.include_router(router.router)
    return app

"""The FastAPI application: routers over one ``Vault``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from voxvault import __version__
from voxvault.api.errors import install_error_handlers
from voxvault.api.limits import JsonBodyLimit
from voxvault.api.routers import artifacts, playback, recordings, system, transcripts
from voxvault.settings import Settings
from voxvault.vault import Vault


def create_app(vault: Vault | None = None, settings: Settings | None = None) -> FastAPI:
    """The API over ``vault``; without one, the app opens (and closes) its own from settings."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if vault is not None:
            app.state.vault = vault
            yield
            return
        async with await Vault.open(settings) as opened:
            await opened.finish_interrupted_deletes()
            app.state.vault = opened
            yield

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
    for router in (system, recordings, transcripts, artifacts, playback):
        app.include_router(router.router)
    return app

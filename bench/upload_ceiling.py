"""A server with VoxVault's upload path and no storage behind it: how fast can a body come in?

``python -m bench.upload_ceiling --port N --scratch DIR [--http h11]`` serves, on uvicorn with
the event loop and HTTP parser that ``voxvault serve`` asks for (uvloop, httptools):

- ``POST /receive``: reads the body with Starlette's ``request.stream()`` and drops it, which
  is the most any upload route on this stack can reach;
- ``POST /hash``: hands the body to ``BlobStore.put_stream`` with a sink that drops the bytes,
  i.e. the upload pipeline (size, limit, the SHA-256 and the write threads) without a disk.

Both answer ``{"bytes": ..., "sha256": ...}`` (sha256 only for ``/hash``) so the benchmark can
check that what it timed was the whole body.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI, Request

from voxvault.blobs.base import BlobSink
from voxvault.blobs.local import LocalBlobStore

# What `voxvault serve` passes to uvicorn (src/voxvault/cli.py).
SERVE_LOOP = "uvloop"
SERVE_HTTP = "httptools"


class _DroppingSink(BlobSink):
    def write(self, data: bytes) -> None:
        pass

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _DroppingStore(LocalBlobStore):
    def _open_sink(self, key: str) -> BlobSink:
        return _DroppingSink()


def create_app(scratch: Path) -> FastAPI:
    app = FastAPI()
    store = _DroppingStore(scratch)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/receive")
    async def receive(request: Request) -> dict[str, int]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"bytes": size}

    @app.post("/hash")
    async def hash_only(request: Request) -> dict[str, int | str]:
        stored = await store.put_stream("ceiling/body", request.stream())
        return {"bytes": stored.size, "sha256": stored.sha256}

    return app


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--scratch", type=Path, required=True, help="an empty directory")
    parser.add_argument("--http", default=SERVE_HTTP, choices=("httptools", "h11"))
    args = parser.parse_args(argv)
    uvicorn.run(
        create_app(args.scratch),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        loop=SERVE_LOOP,
        http=args.http,
    )


if __name__ == "__main__":
    main()

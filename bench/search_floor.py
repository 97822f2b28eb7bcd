"""The least any Python HTTP front-end adds to the search's statement: a bare ASGI app.

``GET /?class=<key>`` runs that query class's statement (the one ``bench.search`` times bare)
on one driver connection, opened as the bare one is, and answers its rows as JSON; any other
request answers ``{}``. No framework, no validation, no service: only what serving the rows
over HTTP takes. ``bench.search`` runs it under uvicorn with the same loop and HTTP parser as
``voxvault serve`` and times it beside the API and the bare statement. On SQLite the
statement runs on the event loop itself, which a server answering more than one request at
a time could not afford.

Set up by ``bench.search`` through two variables: ``VOXVAULT_BENCH_FLOOR_DATABASE`` (a
PostgreSQL URL, or the SQLite file's path) and ``VOXVAULT_BENCH_FLOOR_STATEMENTS`` (a JSON file
of ``{key: [sql, parameters]}``).
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import psycopg
from starlette.types import Message, Receive, Scope, Send

DATABASE_ENV = "VOXVAULT_BENCH_FLOOR_DATABASE"
STATEMENTS_ENV = "VOXVAULT_BENCH_FLOOR_STATEMENTS"

_statements: dict[str, tuple[str, Any]] = {}
_postgres: psycopg.AsyncConnection[Any] | None = None
_sqlite: sqlite3.Connection | None = None


async def _open() -> None:
    global _postgres, _sqlite
    database = os.environ[DATABASE_ENV]
    _statements.update(json.loads(Path(os.environ[STATEMENTS_ENV]).read_text()))
    if database.startswith("postgresql"):
        _postgres = await psycopg.AsyncConnection.connect(
            database, autocommit=True, prepare_threshold=None
        )
    else:
        _sqlite = sqlite3.connect(database)


async def _close() -> None:
    if _postgres is not None:
        await _postgres.close()
    if _sqlite is not None:
        _sqlite.close()


async def _rows(key: str) -> list[Any]:
    sql, parameters = _statements[key]
    if _sqlite is not None:
        return _sqlite.execute(sql, parameters).fetchall()
    assert _postgres is not None
    cursor = await _postgres.execute(sql, parameters)
    return await cursor.fetchall()


async def _answer(send: Send, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message: Message = await receive()
            if message["type"] == "lifespan.startup":
                await _open()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await _close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    keys = parse_qs(scope["query_string"].decode()).get("class")
    if not keys:
        await _answer(send, b"{}")
        return
    rows = await _rows(keys[0])
    await _answer(send, json.dumps({"rows": rows}, default=str).encode())

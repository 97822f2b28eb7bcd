"""A search runs its statement on the pooled connection's driver connection, not through
SQLAlchemy's execute: it must answer exactly what SQLAlchemy running the same statement
answers, on both engines, and a database that cannot answer now must be a 503, not a 500.
"""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.pool import QueuePool

from tests.conformance.test_metadata_store import BASE_TIME, WS, store
from tests.conformance.test_search_index import recorded
from tests.faults import TcpProxy
from tests.postgres import postgres_database
from voxvault import Settings, Vault
from voxvault.api import create_app
from voxvault.errors import BackendUnavailable
from voxvault.metadata import MetadataStore
from voxvault.metadata import sql as metadata_sql
from voxvault.metadata.sql import SqlMetadataStore
from voxvault.search.base import IndexHit, IndexPage, SearchFilters
from voxvault.search.query import parse_query

pytestmark = pytest.mark.anyio
__all__ = ["store"]  # the fixture that runs each test on every engine


async def through_sqlalchemy(
    store: SqlMetadataStore,
    q: str,
    filters: SearchFilters,
    *,
    offset: int,
    limit: int,
    per_group: int | None = None,
) -> IndexPage:
    """The page as the search made it before it ran on the driver: the same statement through
    SQLAlchemy's execute, its columns looked up by name."""
    async with store.engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        statement, values = await store.search_index.statement(
            driver, WS, parse_query(q), filters, offset=offset, limit=limit, per_group=per_group
        )
        rows = (await conn.execute(statement, values)).mappings().all()
    hits = [
        IndexHit(
            row["recording_id"],
            row["title"],
            bool(row["has_playback"]),
            row["start"],
            row["end"],
            row["speaker"],
            row["text"],
            row["snippet"] or row["text"],
            row["grp"],
        )
        for row in rows
    ]
    total = rows[0]["total"] if rows else 0
    window = store.search_index.window
    return IndexPage(
        hits=hits,
        total=min(total, window),
        groups=rows[0]["groups"] if rows else 0,
        truncated=total > window,
    )


async def test_the_driver_answers_as_sqlalchemy_does(store: MetadataStore) -> None:
    assert isinstance(store, SqlMetadataStore)
    first = await recorded(
        store, (1.0, "budget plan", "Ana"), (2.0, "budget review", "Bob"), minutes=1, tags=["q1"]
    )
    await recorded(store, (3.0, "budget party", "Ana"), (4.0, "budgets galore"), minutes=5)
    await recorded(
        store,
        (5.0, "budget budget budget", "Zoé"),
        (6.0, "the budget again", "Ana"),
        (7.0, "nothing to see"),
        minutes=9,
        tags=["q1", "q2"],
        language="fr",
    )
    await recorded(store, *[f"budget line {n}" for n in range(6)], minutes=11, tags=["q2"])
    after = BASE_TIME + timedelta(minutes=2)
    cases: list[tuple[str, SearchFilters, dict[str, Any]]] = [
        ("budget", SearchFilters(), {"offset": 0, "limit": 100}),
        ("budget", SearchFilters(), {"offset": 3, "limit": 4}),  # a later page
        ("budget", SearchFilters(tag="q1", created_after=after), {"offset": 0, "limit": 100}),
        (
            "budget",
            SearchFilters(created_before=BASE_TIME + timedelta(minutes=10), speaker="Ana"),
            {"offset": 0, "limit": 100},
        ),
        # Exactly the first recording's time: encoded as SQLAlchemy would, "after" leaves it out.
        ("budget", SearchFilters(created_after=first.created_at), {"offset": 0, "limit": 100}),
        ("budget", SearchFilters(recording_id=first.id), {"offset": 0, "limit": 100}),
        ("budget", SearchFilters(language="en-GB"), {"offset": 0, "limit": 100}),
        ("budg*", SearchFilters(tag="q2"), {"offset": 0, "limit": 5}),  # snippets in one pass
        ('"budget line" -party', SearchFilters(), {"offset": 0, "limit": 100}),
        ("budget", SearchFilters(), {"offset": 0, "limit": 2, "per_group": 2}),
        ("budget", SearchFilters(created_after=after), {"offset": 1, "limit": 2, "per_group": 3}),
        ("absent", SearchFilters(), {"offset": 0, "limit": 100}),
    ]
    for q, filters, paging in cases:
        page = await store.search(WS, parse_query(q), filters, **paging)
        expected = await through_sqlalchemy(store, q, filters, **paging)
        assert page == expected, (q, filters, paging)
        assert page.hits or q == "absent", (q, filters, paging)
    on_the_dot = await store.search(
        WS, parse_query("budget"), SearchFilters(created_after=first.created_at), offset=0, limit=9
    )
    assert first.id not in {hit.recording_id for hit in on_the_dot.hits}
    grouped = await store.search(
        WS, parse_query("budget"), SearchFilters(), offset=0, limit=2, per_group=2
    )
    assert (grouped.groups, [hit.group for hit in grouped.hits]) == (4, [1, 1, 2, 2])


async def test_searches_at_once_share_the_five_search_connections(store: MetadataStore) -> None:
    # A search gives its connection back outside SQLAlchemy's greenlet, which is safe only
    # while that needs no I/O: the pool never closes a returned connection (no overflow), so
    # the sixth search at once waits for one of the five instead of opening a sixth.
    assert isinstance(store, SqlMetadataStore)
    await recorded(store, "the budget for next year", "nothing else")
    query, filters = parse_query("budget"), SearchFilters()
    pages: list[IndexPage] = []

    opened: list[object] = []
    sa.event.listen(store.search_engine.sync_engine, "connect", lambda c, _: opened.append(c))
    at_once = 0

    async def one() -> None:
        nonlocal at_once
        at_once += 1
        pages.append(await store.search(WS, query, filters, offset=0, limit=10))
        at_once -= 1

    async def count() -> None:
        while len(pages) < 16:
            peak.append(at_once)
            await anyio.sleep(0)

    peak: list[int] = []
    async with anyio.create_task_group() as group:
        group.start_soon(count)
        for _ in range(16):
            group.start_soon(one)
    assert max(peak) == 16  # all of them under way together
    assert len(opened) == 5
    assert all([hit.text for hit in page.hits] == ["the budget for next year"] for page in pages)
    pool = store.search_engine.pool
    assert isinstance(pool, QueuePool)
    assert (pool.checkedout(), pool.overflow() <= 0) == (0, True)
    assert pool.checkedin() == 5


async def test_a_search_on_sqlite_runs_no_statement_through_sqlalchemy(tmp_path: Path) -> None:
    store = SqlMetadataStore(f"sqlite:///{tmp_path / 'meta.db'}")
    await store.migrate()
    try:
        await recorded(store, "budget plan")
        statements: list[str] = []
        sa.event.listen(
            store.search_engine.sync_engine,
            "before_cursor_execute",
            lambda _conn, _cursor, sql, *_: statements.append(sql),
        )
        page = await store.search(WS, parse_query("budget"), SearchFilters(), offset=0, limit=5)
        assert [hit.text for hit in page.hits] == ["budget plan"]
        assert statements == []  # nor a BEGIN, nor a ROLLBACK when the connection is returned
    finally:
        await store.close()


async def test_a_statement_sqlite_rejects_stays_an_error_and_is_not_a_503(tmp_path: Path) -> None:
    store = SqlMetadataStore(f"sqlite:///{tmp_path / 'meta.db'}")
    await store.migrate()
    try:
        async with store.engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            with pytest.raises(sqlite3.OperationalError, match="no such column"):
                await store.search_index._run(driver, "SELECT nonsense", [])
    finally:
        await store.close()


# ---- a database that cannot answer now ----------------------------------------------------------


async def _vault_with_a_hit(tmp_path: Path, database_url: str) -> Vault:
    vault = await Vault.open(Settings(data_dir=tmp_path / "data", database_url=database_url))
    assert isinstance(vault.metadata, SqlMetadataStore)
    await recorded(vault.metadata, "budget plan")
    return vault


async def _search(vault: Vault) -> httpx.Response:
    transport = httpx.ASGITransport(app=create_app(vault))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.get("/v1/search", params={"q": "budget"})


async def test_a_locked_sqlite_database_is_a_503_on_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A connection in WAL mode keeps a shared lock on the file while it is open, so another
    # process can lock a reader out only before the reader connects: the search meets the
    # lock when the pool opens its connection, and waits the busy timeout (lowered here,
    # with the URL's timeout, which applies before the pragma sets it).
    monkeypatch.setattr(metadata_sql, "SQLITE_BUSY_TIMEOUT_MS", 200)
    database = tmp_path / "meta.db"
    vault = await _vault_with_a_hit(tmp_path, f"sqlite:///{database}?timeout=0.2")
    try:
        assert isinstance(vault.metadata, SqlMetadataStore)
        assert (await _search(vault)).status_code == 200
        await vault.metadata.engine.dispose()
        await vault.metadata.search_engine.dispose()
        holder = sqlite3.connect(database, isolation_level=None)
        try:
            holder.execute("PRAGMA locking_mode=EXCLUSIVE")
            holder.execute("BEGIN EXCLUSIVE")
            response = await _search(vault)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "backend_unavailable"
        finally:
            holder.close()
        assert (await _search(vault)).status_code == 200  # the lock gone, the search is back
    finally:
        await vault.close()


async def test_sqlite_failing_the_search_statement_is_a_503(tmp_path: Path) -> None:
    # The driver's own error at the search's statement (here SQLite interrupting it, as it
    # answers a lock past the busy timeout: an OperationalError that is no mistake in the
    # statement) is a 503 like the lock above, not a 500.
    vault = await _vault_with_a_hit(tmp_path, f"sqlite:///{tmp_path / 'meta.db'}")
    try:
        assert isinstance(vault.metadata, SqlMetadataStore)
        engine = vault.metadata.search_engine
        await engine.dispose()  # the pool's one connection from here on is this one
        async with engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            await driver.set_progress_handler(lambda: 1, 1)
        response = await _search(vault)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "backend_unavailable"
        async with engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            await driver.set_progress_handler(None, 1)
        assert (await _search(vault)).status_code == 200
    finally:
        await vault.close()


async def test_a_search_whose_pooled_connection_died_runs_again_on_a_new_one() -> None:
    # PostgreSQL's search connections are not pinged before each use (a round trip per
    # search): one the database dropped while it idled in the pool (a restart, a reset path)
    # fails at the statement, and the search then runs once more on a new connection. Only a
    # database that cannot be reached at all is a 503.
    with postgres_database() as url, TcpProxy.for_url(url) as proxy:
        store = SqlMetadataStore(proxy.url_for(url))
        try:
            await store.migrate()
            await recorded(store, "the budget for next year", "nothing else")
            query, filters = parse_query("budget"), SearchFilters()
            first = await store.search(WS, query, filters, offset=0, limit=10)
            assert [hit.text for hit in first.hits] == ["the budget for next year"]
            accepted = proxy.accepted
            with proxy.outage():  # every open connection reset, the pool's idle one too
                pass
            assert await store.search(WS, query, filters, offset=0, limit=10) == first
            assert proxy.accepted == accepted + 1  # the dead one replaced by one new one
            with proxy.outage(), pytest.raises(BackendUnavailable):
                await store.search(WS, query, filters, offset=0, limit=10)
            assert await store.search(WS, query, filters, offset=0, limit=10) == first
        finally:
            await store.close()

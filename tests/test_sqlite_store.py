"""SQLite specifics of the embedded metadata store: durability settings and migrations."""

from __future__ import annotations

import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from voxvault import Settings, Vault
from voxvault.errors import BackendUnavailable
from voxvault.metadata import DEFAULT_WORKSPACE
from voxvault.metadata.sql import SqlMetadataStore
from voxvault.metadata.uploads import (
    Upload,
    UploadPart,
    UploadStatus,
    UploadStore,
    open_upload_store,
)

pytestmark = pytest.mark.anyio


def migrations_head() -> str:
    """The newest revision among the migrations the package ships."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from voxvault.metadata.sql import MIGRATIONS_DIR

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


async def test_every_connection_is_wal_with_full_sync_and_foreign_keys(tmp_path: Path) -> None:
    store = SqlMetadataStore(f"sqlite:///{tmp_path / 'v.db'}")
    try:
        await store.migrate()
        async with store.engine.connect() as conn:
            pragmas = {
                name: (await conn.execute(sa.text(f"PRAGMA {name}"))).scalar_one()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
    finally:
        await store.close()
    # synchronous: 2 is FULL (0 OFF, 1 NORMAL, 3 EXTRA).
    assert pragmas == {
        "journal_mode": "wal",
        "synchronous": 2,
        "foreign_keys": 1,
        "busy_timeout": 30000,
    }


async def test_a_connection_returned_in_a_transaction_is_rolled_back(tmp_path: Path) -> None:
    """The pool skips its rollback on return when there is nothing to roll back; a transaction
    left open is still rolled back, so its writes vanish and it holds no lock."""
    store = SqlMetadataStore(f"sqlite:///{tmp_path / 'v.db'}")
    try:
        await store.migrate()
        async with store.engine.begin() as conn:
            await conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
        async with store.engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            await driver.execute("BEGIN IMMEDIATE")
            await driver.execute("INSERT INTO t VALUES (1)")
        # Back in the pool, mid-transaction as far as SQLAlchemy knows.
        assert not driver.in_transaction
        with sqlite3.connect(tmp_path / "v.db", timeout=0.1) as db:
            db.execute("INSERT INTO t VALUES (2)")  # no lock left behind
        async with store.engine.connect() as conn:
            rows = (await conn.execute(sa.text("SELECT x FROM t"))).scalars().all()
    finally:
        await store.close()
    assert rows == [2]


async def test_open_migrates_to_head_and_creates_the_default_workspace(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    async with await Vault.open(settings):
        pass
    with sqlite3.connect(tmp_path / "data" / "voxvault.db") as db:
        version = db.execute("SELECT version_num FROM alembic_version").fetchall()
        workspaces = db.execute("SELECT id FROM workspaces").fetchall()
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert version == [(migrations_head(),)]
    assert workspaces == [("default",)]
    assert {"recordings", "recording_tags", "transcripts", "artifacts", "jobs"} <= tables


async def test_open_without_migrate_does_not_touch_the_schema(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    async with await Vault.open(settings, migrate=False):
        pass
    with sqlite3.connect(tmp_path / "data" / "voxvault.db") as db:
        tables = db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    assert tables == []


async def test_an_exhausted_connection_pool_is_backend_unavailable(tmp_path: Path) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from voxvault.errors import BackendUnavailable
    from voxvault.metadata.sql import _Pool

    engine = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}",
        poolclass=_Pool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.2,
    )
    try:
        async with engine.connect():
            with pytest.raises(BackendUnavailable, match="no free connection"):
                async with engine.connect():
                    pass  # pragma: no cover - the pool has no connection to give
        async with engine.connect() as again:  # once one is free, it is handed out again
            assert (await again.exec_driver_sql("SELECT 1")).scalar() == 1
    finally:
        await engine.dispose()


async def _store_with_an_upload(path: Path) -> tuple[SqlMetadataStore, UploadStore, Upload]:
    metadata = SqlMetadataStore(f"sqlite:///{path}")
    await metadata.migrate()
    store = open_upload_store(metadata)
    now = datetime.now(UTC)
    upload = Upload(
        id=uuid.uuid4().hex,
        workspace=DEFAULT_WORKSPACE,
        length=100,
        offset=0,
        metadata={},
        status=UploadStatus.ACTIVE,
        recording_id=uuid.uuid4().hex,
        created_at=now,
        updated_at=now,
        expires_at=now + timedelta(days=1),
    )
    await store.create_upload(upload)
    return metadata, store, upload


async def test_a_recorded_chunk_is_committed_and_holds_no_lock(tmp_path: Path) -> None:
    """The update recording a chunk commits itself: another process sees it at once and can
    write at once."""
    metadata, store, upload = await _store_with_an_upload(tmp_path / "meta.db")
    try:
        now = datetime.now(UTC)
        appended = await store.append_part(
            upload, UploadPart("grown", 40), now=now, expires_at=now + timedelta(days=1)
        )
        assert appended is not None
        other = sqlite3.connect(tmp_path / "meta.db", timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # "database is locked" if a transaction were open
            offset = other.execute(
                "SELECT upload_offset FROM uploads WHERE id = ?", (upload.id,)
            ).fetchone()
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert offset == (40,)
    finally:
        await metadata.close()


async def test_a_chunk_that_cannot_be_recorded_while_the_database_is_locked_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("voxvault.metadata.sql.SQLITE_BUSY_TIMEOUT_MS", 100)
    metadata, store, upload = await _store_with_an_upload(tmp_path / "meta.db")
    holder = sqlite3.connect(tmp_path / "meta.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        now = datetime.now(UTC)
        with pytest.raises(BackendUnavailable):
            await store.append_part(
                upload, UploadPart("grown", 40), now=now, expires_at=now + timedelta(days=1)
            )
        holder.execute("ROLLBACK")
        assert (await store.get_upload(DEFAULT_WORKSPACE, upload.id)).offset == 0
        appended = await store.append_part(
            upload, UploadPart("grown", 40), now=now, expires_at=now + timedelta(days=1)
        )
        assert appended is not None
        assert appended.offset == 40
    finally:
        holder.close()
        await metadata.close()

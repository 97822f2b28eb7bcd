"""PostgreSQL for the test suites: a fresh, uniquely named database per test, dropped afterwards.

The server is the one ``VOXVAULT_TEST_POSTGRES_URL`` names (a ``postgresql://`` URL whose user
may create databases), by default a local one with trust auth. When it cannot be reached a test
that needs it is skipped, except under CI (``CI`` set), where it fails: CI must not go green
without having run the PostgreSQL adapters.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import pytest
from sqlalchemy.engine import make_url

POSTGRES_URL_ENV = "VOXVAULT_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
CONNECT_TIMEOUT_S = 3
DATABASE_PREFIX = "voxvault_test_"

# Read once at import: conftest's autouse fixture clears every VOXVAULT_* variable for each test.
SERVER_URL = os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL


# Why the server could not be reached, once known: later tests skip without waiting again.
_unreachable: dict[str, str] = {}


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required under CI)", pytrace=False)
    pytest.skip(reason)


@contextmanager
def postgres_database(server_url: str = SERVER_URL) -> Iterator[str]:
    """Create a database of its own on the server, yield its URL, and drop it afterwards."""
    try:
        import psycopg
        from psycopg import sql
    except ImportError:
        _unavailable("psycopg is not installed (pip install 'psycopg[binary]')")
    server = make_url(server_url)
    shown = server.render_as_string(hide_password=True)
    conninfo = server.set(drivername="postgresql").render_as_string(hide_password=False)
    if conninfo in _unreachable:
        _unavailable(_unreachable[conninfo])
    name = f"{DATABASE_PREFIX}{uuid.uuid4().hex}"
    try:
        with psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.OperationalError as exc:
        _unreachable[conninfo] = f"PostgreSQL at {shown} is unreachable: {exc}".strip()
        _unavailable(_unreachable[conninfo])
    database = server.set(drivername="postgresql", database=name)
    try:
        yield database.render_as_string(hide_password=False)
    finally:
        # FORCE ends the sessions a test left open (PostgreSQL 13 and later).
        with psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

"""Redis for the test suites: a unique key prefix per test, its keys deleted afterwards.

The server is the one ``VOXVAULT_TEST_REDIS_URL`` names (a ``redis://`` URL), by default a local
one. When it cannot be reached a test that needs it is skipped, except under CI (``CI`` set),
where it fails: CI must not go green without having run the Redis adapter.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

if TYPE_CHECKING:
    import redis

REDIS_URL_ENV = "VOXVAULT_TEST_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
CONNECT_TIMEOUT_S = 1.0
PREFIX = "voxvault-test:"

# Read once at import: conftest's autouse fixture clears every VOXVAULT_* variable for each test.
SERVER_URL = os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL

# Why the server could not be reached, once known: later tests skip without waiting again.
_unreachable: dict[str, str] = {}


@dataclass(frozen=True)
class RedisKeys:
    """A test's share of the server: every key it creates starts with ``prefix``."""

    server_url: str
    prefix: str

    @property
    def url(self) -> str:
        """The server URL with ``?prefix=``, as ``VOXVAULT_EVENTS_URL`` would carry it."""
        return with_query(self.server_url, prefix=self.prefix)

    def keys(self) -> list[str]:
        """The test's keys now (a synchronous look, for assertions)."""
        with _client(self.server_url) as client:
            return sorted(str(k) for k in client.scan_iter(match=f"{self.prefix}*", count=1000))


def with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in params]
    return urlunsplit(parts._replace(query=urlencode([*query, *params.items()])))


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required under CI)", pytrace=False)
    pytest.skip(reason)


@contextmanager
def _client(server_url: str) -> Iterator[redis.Redis]:
    import redis

    client = redis.Redis.from_url(
        server_url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=CONNECT_TIMEOUT_S * 5,
        decode_responses=True,
    )
    try:
        yield client
    finally:
        client.close()


@contextmanager
def redis_keys(server_url: str = SERVER_URL) -> Iterator[RedisKeys]:
    """A key prefix of the test's own on the server; deletes the keys under it afterwards."""
    try:
        import redis
    except ImportError:
        _unavailable("redis is not installed (pip install 'redis>=5')")
    if server_url in _unreachable:
        _unavailable(_unreachable[server_url])
    with _client(server_url) as client:
        try:
            client.ping()
        except redis.RedisError as exc:
            parts = urlsplit(server_url)
            shown = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
            _unreachable[server_url] = f"Redis at {shown} is unreachable: {exc}"
            _unavailable(_unreachable[server_url])
    keys = RedisKeys(server_url, f"{PREFIX}{uuid.uuid4().hex}")
    try:
        yield keys
    finally:
        with _client(server_url) as client:
            stale = list(client.scan_iter(match=f"{keys.prefix}*", count=1000))
            if stale:
                client.delete(*stale)

"""The scale-out engines the benchmarks run on: PostgreSQL, Redis, and moto's S3 server.

PostgreSQL and Redis are the servers ``VOXVAULT_BENCH_POSTGRES_URL`` and
``VOXVAULT_BENCH_REDIS_URL`` name (by default local ones on their usual ports); a benchmark gets
a fresh database, dropped afterwards, and a unique Redis key prefix, whose keys are deleted
afterwards. moto's S3 server is started as a child process on a free loopback port, its
spill files in the benchmark's scratch directory. When one of them cannot be reached the
benchmark raises ``Unavailable`` and reports itself skipped (``Skipped``) instead of failing
the whole run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from bench.common import (
    VENV_BIN,
    BenchError,
    clean_env,
    free_port,
    log,
    managed_process,
    tail,
)
from bench.report import Row, Table

POSTGRES_URL_ENV = "VOXVAULT_BENCH_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL_ENV = "VOXVAULT_BENCH_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
CONNECT_TIMEOUT_S = 3
MOTO_STARTUP_S = 60.0
S3_BUCKET = "voxvault-bench"
S3_REGION = "us-east-1"
# moto accepts any credentials; these keep the real ones (if any) out of the benchmark.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "voxvault-bench", "AWS_SECRET_ACCESS_KEY": "voxvault-bench"}


class Unavailable(BenchError):
    """A server the benchmark needs cannot be reached: the benchmark is skipped, not failed."""


@dataclass(frozen=True, slots=True)
class Skipped:
    """The result of a benchmark that could not run here, with the reason in its table."""

    title: str
    reason: str

    def table(self) -> Table:
        return Table(
            title=self.title,
            baseline_name="—",
            intro="**Skipped in this run**; the reason is below.",
            rows=[Row("skipped", "—", "—", None, "—", "skipped")],
            notes=[" ".join(self.reason.split())],
        )


def postgres_server_url() -> str:
    return os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL


def redis_server_url() -> str:
    return os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL


def with_query(url: str, **params: str) -> str:
    """``url`` with the query parameters ``params`` set (replacing any of the same name)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in params]
    return urlunsplit(parts._replace(query=urlencode([*query, *params.items()])))


def _shown(url: str) -> str:
    """``url`` without credentials, for messages."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


# ---- PostgreSQL --------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_database(purpose: str) -> Iterator[str]:
    """A new, empty database on the PostgreSQL server; its URL. Dropped afterwards."""
    import psycopg
    from psycopg import sql

    server = postgres_server_url()
    try:
        admin = psycopg.connect(server, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.Error as exc:
        raise Unavailable(
            f"PostgreSQL at {_shown(server)} is unreachable ({str(exc).strip()}); set "
            f"{POSTGRES_URL_ENV} to a server where the user may create databases"
        ) from exc
    name = f"voxvault_bench_{purpose}_{uuid.uuid4().hex[:12]}"
    try:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
        finally:
            # FORCE: a server process stopped with SIGKILL may leave a session behind.
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    finally:
        admin.close()


# ---- Redis -------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_prefix(purpose: str) -> Iterator[tuple[str, str]]:
    """(server URL, a key prefix no one else uses); every key under the prefix is deleted
    afterwards."""
    import redis

    server = redis_server_url()
    client = redis.Redis.from_url(
        server, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=10
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        raise Unavailable(f"Redis at {_shown(server)} is unreachable ({exc})") from exc
    prefix = f"voxvault-bench-{purpose}-{uuid.uuid4().hex[:12]}"
    try:
        yield server, prefix
    finally:
        try:
            # The prefix ends in random hex, so it holds no glob character.
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


# ---- S3 (moto's standalone server) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class S3Endpoint:
    url: str
    bucket: str
    pid: int

    @property
    def blob_url(self) -> str:
        """``VOXVAULT_BLOB_URL`` of the bucket."""
        return f"s3://{self.bucket}?endpoint_url={self.url}&region={S3_REGION}"


def s3_client_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (``clean_env()`` by default) with only the dummy ``AWS_*`` credentials."""
    env = {k: v for k, v in (base or clean_env()).items() if not k.startswith("AWS_")}
    return {**env, **S3_CREDENTIALS}


def _moto_command() -> list[str]:
    script = VENV_BIN / "moto_server"
    if script.exists():
        return [str(script)]
    if importlib.util.find_spec("moto") is None:
        raise Unavailable("moto's S3 server is not installed (pip install 'moto[server]')")
    return [sys.executable, "-m", "moto.server"]


@contextlib.contextmanager
def moto_s3(workdir: Path) -> Iterator[S3Endpoint]:
    """moto's standalone S3 server on a free loopback port, with an empty bucket."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "moto.log"
    spill = workdir / "moto-tmp"
    spill.mkdir()
    # moto keeps large objects in spooled temporary files: keep them in the scratch directory.
    env = {**s3_client_env(), "TMPDIR": str(spill)}
    argv = [*_moto_command(), "-H", "127.0.0.1", "-p", str(port)]
    with managed_process(argv, log_path=log_path, env=env) as proc:
        deadline = time.monotonic() + MOTO_STARTUP_S
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                if proc.poll() is not None:
                    raise Unavailable(f"moto's S3 server exited at start:\n{tail(log_path)}")
                try:
                    if client.get(f"{url}/").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise Unavailable(f"moto's S3 server did not answer:\n{tail(log_path)}")
                time.sleep(0.1)
            created = client.put(f"{url}/{S3_BUCKET}")
            if created.status_code != 200:
                raise BenchError(f"creating the bucket answered {created.status_code}")
        log(f"[s3] moto's S3 server on {url}, bucket {S3_BUCKET}")
        yield S3Endpoint(url, S3_BUCKET, proc.pid)

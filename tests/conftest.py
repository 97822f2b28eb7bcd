"""Shared fixtures: an isolated data directory, a Vault on it, the API over it, a live server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import psutil
import pytest

from voxvault import Settings, Vault
from voxvault.api import create_app

VOXVAULT_BIN = Path(sys.executable).parent / "voxvault"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No VOXVAULT_* setting of the developer's shell leaks into a test, and no test writes
    the user's own files (the resumable-upload client keeps its URLs in the user's cache)."""
    for name in list(os.environ):
        if name.startswith("VOXVAULT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("VOXVAULT_UPLOAD_STORE", str(tmp_path / "upload-urls.json"))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir)


@pytest.fixture
async def vault(settings: Settings) -> AsyncIterator[Vault]:
    async with await Vault.open(settings) as opened:
        yield opened


@pytest.fixture
async def client(vault: Vault) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(vault))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


def stored_files(data_dir: Path) -> list[Path]:
    """Every file under the blob store, staging included: what a refused request must not leave."""
    blobs = data_dir / "blobs"
    return sorted(p for p in blobs.rglob("*") if p.is_file()) if blobs.exists() else []


@contextmanager
def within(seconds: float, awaited: str) -> Iterator[None]:
    """Fail the test, saying what it was waiting for, when the block (in an async test) has not
    finished within ``seconds``: it is cancelled then, instead of waiting forever."""
    with anyio.move_on_after(seconds) as scope:
        yield
    if scope.cancelled_caught:
        pytest.fail(f"still waiting after {seconds} s for {awaited}")


def run_voxvault(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``voxvault <args>`` in a child process, killed and the test failed if it has not
    exited within ``timeout`` (a command that follows a server waits as long as the server
    lets it)."""
    command = [str(VOXVAULT_BIN), *args]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"voxvault {' '.join(args)} had not exited after {timeout} s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


PORT_ATTEMPTS = 5


class PortTaken(RuntimeError):
    """The server could not bind its port: something else took it after it was picked."""


class LiveServer:
    """``voxvault serve`` in a child process, as a user would run it."""

    def __init__(
        self, data_dir: Path, env: dict[str, str] | None = None, args: Sequence[str] = ()
    ) -> None:
        self.data_dir = data_dir
        self.env = {**os.environ, **(env or {})}
        self.args = list(args)
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(PORT_ATTEMPTS):
            self._start(free_port())
            try:
                self._wait_until_healthy()
                return
            except PortTaken:  # tests run in parallel: another server took the port first
                continue
        raise RuntimeError(f"no free port after {PORT_ATTEMPTS} attempts")

    def _start(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = self.data_dir.parent / f"server-{port}.log"
        command = [
            str(VOXVAULT_BIN),
            "--data-dir",
            str(self.data_dir),
            "serve",
            "--port",
            str(port),
            "--log-level",
            "warning",
            *self.args,
        ]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.log.read_text()
                if "address already in use" in output.lower():
                    raise PortTaken(output)
                raise RuntimeError(f"server exited: {output}")
            try:
                healthy = httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                healthy = False
            # The port was free when picked, but another test's server (tests run in parallel)
            # may have taken it since: only a server that is this process counts.
            if healthy and self._listens():
                return
            time.sleep(0.1)
        raise RuntimeError(f"server did not start: {self.log.read_text()}")

    def _listens(self) -> bool:
        """Whether this server's own process listens on its port."""
        try:
            sockets = psutil.Process(self.process.pid).net_connections(kind="tcp")
        except psutil.Error:
            return False
        return any(
            sock.status == psutil.CONN_LISTEN and sock.laddr and sock.laddr.port == self.port
            for sock in sockets
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def live_server(data_dir: Path) -> Iterator[LiveServer]:
    server = LiveServer(data_dir)
    try:
        yield server
    finally:
        server.stop()


# The scale-out stack of the API suites (tests/stacks.py) starts once per session, whichever
# modules use it, and stops after the last test that uses it; its own module imports this one,
# hence the import at the end.
from tests.stacks import scaleout_stack, stop_scaleout, uses_scaleout  # noqa: E402, F401

_last_scaleout_test: list[pytest.Item] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    # A worker of pytest-xdist runs the files it is sent, in no order known here: the last user
    # in collection order may run before others, so there the stack stops with the session.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    users = [item for item in session.items if uses_scaleout(item)]
    _last_scaleout_test[:] = users[-1:]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    try:
        return (yield)
    finally:
        if _last_scaleout_test and item is _last_scaleout_test[0]:
            stop_scaleout()

"""Network faults for the test suites: a TCP proxy that a test can cut and restore.

A backend (S3, PostgreSQL, Redis) placed behind a ``TcpProxy`` is reached through a loopback
port the proxy listens on. ``cut()`` is the backend going away: every open connection through
the proxy is reset (RST, as from a crashed peer) and the port stops listening, so new
connections are refused. ``restore()`` listens on the same port again and relays as before: the
backend is back, at the same address, and nothing was restarted on either side.

Written here because nothing on PyPI does this well in-process: Toxiproxy is a separate Go
server driven over HTTP, and the Python relays that exist neither reset live connections nor
come back on the same port. The proxy runs its own asyncio loop in a thread of the test
process, so synchronous and asynchronous tests use it alike, and so does a server in a child
process that only sees the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

LOOPBACK = "127.0.0.1"
RELAY_CHUNK_BYTES = 64 * 1024
CONTROL_TIMEOUT_S = 10.0
DEFAULT_PORTS = {
    "http": 80,
    "https": 443,
    "postgresql": 5432,
    "postgres": 5432,
    "redis": 6379,
    "rediss": 6379,
}

T = TypeVar("T")
_Link = tuple[asyncio.StreamWriter, asyncio.StreamWriter]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Drop the connection at once with an RST, as a peer that died would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Relays ``127.0.0.1:<port>`` to ``target_host:target_port`` until cut; see the module."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = LOOPBACK
        self.port = 0
        """The port the proxy listens on (set by ``start``, kept across cuts)."""
        self.accepted = 0
        """Connections relayed so far: shows that a client really went through the proxy."""
        self.bytes_to_target = 0
        """Bytes relayed from clients to the target so far: shows what a client sent there."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"tcp-proxy-{target_port}", daemon=True
        )
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._generation = 0
        """Bumped by each cut: a connection set up across a cut is reset, not relayed."""

    @classmethod
    def for_url(cls, url: str) -> TcpProxy:
        """A proxy to the host and port a URL names (the scheme's usual port when it has none)."""
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.split("+")[0])
        if parts.hostname is None or port is None:
            raise ValueError(f"no host and port in {url!r}")
        return cls(parts.hostname, port)

    def url_for(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's (credentials kept)."""
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@{self.address}" if credentials else self.address
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # ---- control, from any thread ------------------------------------------------------------

    def start(self) -> Self:
        self._thread.start()
        self._run(self._listen())
        return self

    def cut(self) -> None:
        """Reset every open connection and stop listening: new connections are refused."""
        self._run(self._cut())

    def restore(self) -> None:
        """Listen again on the same port; new connections reach the target as before."""
        self._run(self._listen())

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CONTROL_TIMEOUT_S)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def outage(self) -> Iterator[None]:
        """Cut for the duration of the block, restored afterwards even when the block fails."""
        self.cut()
        try:
            yield
        finally:
            self.restore()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CONTROL_TIMEOUT_S)

    # ---- on the proxy's loop -----------------------------------------------------------------

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._relay, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> None:
        self._generation += 1
        server, self._server = self._server, None
        if server is not None:
            server.close()  # the listening socket only; relayed connections are reset below
        for client, upstream in list(self._links):
            _reset(client)
            _reset(upstream)
        self._links.clear()

    async def _shutdown(self) -> None:
        await self._cut()
        # The relays end by themselves once their connections are reset. (Cancelling them
        # instead would make asyncio's stream server log each one as an error.)
        current = asyncio.current_task()
        pending = {task for task in asyncio.all_tasks() if task is not current}
        if pending:
            await asyncio.wait(pending, timeout=CONTROL_TIMEOUT_S / 2)
        await asyncio.sleep(0)  # let the aborted transports finish closing their sockets

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        generation = self._generation
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(client_w)  # the target itself is down: so is the proxy, to this client
            return
        if generation != self._generation:  # cut while connecting
            _reset(client_w)
            _reset(upstream_w)
            return
        self.accepted += 1
        link = (client_w, upstream_w)
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pump(client_r, upstream_w, link, to_target=True),
                self._pump(upstream_r, client_w, link, to_target=False),
            )
        finally:
            self._links.discard(link)
            for writer in link:
                writer.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        *,
        to_target: bool,
    ) -> None:
        """Copy one direction; an end is passed on as an end, a reset as a reset."""
        try:
            while data := await reader.read(RELAY_CHUNK_BYTES):
                if to_target:
                    self.bytes_to_target += len(data)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
        except OSError:
            for end in link:
                _reset(end)

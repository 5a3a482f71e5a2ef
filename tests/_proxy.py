"""A TCP proxy for tests that break the network on purpose.

``Proxy(target_port)`` listens on 127.0.0.1 (``port``) and relays every
connection to the target, byte for byte, in both directions.  What it does to
connections is a *policy*: one object asked when a connection opens
(``on_open``) and for each chunk it relays (``on_chunk``), so a new kind of
trouble is one small override.  The modes so far:

* ``cut()`` drops every current connection at once, as a dead NAT or a
  restarted load balancer would;
* ``idle_cut_s`` drops a connection that has carried nothing either way for
  that long, as AWS ALB does after 60 s;
* ``refuse = True`` closes new connections at once (a server that is down);
* ``swallow = "to_server"`` or ``"to_client"`` relays nothing more in that
  direction, so a test can lose a request, or its answer, on purpose before
  cutting;
* ``refuse_upgrades = True`` reads the head of a connection's first request
  before relaying anything: a WebSocket upgrade is answered ``403`` and
  closed, as by a proxy that does not pass WebSockets; plain HTTP goes
  through (head included) as usual.  Browsers open a fresh connection for
  every WebSocket, so looking at the first request of each is enough.

Later ones (a 503 at the handshake) fit in ``on_open`` and ``on_chunk``.

It runs in the test's Trio run (``async with Proxy.running(port) as proxy``)
or, for asyncio tests, in a thread of its own (``ThreadedProxy``).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import trio


class _Link:
    """One client connection and its upstream twin, with its own cancel scope."""

    def __init__(self, downstream: trio.SocketStream, scope: trio.CancelScope) -> None:
        self.downstream = downstream
        self.scope = scope
        self.last_traffic = trio.current_time()
        self.bytes = 0


class Proxy:
    def __init__(self, target_port: int, *, idle_cut_s: float | None = None,
                 refuse_upgrades: bool = False) -> None:
        self.target_port = target_port
        self.idle_cut_s = idle_cut_s
        self.port = 0
        self.accepted = 0             # connections the proxy took
        self.cuts = 0                 # connections it dropped on purpose
        self.refuse = False           # close new connections at once
        self.swallow: str | None = None   # "to_server" or "to_client": relay nothing that way
        self.swallowed = 0                # bytes not relayed because of ``swallow``
        self.refuse_upgrades = refuse_upgrades   # answer WebSocket upgrades 403, relay the rest
        self.upgrades_refused = 0
        self._links: set[_Link] = set()

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, target_port: int, **options: Any) -> AsyncIterator[Proxy]:
        proxy = cls(target_port, **options)
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, proxy._handle, 0, host="127.0.0.1"))
            proxy.port = listeners[0].socket.getsockname()[1]
            if proxy.idle_cut_s is not None:
                nursery.start_soon(proxy._idle_watch)
            yield proxy
            nursery.cancel_scope.cancel()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def open_links(self) -> int:
        return len(self._links)

    def cut(self) -> int:
        """Drop every connection now; how many there were."""
        links = list(self._links)
        for link in links:
            self._drop(link)
        return len(links)

    def _drop(self, link: _Link) -> None:
        self.cuts += 1
        self._links.discard(link)
        link.scope.cancel()

    # ------------------------------------------------------------ policy hooks

    async def on_open(self, downstream: trio.SocketStream) -> bool:
        """Whether to relay a new connection (False: it is closed at once)."""
        return not self.refuse

    def on_chunk(self, direction: str, data: bytes) -> bytes:
        """What to relay of ``data`` going ``direction`` ("to_server" or
        "to_client")."""
        if self.swallow == direction:
            self.swallowed += len(data)
            return b""
        return data

    # ------------------------------------------------------------ relaying

    async def _handle(self, downstream: trio.SocketStream) -> None:
        self.accepted += 1
        if not await self.on_open(downstream):
            await downstream.aclose()
            return
        head: bytes | None = b""
        if self.refuse_upgrades:
            head = await self._read_head(downstream)
            if head is None or _is_upgrade(head):
                if head is not None:
                    self.upgrades_refused += 1
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await downstream.send_all(_REFUSED)
                await trio.aclose_forcefully(downstream)
                return
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await downstream.aclose()
            return
        if head:
            try:
                await upstream.send_all(head)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await trio.aclose_forcefully(downstream)
                await trio.aclose_forcefully(upstream)
                return
        try:
            with trio.CancelScope() as scope:
                link = _Link(downstream, scope)
                self._links.add(link)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, downstream, upstream, "to_server", link,
                                           nursery)
                        nursery.start_soon(self._pump, upstream, downstream, "to_client", link,
                                           nursery)
                finally:
                    self._links.discard(link)
        finally:
            # Close hard both ways (no lingering), as a dropped link looks;
            # also when the whole proxy is shutting down.
            with trio.CancelScope(shield=True):
                for stream in (downstream, upstream):
                    with contextlib.suppress(Exception):
                        await trio.aclose_forcefully(stream)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, direction: str,
                    link: _Link, nursery: trio.Nursery) -> None:
        try:
            while data := await src.receive_some(65536):
                link.last_traffic = trio.current_time()
                link.bytes += len(data)
                data = self.on_chunk(direction, data)
                if data:
                    await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        nursery.cancel_scope.cancel()          # one side ended: end the link

    @staticmethod
    async def _read_head(stream: trio.SocketStream) -> bytes | None:
        """The bytes up to the end of the first request head (and whatever
        came with them), or None if the peer went away or sent no head."""
        data = b""
        with trio.move_on_after(30):
            try:
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return None
                    data += chunk
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            return data
        return None

    async def _idle_watch(self) -> None:
        assert self.idle_cut_s is not None
        while True:
            await trio.sleep(self.idle_cut_s / 4)
            now = trio.current_time()
            for link in list(self._links):
                if now - link.last_traffic >= self.idle_cut_s:
                    self._drop(link)


_REFUSED = (b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 29\r\n"
            b"connection: close\r\n\r\nWebSockets are not allowed.\r\n")


def _is_upgrade(head: bytes) -> bool:
    lines = head.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")[1:]
    return any(name.strip() == b"upgrade" and b"websocket" in value
               for name, _, value in (line.partition(b":") for line in lines))


class ThreadedProxy:
    """A Proxy in a thread with its own Trio run, for tests whose own loop is
    asyncio: ``with ThreadedProxy.running(port) as proxy: proxy.cut()``."""

    def __init__(self, proxy: Proxy, token: trio.lowlevel.TrioToken) -> None:
        self._proxy = proxy
        self._token = token

    @property
    def port(self) -> int:
        return self._proxy.port

    @property
    def url(self) -> str:
        return self._proxy.url

    def cut(self, **then: Any) -> int:
        """Drop every connection, then set ``then`` (e.g. ``swallow=None``)
        in the same step, so no byte moves in between."""
        def apply() -> int:
            n = self._proxy.cut()
            for name, value in then.items():
                setattr(self._proxy, name, value)
            return n
        return trio.from_thread.run_sync(apply, trio_token=self._token)

    @property
    def accepted(self) -> int:
        return int(self.get("accepted"))

    def get(self, name: str) -> Any:
        """One of the proxy's attributes, read in its thread."""
        return trio.from_thread.run_sync(getattr, self._proxy, name, trio_token=self._token)

    def set(self, **attributes: Any) -> None:
        """Set the proxy's attributes (``swallow``, ``refuse``) in its thread."""
        def apply() -> None:
            for name, value in attributes.items():
                setattr(self._proxy, name, value)
        trio.from_thread.run_sync(apply, trio_token=self._token)

    @classmethod
    @contextlib.contextmanager
    def running(cls, target_port: int, **options: Any) -> Iterator[ThreadedProxy]:
        ready = threading.Event()
        box: list[Any] = []

        async def main() -> None:
            try:
                async with Proxy.running(target_port, **options) as proxy:
                    stop = trio.Event()
                    box.extend([proxy, trio.lowlevel.current_trio_token(), stop])
                    ready.set()
                    await stop.wait()
            finally:
                ready.set()            # also when it failed to start

        thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        thread.start()
        ready.wait(30)
        assert box, "the proxy did not start"
        proxy, token, stop = box
        try:
            yield cls(proxy, token)
        finally:
            trio.from_thread.run_sync(stop.set, trio_token=token)
            thread.join(30)


__all__ = ["Proxy", "ThreadedProxy"]

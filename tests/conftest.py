from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import broker
from _wsraw import RawWs
from broker._auth import Authenticator
from broker._limits import HttpLimits
from broker._server import HttpServer
from broker._streams import StreamsApi
from broker._ws import WsConfig, WsServer


@pytest.fixture
async def b(tmp_path: Path) -> AsyncIterator[broker.Broker]:
    """A broker on a fresh data directory, with small segments so tests roll them."""
    async with broker.open_broker(tmp_path / "data", segment_bytes=4096,
                                  ring_bytes=2048) as br:
        yield br


class Served:
    """A broker and its HTTP/WebSocket server in the test's own Trio run, on
    127.0.0.1 with a random port; clients reach it over real sockets."""

    def __init__(self, broker_: broker.Broker, server: HttpServer, port: int) -> None:
        self.broker = broker_
        self.server = server
        self.port = port
        self.ws_url = f"ws://127.0.0.1:{port}/v1/ws"
        self.http_url = f"http://127.0.0.1:{port}"


@asynccontextmanager
async def serve_in_process(data_dir: Path, ws: WsConfig | None = None, *,
                           auth: Authenticator | None = None, limits: HttpLimits | None = None,
                           ssl_context: ssl.SSLContext | None = None,
                           streams: dict[str, Any] | None = None, local_only: bool = False,
                           **config: Any) -> AsyncIterator[Served]:
    """``ws``, ``auth``, ``limits``, ``ssl_context`` and ``streams`` (StreamsApi
    keyword arguments) configure the server; the rest is BrokerConfig."""
    async with broker.open_broker(data_dir, **config) as br:
        server = HttpServer(br, StreamsApi(br, auth=auth, **(streams or {})),
                            WsServer(br, ws, auth=auth), limits=limits, ssl_context=ssl_context,
                            local_only=local_only)
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(
                trio.serve_tcp, server.serve_connection, 0, host="127.0.0.1"))
            yield Served(br, server, listeners[0].socket.getsockname()[1])
            nursery.cancel_scope.cancel()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with serve_in_process(tmp_path / "data") as s:
        yield s


@pytest.fixture
async def raw() -> AsyncIterator[Callable[..., Awaitable[RawWs]]]:
    """``await raw(port, ...)`` opens a RawWs (``RawWs.connect``'s arguments)
    that is closed after the test."""
    opened: list[RawWs] = []

    async def connect(port: int, **kw: Any) -> RawWs:
        ws = await RawWs.connect(port, **kw)
        opened.append(ws)
        return ws

    yield connect
    for ws in opened:
        await ws.aclose()

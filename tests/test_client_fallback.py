"""broker.client over its three transports: WebSocket, SSE and long-poll.

Each test forces a transport (``connect(transports=(...))``) against a real
server in this process, or lets the client fall back through a proxy that
refuses WebSocket upgrades.  What is checked is that the client's promises
hold on every transport: records once and in order with the offsets the log
gives them, publishes stored once across cuts, signals, streamed messages,
tokens, and cursors that mean the same on every transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from broker._auth import Authenticator, mint
from broker.client import Backoff, ClientError, Cursor, Record, Subscription, connect
from _proxy import Proxy
from _serveproc import serving
from conftest import Served, serve_in_process

FAST = Backoff(initial=0.002, maximum=0.02)
SECRET = "a test secret that is long enough for HS256"
WAIT = 20
TRANSPORTS = ["ws", "sse", "longpoll"]


async def until(check: Callable[[], Awaitable[bool]] | Callable[[], bool]) -> None:
    with trio.fail_after(WAIT):
        while True:
            got = check()
            if not isinstance(got, bool):
                got = await got
            if got:
                return
            await trio.sleep(0.002)


async def take(sub: Subscription[Record], n: int) -> list[Record]:
    with trio.fail_after(WAIT):
        return [await sub.__anext__() for _ in range(n)]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_each_transport_reads_publishes_and_signals(served: Served,
                                                          transport: str) -> None:
    async with connect(served.ws_url, transports=(transport,), backoff=FAST) as c, \
            connect(served.ws_url, transports=("ws",), backoff=FAST) as other:
        assert c.transport == transport
        s = c.session("chat/1")
        assert await s.publish(b"a", create=True) == range(0, 1)
        assert await s.publish(b"b") == range(1, 2)
        sub = s.subscribe("-1")
        got = await take(sub, 2)
        assert [(r.offset, r.payload, r.kind) for r in got] == [(0, b"a", 0), (1, b"b", 0)]
        assert sub.cursor.offset == 2
        # Live: a record from another client arrives with its publisher and meta.
        await other.session("chat/1").publish([b"c"], meta=[{"k": "v"}])
        (live,) = await take(sub, 1)
        assert (live.offset, live.payload, live.meta) == (2, b"c", {"k": "v"})
        assert live.publisher == other.client_id
        # Signals both ways.
        sigs = await other.session("chat/1").signals("now").__aenter__()
        await until(lambda: _attach(sigs))
        at = await s.cancel("stop")
        assert at == 3
        with trio.fail_after(WAIT):
            sig = await sigs.__anext__()
        assert (sig.offset, sig.payload, sig.record.kind) == (3, b"stop", 1)
        assert sig.type == "cancel"             # meta travels in Broker-Meta over HTTP
        # A streamed message: its records in order, their offsets returned.
        async with s.stream_message() as m:
            for token in ("Hel", "lo ", "world"):
                await m.append(token)
                await m.flush()
        # Every record, the empty start and end too (a records body over HTTP).
        parts = 5
        assert [o.start for o in m.offsets if o is not None] == list(range(4, 4 + parts))
        rest = await take(sub, 1 + parts)
        assert [r.offset for r in rest] == list(range(3, 4 + parts))
        assert [r.kind for r in rest[1:]] == [2, 3, 3, 3, 4]
        assert b"".join(r.payload for r in rest[1:]) == b"Hello world"
        # The agent's side: signals from another client (one subscription
        # per session and client, so the reader above goes first).
        await sub.aclose()
        my_sigs = await s.signals("now").__aenter__()
        await until(lambda: _attach(my_sigs))
        await other.session("chat/1").approve("req-1")
        with trio.fail_after(WAIT):
            answer = await my_sigs.__anext__()
        assert answer.type == "approve" and answer.approved is True and answer.ref == "req-1"


def _attach(sub: Subscription[Any]) -> bool:
    # ``signals("now")`` is attached once its cursor is resolved.
    return sub.cursor.offset >= 0


@pytest.mark.parametrize(("first", "then"), [("ws", "sse"), ("sse", "longpoll"),
                                             ("longpoll", "ws")])
async def test_a_cursor_saved_on_one_transport_resumes_on_another(served: Served, first: str,
                                                                  then: str) -> None:
    async with connect(served.ws_url, transports=("ws",)) as w:
        assert await w.session("r").publish([b"0", b"1", b"2"], create=True) == range(0, 3)
    async with connect(served.ws_url, transports=(first,)) as c:
        sub = c.session("r").subscribe("-1")
        await take(sub, 2)
        saved = str(sub.cursor)
    async with connect(served.ws_url, transports=(then,)) as c:
        sub = c.session("r").subscribe(Cursor.parse(saved))
        (nxt,) = await take(sub, 1)
        assert (nxt.offset, nxt.payload) == (2, b"2")


async def test_a_proxy_that_refuses_websockets_leaves_the_client_on_sse(served: Served) -> None:
    async with Proxy.running(served.port, refuse_upgrades=True) as proxy, \
            connect(proxy.url, backoff=FAST) as c:
        assert c.transport == "sse"
        assert proxy.upgrades_refused == 2
        s = c.session("p")
        assert await s.publish(b"x", create=True) == range(0, 1)
        (r,) = await take(s.subscribe("-1"), 1)
        assert r.payload == b"x"


async def test_a_broker_that_is_down_does_not_push_the_client_down(served: Served) -> None:
    """Two failed dials, then an HTTP probe that fails too (the broker is
    down, not the WebSocket): the client stays on ws and gets through."""
    async with Proxy.running(served.port) as proxy:
        async def first_three_refused(downstream: object) -> bool:
            return proxy.accepted > 3                   # two dials and the probe
        proxy.on_open = first_three_refused             # type: ignore[method-assign]
        async with connect(proxy.url, backoff=FAST) as c:
            assert c.transport == "ws" and c.connects == 1


@pytest.mark.parametrize("transport", ["sse", "longpoll"])
async def test_cuts_on_http_lose_and_repeat_nothing(served: Served, transport: str) -> None:
    n = 60
    async with Proxy.running(served.port) as proxy, \
            connect(proxy.url, transports=(transport,), backoff=FAST, window=8) as reader, \
            connect(proxy.url, transports=(transport,), backoff=FAST) as writer:
        await writer.session("c").publish(b"0", create=True)
        sub = reader.session("c").subscribe("-1")
        got: list[Record] = []

        async def publish_all() -> None:
            for i in range(1, n):
                await writer.session("c").publish(str(i).encode())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_all)
            with trio.fail_after(WAIT):
                while len(got) < n:
                    got.append(await sub.__anext__())
                    if len(got) % 10 == 0:
                        proxy.cut()
        assert [r.offset for r in got] == list(range(n))
        assert [r.payload for r in got] == [str(i).encode() for i in range(n)]
        log = [p async for p in _log(served, "c")]
        assert log == [str(i).encode() for i in range(n)]      # nothing stored twice
        assert reader.connects > 1


async def _log(served: Served, name: str):  # type: ignore[no-untyped-def]
    at = 0
    while batch := await served.broker.read(name, at):
        for p in batch.payloads():
            at += 1
            yield p


@pytest.mark.parametrize("transport", ["sse", "longpoll"])
async def test_http_transports_send_the_token(tmp_path: Path, transport: str) -> None:
    auth = Authenticator(secret=SECRET)
    async with serve_in_process(tmp_path / "data", auth=auth) as served:
        token = mint("alice", {"t/*": ["*"]}, secret=SECRET)
        async with connect(served.ws_url, token=token, transports=(transport,)) as c:
            s = c.session("t/1")
            assert await s.publish(b"x", create=True) == range(0, 1)
            assert await s.publish(b"y") == range(1, 2)
            got = await take(s.subscribe("-1"), 2)
            assert [r.publisher for r in got] == ["alice", "alice"]
            with pytest.raises(ClientError) as e:
                await c.session("u/1").publish(b"x", create=True)
            assert e.value.code == "forbidden"
        with pytest.raises(ClientError) as e:
            async with connect(served.ws_url, token="nope", transports=(transport,)):
                pass                                                # pragma: no cover
        assert e.value.code == "token_invalid"


async def test_json_sessions_over_http(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path / "data") as served:
        await served.broker.create("j", content_type="application/json")
        async with connect(served.ws_url, transports=("longpoll",)) as c:
            s = c.session("j")
            assert await s.publish([b'{"a":1}', b"[1,2]"]) == range(0, 2)
            with pytest.raises(ClientError) as e:
                await s.publish(b"not json")
            assert e.value.code == "bad_payload"
            got = await take(s.subscribe("-1"), 2)
            assert [r.payload for r in got] == [b'{"a":1}', b"[1,2]"]


def test_sse_under_asyncio(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with connect(f"ws://127.0.0.1:{port}/v1/ws", transports=("sse",)) as c:
            assert c.transport == "sse"
            s = c.session("a")
            assert await s.publish(b"x", create=True) == range(0, 1)
            sub = s.subscribe("-1")
            r = await sub.__anext__()
            assert (r.offset, r.payload) == (0, b"x")
            await s.publish(b"y")
            r = await sub.__anext__()
            assert (r.offset, r.payload) == (1, b"y")

    with serving(tmp_path / "data") as (_, port):
        asyncio.run(asyncio.wait_for(scenario(), 30))

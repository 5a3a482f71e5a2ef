"""broker.client's promises across transports and restarts, over HTTP too.

* A publish whose ack is lost returns its offsets all the same: the resend is
  a duplicate that the broker answers with where the original landed, over
  the WebSocket and over HTTP, and after the broker restarted.
* A publish sent over the WebSocket and resent over HTTP after the client
  fell back is the same producer's (``Broker-Client`` without auth, the
  token's ``sub`` with it): stored once, its offsets returned.
* Several byte records go in one atomic POST (the broker's records body).
* A session re-created under a subscription ends it with ``EpochChanged``
  carrying the real new epoch on every transport (``Broker-Epoch`` on HTTP).

Servers run in this process (conftest.serve_in_process) or, to be killed and
restarted, as ``broker serve`` children (_serveproc.serving); clients reach
them through ``_proxy.Proxy``, which loses answers and cuts links on demand.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trio

from broker._auth import Authenticator, mint
from broker.client import Backoff, Cursor, EpochChanged, Record, Subscription, connect
from _proxy import Proxy
from _serveproc import serving
from conftest import Served, serve_in_process

FAST = Backoff(initial=0.002, maximum=0.02)
SECRET = "a test secret that is long enough for HS256"
WAIT = 20            # seconds: a bound on waits that should take milliseconds
TRANSPORTS = ["ws", "sse", "longpoll"]


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    with trio.fail_after(WAIT):
        while not await check():
            await trio.sleep(0.002)


async def take(sub: Subscription[Record], n: int) -> list[Record]:
    with trio.fail_after(WAIT):
        return [await sub.__anext__() for _ in range(n)]


async def log_of(served: Served, name: str) -> list[bytes]:
    out: list[bytes] = []
    while batch := await served.broker.read(name, len(out)):
        out += batch.payloads()
    return out


# ------------------------------------------------------- a lost ack, resent

@pytest.mark.parametrize("auth", [False, True])
async def test_a_publish_resent_over_http_after_the_websocket_is_stored_once(
        tmp_path: Path, auth: bool) -> None:
    """Publish over the WebSocket; its ack is lost; the proxy starts refusing
    WebSocket upgrades, so the client falls back to SSE and resends the
    publish there with the same stamp: a duplicate, answered with its offsets."""
    authenticator = Authenticator(secret=SECRET) if auth else None
    token = mint("alice", {"*": ["*"]}, secret=SECRET) if auth else None
    async with serve_in_process(tmp_path / "data", auth=authenticator) as served, \
            Proxy.running(served.port) as proxy, \
            connect(proxy.url, token=token, transports=("ws", "sse"), backoff=FAST) as c:
        s = c.session("switch")
        assert await s.publish(b"first", create=True) == range(0, 1)
        proxy.swallow = "to_client"
        result: list[range | None] = []

        async def second() -> None:
            result.append(await s.publish([b"second", b"third"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second)
            await until(lambda: _has(served, "switch", 3))    # stored; its ack is lost
            proxy.refuse_upgrades = True
            proxy.swallow = None
            proxy.cut()
        assert c.transport == "sse"
        assert result == [range(1, 3)]
        assert await s.publish(b"fourth") == range(3, 4)
        assert await log_of(served, "switch") == [b"first", b"second", b"third", b"fourth"]
        publisher = "alice" if auth else c.client_id
        got = await take(s.subscribe("-1"), 4)
        assert {r.publisher for r in got} == {publisher}


@pytest.mark.parametrize("transport", ["sse", "longpoll"])
async def test_a_lost_http_answer_still_returns_the_offsets(served: Served,
                                                            transport: str) -> None:
    async with Proxy.running(served.port) as proxy, \
            connect(proxy.url, transports=(transport,), backoff=FAST) as c:
        s = c.session("h")
        assert await s.publish(b"a", create=True) == range(0, 1)
        proxy.swallow = "to_client"
        result: list[range | None] = []

        async def second() -> None:
            result.append(await s.publish([b"b", b"c"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second)
            await until(lambda: _has(served, "h", 3))
            proxy.cut()
            proxy.swallow = None
        assert c.connects >= 2
        assert result == [range(1, 3)]
        assert await log_of(served, "h") == [b"a", b"b", b"c"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_resend_after_a_broker_restart_returns_the_offsets(tmp_path: Path,
                                                                   transport: str) -> None:
    """The broker is killed after storing a publish and before its ack got
    out; the one that starts on the same data directory still knows where
    the publish landed."""
    data = tmp_path / "data"
    with contextlib.ExitStack() as stack:
        proc, port = stack.enter_context(serving(data))
        async with Proxy.running(port) as proxy, \
                connect(proxy.url, transports=(transport,), backoff=FAST) as c:
            s = c.session("r")
            assert await s.publish([b"a", b"b"], create=True) == range(0, 2)
            proxy.swallow = "to_client"
            result: list[range | None] = []

            async def second() -> None:
                result.append(await s.publish([b"c", b"d", b"e"]))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(second)
                await until(lambda: _tail_is(port, "r", 5))
                proxy.refuse = True
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                _, port = await trio.to_thread.run_sync(stack.enter_context, serving(data))
                proxy.target_port = port
                proxy.swallow = None
                proxy.refuse = False
                proxy.cut()
            assert result == [range(2, 5)]
            assert await s.publish(b"f") == range(5, 6)
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://127.0.0.1:{port}/v1/stream/r?offset=-1")
            assert r.content == b"abcdef"


async def _has(served: Served, name: str, n: int) -> bool:
    return (await served.broker.info(name)).next_offset >= n


async def _tail_is(port: int, name: str, n: int) -> bool:
    async with httpx.AsyncClient() as http:
        r = await http.head(f"http://127.0.0.1:{port}/v1/stream/{name}")
    return r.headers.get("stream-next-offset") == f"{0:016d}_{n:016d}"


# ------------------------------------------------------- byte records over HTTP

@pytest.mark.parametrize("transport", ["sse", "longpoll"])
async def test_several_byte_records_in_one_http_publish(served: Served, transport: str) -> None:
    async with connect(served.ws_url, transports=(transport,), backoff=FAST) as c:
        s = c.session("b")
        assert await s.publish([b"x", b"", b"z"], create=True) == range(0, 3)
        assert await s.publish(b"") == range(3, 4)
        # Calls queued together are merged into one atomic POST.
        async with trio.open_nursery() as nursery:
            results: dict[int, range | None] = {}

            async def one(i: int) -> None:
                results[i] = await s.publish([b"%d" % i, b"%d'" % i])

            for i in range(5):
                nursery.start_soon(one, i)
        assert sorted(r.start for r in results.values() if r is not None) == [4, 6, 8, 10, 12]
        assert len(await log_of(served, "b")) == 14


# ------------------------------------------------------------------ epochs

@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_resume_into_a_recreated_session_raises_epoch_changed(served: Served,
                                                                      transport: str) -> None:
    """The session is deleted and made again, longer than before, while the
    client is cut off: its resume must not read the new records as the old."""
    await served.broker.create("e")
    await served.broker.append_many("e", [b"0", b"1"])
    old = (await served.broker.info("e")).epoch
    async with Proxy.running(served.port) as proxy, \
            connect(proxy.url, transports=(transport,), backoff=FAST) as c:
        sub = c.session("e").subscribe("-1")
        assert [r.payload for r in await take(sub, 2)] == [b"0", b"1"]
        assert sub.epoch == old                  # the real one, on HTTP too
        proxy.refuse = True
        proxy.cut()
        await served.broker.delete("e")
        await served.broker.create("e")
        await served.broker.append_many("e", [b"a", b"b", b"c", b"d"])
        new = (await served.broker.info("e")).epoch
        proxy.refuse = False
        with pytest.raises(EpochChanged) as e, trio.fail_after(WAIT):
            await sub.__anext__()
        assert (e.value.old_epoch, e.value.epoch) == (old, new)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_saved_cursor_of_another_epoch_raises_epoch_changed(served: Served,
                                                                    transport: str) -> None:
    await served.broker.create("e")
    await served.broker.append_many("e", [b"0", b"1", b"2"])
    old = (await served.broker.info("e")).epoch
    await served.broker.delete("e")
    await served.broker.create("e")
    await served.broker.append_many("e", [b"a"])
    new = (await served.broker.info("e")).epoch
    async with connect(served.ws_url, transports=(transport,), backoff=FAST) as c:
        # Offset 1 exists in the new session too; offset 3 is past its end.
        for offset in (1, 3):
            sub = c.session("e").subscribe(Cursor(offset, old))
            with pytest.raises(EpochChanged) as e, trio.fail_after(WAIT):
                await sub.__anext__()
            assert (e.value.old_epoch, e.value.epoch) == (old, new)
        # The same offset past the end, of the right epoch, is refused as such.
        sub = c.session("e").subscribe(Cursor(3, new))
        with pytest.raises(Exception) as refused, trio.fail_after(WAIT):
            await sub.__anext__()
        assert getattr(refused.value, "code", None) == "offset_out_of_range"

"""broker.client under asyncio: the same client code as under Trio (it is
written on anyio), against a real ``broker serve`` process with token auth.

Each test is a plain function that runs its scenario with ``asyncio.run``
(pytest-trio's trio_mode owns async test functions), with a deadline so a
hang fails instead of stalling the suite.  The reconnect tests go through
``_proxy.ThreadedProxy``, the Trio proxy in a thread of its own.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from broker._auth import mint
from broker.client import Backoff, ClientError, Cursor, State, connect
from _proxy import ThreadedProxy
from _serveproc import serving

SECRET = "a test secret that is long enough for HS256"
FAST = Backoff(initial=0.002, maximum=0.02)
DEADLINE = 30


def token(sub: str = "alice") -> str:
    return mint(sub, {"chat/*": ["*"]}, secret=SECRET)


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """One ``broker serve`` with auth for the module."""
    data = tmp_path_factory.mktemp("asyncio") / "data"
    with serving(data, "--auth-secret", SECRET) as (_, found):
        yield found


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(scenario(), DEADLINE)
    asyncio.run(bounded())


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/v1/ws"


def test_the_core_under_asyncio(port: int) -> None:
    async def scenario() -> None:
        async with connect(url(port), token=token("agent"), client_id="agent") as agent, \
                connect(url(port), token=lambda: token("ui")) as ui:
            assert agent.state is State.CONNECTED
            a, u = agent.session("chat/core"), ui.session("chat/core")
            assert await a.publish([b"Hel", b"lo"], create=True) == range(0, 2)
            sub = u.subscribe("-1")
            got = [await sub.__anext__() for _ in range(2)]
            assert [(r.offset, r.payload, r.publisher) for r in got] == [
                (0, b"Hel", "agent"), (1, b"lo", "agent")]
            saved = str(sub.cursor)
            await sub.aclose()
            async with a.stream_message(window=0.005) as m:
                for t in ("a ", "token ", "stream"):
                    await m.append(t)
            signals = a.signals(offset=m.offsets[-1].stop)
            await u.cancel("stop")
            sig = await signals.__anext__()
            assert (sig.type, sig.payload, sig.publisher) == ("cancel", b"stop", "ui")
            await signals.aclose()
        # A saved cursor goes on where the last client stopped.
        async with connect(url(port), token=token()) as again:
            sub = again.session("chat/core").subscribe(Cursor.parse(saved))
            parts = []
            while not parts or parts[-1].kind != 1:
                parts.append(await sub.__anext__())
            assert parts[0].offset == 2
            assert b"".join(p.payload for p in parts[:-1]) == b"a token stream"
            assert (parts[-2].kind, parts[-2].meta["outcome"]) == (4, "complete")
    run(scenario)


def test_auth_refusal_under_asyncio(port: int) -> None:
    async def scenario() -> None:
        for tok, code in ((None, "unauthorized"), ("garbage", "token_invalid")):
            with pytest.raises(ClientError) as e:
                async with connect(url(port), token=tok, backoff=FAST):
                    pass                                            # pragma: no cover
            assert e.value.code == code
    run(scenario)


@pytest.mark.parametrize("seed", range(2))
def test_reconnect_through_cuts_under_asyncio(port: int, seed: int) -> None:
    """Publishers and a subscriber through a proxy that cuts every link at
    random points: each record is seen once, in order, and no publish is
    stored twice."""
    rng = random.Random(seed)
    name = f"chat/cuts-{seed}"
    tasks, each = 3, 120

    async def scenario(proxy: ThreadedProxy) -> None:
        async with connect(proxy.url, token=token(), backoff=FAST) as agent, \
                connect(proxy.url, token=token(), backoff=FAST, window=16) as ui:
            s = agent.session(name)
            await s.publish(b"start", create=True)

            async def publisher(t: int) -> None:
                for i in range(each):
                    await s.publish(b"%d:%d" % (t, i))
                    if rng.random() < 0.03:
                        proxy.cut()

            pubs = [asyncio.create_task(publisher(t)) for t in range(tasks)]
            seen: list[Any] = []
            sub = ui.session(name).subscribe("-1")
            next_cut = rng.randrange(1, 30)
            while not (seen and seen[-1].payload == b"end"):
                seen.append(await sub.__anext__())
                if len(seen) == next_cut:
                    proxy.cut()
                    next_cut += rng.randrange(1, 30)
                if len(seen) == 1 + tasks * each:
                    await asyncio.gather(*pubs)
                    await s.publish(b"end")
            assert [r.offset for r in seen] == list(range(len(seen)))
            payloads = [r.payload for r in seen]
            assert len(payloads) == len(set(payloads)) == 2 + tasks * each
            for t in range(tasks):
                assert [p for p in payloads if p.startswith(b"%d:" % t)] == [
                    b"%d:%d" % (t, i) for i in range(each)]
            assert agent.connects > 2 and ui.connects > 2

    with ThreadedProxy.running(port) as proxy:
        run(lambda: scenario(proxy))


@pytest.mark.parametrize("lost", ["to_server", "to_client"])
def test_a_publish_in_flight_during_a_cut_lands_once_under_asyncio(port: int,
                                                                    lost: str) -> None:
    name = f"chat/inflight-{lost}"

    async def scenario(proxy: ThreadedProxy) -> None:
        async with connect(url(port), token=token()) as watcher, \
                connect(proxy.url, token=token(), backoff=FAST) as c:
            s = c.session(name)
            await s.publish(b"first", create=True)
            watch = watcher.session(name).subscribe("-1")
            assert (await watch.__anext__()).payload == b"first"
            proxy.set(swallow=lost)
            second = asyncio.create_task(s.publish(b"second"))
            if lost == "to_client":
                assert (await watch.__anext__()).payload == b"second"   # stored; ack lost
            else:
                while not proxy.get("swallowed"):
                    await asyncio.sleep(0.002)
            proxy.cut(swallow=None)    # cut first: an ack still in the proxy stays lost
            assert await second == range(1, 2)   # a duplicate, with where it landed
            assert await s.publish(b"third") == range(2, 3)
            rest = [await watch.__anext__() for _ in range(2 if lost == "to_server" else 1)]
            assert [r.payload for r in rest][-1] == b"third"
            assert c.connects == 2

    with ThreadedProxy.running(port) as proxy:
        run(lambda: scenario(proxy))


def test_the_backend_is_asyncio(port: int) -> None:
    async def scenario() -> None:
        import sniffio
        assert sniffio.current_async_library() == "asyncio"
        async with connect(url(port), token=token()) as c:
            assert await c.session("chat/backend").publish(b"x", create=True) == range(0, 1)
    run(scenario)

"""broker.client under Trio: sessions that survive the network.

Every test runs a real server in this process (conftest.serve_in_process) on
127.0.0.1 with a random port, and most reach it through ``_proxy.Proxy``,
which cuts connections when the test says so.  What is checked is what the
issue promises: every record exactly once and in order across cuts, publishes
stored exactly once however a cut falls, an epoch change surfaced, auth
refusals raised instead of retried, and a backoff that grows with jitter.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from broker import _core, client
from broker._auth import Authenticator, mint
from broker._handshake import HandshakeError, server_handshake
from broker._ws import WsConfig
from broker.client import (
    Backoff,
    ClientError,
    ConnectionLost,
    Cursor,
    EpochChanged,
    SessionDeleted,
    State,
    _WsCodec,
    connect,
    open_connection,
)
from _proxy import Proxy
from conftest import Served, serve_in_process

FAST = Backoff(initial=0.002, maximum=0.02)
SECRET = "a test secret that is long enough for HS256"
WAIT = 20            # seconds: a bound on waits that should take milliseconds


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    with trio.fail_after(WAIT):
        while not await check():
            await trio.sleep(0.002)


async def log_of(served: Served, name: str) -> list[bytes]:
    out: list[bytes] = []
    while batch := await served.broker.read(name, len(out)):
        out += batch.payloads()
    return out


# ---------------------------------------------------------------- reading

async def test_subscribe_from_the_start_then_live(served: Served) -> None:
    async with connect(served.ws_url, client_id="ui") as ui, \
            connect(served.ws_url, client_id="agent") as agent:
        assert ui.state is State.CONNECTED and ui.welcome is not None
        await agent.session("chat/1").publish([b"a", b"b"], meta=[{"n": 1}, None], create=True)
        async with ui.session("chat/1").subscribe("-1") as sub:
            got = [await sub.__anext__() for _ in range(2)]
            assert [(r.offset, r.payload, r.publisher, r.meta) for r in got] == [
                (0, b"a", "agent", {"n": 1}), (1, b"b", "agent", None)]
            assert await agent.session("chat/1").publish(b"c") == range(2, 3)
            live = await sub.__anext__()
            assert (live.offset, live.payload) == (2, b"c") and sub.up_to_date
            assert sub.cursor == Cursor(3, sub.epoch)


async def test_cursor_is_saved_and_passed_back(served: Served) -> None:
    await served.broker.create("s")
    await served.broker.publish("s", [b"%d" % i for i in range(10)])
    async with connect(served.ws_url) as c:
        sub = c.session("s").subscribe()
        for i in range(4):
            assert (await sub.__anext__()).offset == i
        saved = str(sub.cursor)
        await sub.aclose()
    epoch = (await served.broker.info("s")).epoch
    assert saved == f"{epoch}:4" and Cursor.parse(saved) == Cursor(4, epoch)
    for again in (saved, Cursor.parse(saved)):
        async with connect(served.ws_url) as c:
            async with c.session("s").subscribe(again) as sub:
                assert [(await sub.__anext__()).offset for _ in range(6)] == list(range(4, 10))
                assert sub.cursor == Cursor(10, epoch)


@pytest.mark.parametrize("bad", ["x:1", "1:x", "", "1:-5"])
def test_bad_cursor_text(bad: str) -> None:
    with pytest.raises(ValueError):
        Cursor.parse(bad)


async def test_a_small_window_bounds_the_buffer(served: Served) -> None:
    await served.broker.create("s")
    await served.broker.publish("s", [b"%d" % i for i in range(300)])
    async with connect(served.ws_url, window=8) as c, c.session("s").subscribe() as sub:
        for i in range(300):
            assert (await sub.__anext__()).offset == i
            assert sub._held <= 8


async def test_subscribing_again_replaces_a_subscription_left_by_break(served: Served) -> None:
    await served.broker.create("s")
    await served.broker.publish("s", [b"a", b"b", b"c"])
    async with connect(served.ws_url) as c:
        s = c.session("s")
        async for record in s.subscribe():
            break
        async for record in s.subscribe(1):
            assert record.offset == 1
            break
        first = s.subscribe("now")           # nothing to read: it waits
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.__anext__)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(ClientError) as e:
                await s.subscribe().__anext__()
            assert e.value.code == "already_subscribed"
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- publishing

async def test_publish_returns_offsets_and_merges_concurrent_calls(served: Served) -> None:
    async with connect(served.ws_url) as c:
        s = c.session("s")
        assert await s.publish([b"x", b"y"], create=True) == range(0, 2)
        results: dict[int, range | None] = {}

        async def one(i: int) -> None:
            results[i] = await s.publish([b"%d-%d" % (i, j) for j in range(i % 3 + 1)])

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)
    log = await log_of(served, "s")
    for i, got in results.items():
        assert got is not None
        assert log[got.start:got.stop] == [b"%d-%d" % (i, j) for j in range(i % 3 + 1)]
    assert len(log) == 2 + sum(i % 3 + 1 for i in range(200))


@pytest.mark.parametrize("lost", ["to_server", "to_client"])
async def test_a_publish_in_flight_during_a_cut_lands_once(served: Served, lost: str) -> None:
    """The proxy swallows the publish (it never reached the server) or its ack
    (the server stored it); then the link is cut.  Either way the client sends
    it again on the next connection, and it is stored exactly once."""
    async with Proxy.running(served.port) as proxy, connect(proxy.url, backoff=FAST) as c:
        s = c.session("s")
        assert await s.publish(b"first", create=True) == range(0, 1)
        proxy.swallow = lost
        result: list[range | None] = []

        async def second() -> None:
            result.append(await s.publish(b"second"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second)
            if lost == "to_client":
                await until(lambda: _has(served, "s", 2))
            else:
                await until(lambda: _swallowed(proxy))
            proxy.cut()               # first: an ack still in the proxy stays lost
            proxy.swallow = None
        assert c.connects == 2
        # The server named the client on the first connection; it keeps that
        # name, which the producer state is kept under.
        assert c.client_id is not None and c.client_id.startswith("anon-")
        assert c.welcome is not None and c.welcome.client == c.client_id
        # A retry of a stored publish is acknowledged as a duplicate, with
        # where the original landed.
        assert result == [range(1, 2)]
        assert await s.publish(b"third") == range(2, 3)
    assert await log_of(served, "s") == [b"first", b"second", b"third"]


async def _has(served: Served, name: str, n: int) -> bool:
    return (await served.broker.info(name)).next_offset >= n


async def _swallowed(proxy: Proxy) -> bool:
    return proxy.swallowed > 0


async def test_a_refused_publish_fails_alone(served: Served) -> None:
    """Three pipelined publishes, the middle one refused (not JSON): the
    others are stored, and later publishes go on (in a new producer epoch)."""
    await served.broker.create("j", content_type="application/json")
    async with connect(served.ws_url) as c:
        s = c.session("j")
        outcome: dict[str, Any] = {}

        async def publish(name: str, payload: bytes, kind: int) -> None:
            try:
                outcome[name] = await s.publish(payload, kind=kind)
            except ClientError as exc:
                outcome[name] = exc.code

        async with trio.open_nursery() as nursery:
            for name, payload, kind in (("a", b'"a"', 0), ("bad", b"{nope", 2), ("b", b'"b"', 0)):
                nursery.start_soon(publish, name, payload, kind)
                await trio.testing.wait_all_tasks_blocked()
        assert outcome["bad"] == "bad_payload"
        assert isinstance(outcome["a"], range) and isinstance(outcome["b"], range)
        assert await s.publish(b'"c"') == range(2, 3)
    assert await log_of(served, "j") == [b'"a"', b'"b"', b'"c"']


async def test_rate_limited_publishes_are_retried(tmp_path: Path) -> None:
    """A burst of 5 records: merged batches beyond it are split, and
    ``rate_limited`` refusals wait out ``retry_after``; all land once."""
    async with serve_in_process(tmp_path / "data", WsConfig(publish_rate=400,
                                                            publish_burst=5)) as served, \
            connect(served.ws_url) as c:
        await served.broker.create("s")
        s = c.session("s")
        results: list[range | None] = []

        async def one(i: int) -> None:
            results.append(await s.publish(b"%d" % i))

        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(one, i)
        assert sorted(r.start for r in results if r is not None) == list(range(60))
        assert sorted(await log_of(served, "s")) == sorted(b"%d" % i for i in range(60))


async def test_a_long_retry_after_is_raised(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path / "data", WsConfig(publish_rate=0.001,
                                                            publish_burst=1)) as served, \
            connect(served.ws_url, max_retry_wait=60) as c:
        s = c.session("s")
        await s.publish(b"a", create=True)
        with pytest.raises(ClientError) as e:
            await s.publish(b"b")
        assert e.value.code == "rate_limited" and e.value.retry_after is not None


async def test_stream_message_batches_tokens(served: Served) -> None:
    """A message of the AI model (docs/ai.md): a start, deltas, an end."""
    tokens = [f"tok{i} " for i in range(1000)]
    async with connect(served.ws_url) as c:
        s = c.session("s")
        await s.publish(b"question", create=True)
        # The window is long, so only max_bytes makes deltas: the split is exact.
        async with s.stream_message(meta={"role": "assistant", "lang": "en"}, max_bytes=256,
                                    window=3600) as m:
            for token in tokens:
                await m.append(token)
        records = [r async for r in _take(s.subscribe(1), len(m.offsets))]
    assert [o for o in m.offsets] == [range(r.offset, r.offset + 1) for r in records]
    assert b"".join(r.payload for r in records).decode() == "".join(tokens) == m.text
    assert 10 < len(records) - 2 <= len("".join(tokens)) // 256 + 1
    assert [r.kind for r in records] == [2] + [3] * (len(records) - 2) + [4]
    assert records[0].meta == {"id": m.id, "role": "assistant", "lang": "en"}
    assert records[0].payload == b""
    assert {r.meta["id"] for r in records} == {m.id} and m.id.startswith("m_")
    assert records[-1].meta == {"id": m.id, "outcome": "complete"}
    assert all(len(r.payload) >= 256 for r in records[1:-1])
    assert (m.appends, m.records, m.outcome) == (1000, len(records), "complete")


async def _take(sub: client.Subscription[Any], n: int) -> Any:
    async with sub:
        for _ in range(n):
            yield await sub.__anext__()


async def test_stream_message_flushes_after_the_window_and_marks_an_error(
        served: Served) -> None:
    async with connect(served.ws_url) as c:
        s = c.session("s")
        await served.broker.create("s")
        sub = s.subscribe()
        with pytest.raises(KeyError):
            async with s.stream_message(role="assistant", window=0.005) as m:
                start = await sub.__anext__()
                assert (start.kind, start.meta) == (2, {"id": m.id, "role": "assistant"})
                await m.append(b"Hel")
                delta = await sub.__anext__()      # sent by the timer, the block still open
                assert (delta.kind, delta.payload, delta.meta) == (3, b"Hel", {"id": m.id})
                await m.append(b"lo")
                raise KeyError("the model failed")
        end = await sub.__anext__()
        assert (end.kind, end.payload) == (4, b"lo")   # what was gathered goes in the end
        assert end.meta == {"id": m.id, "outcome": "error",
                            "error": "KeyError: 'the model failed'"}
        await m.wait()
        assert [o.start for o in m.offsets if o is not None] == [0, 1, 2]


async def test_stream_message_cancelled_ends_cancelled(served: Served) -> None:
    async with connect(served.ws_url) as c:
        s = c.session("s")
        await served.broker.create("s")
        with trio.CancelScope() as scope:
            async with s.stream_message(window=3600) as m:
                await m.append("partial")
                scope.cancel()
                await trio.sleep_forever()
        await m.wait()
        records = [r async for r in _take(s.subscribe(0), 2)]
    assert [(r.kind, r.payload, r.meta) for r in records] == [
        (2, b"", {"id": m.id, "role": "assistant"}),
        (4, b"partial", {"id": m.id, "outcome": "cancelled"})]


# ---------------------------------------------------------------- signals

async def test_signals_both_ways(served: Served) -> None:
    async with connect(served.ws_url, client_id="agent") as agent, \
            connect(served.ws_url, client_id="ui") as ui:
        a, u = agent.session("chat/1"), ui.session("chat/1")
        assert await a.publish(b"may I run the tool?", create=True) == range(0, 1)
        async with a.signals(offset=1) as signals:
            assert await u.approve("tool-1", approved=False, note="no") == 1
            await u.input("use the other one", ref="tool-1")
            await u.cancel("stop")
            await u.signal(b"custom")
            got = [await signals.__anext__() for _ in range(4)]
        assert [(g.type, g.payload, g.ref, g.approved, g.publisher) for g in got] == [
            ("approve", b"no", "tool-1", False, "ui"),
            ("input", b"use the other one", "tool-1", None, "ui"),
            ("cancel", b"stop", None, None, "ui"),
            (None, b"custom", None, None, "ui")]
        assert [g.offset for g in got] == [1, 2, 3, 4]
        assert len({g.id for g in got}) == 4
        await a.publish(b"stopped")
        kinds = [r.kind async for r in _take(u.subscribe(), 6)]
        assert kinds == [0, 1, 1, 1, 1, 0]


async def test_signals_drop_a_repeated_id(served: Served) -> None:
    """A signal sent again after a cut (the signal frame has no producer
    stamp) is stored twice; ``signals()`` yields it once."""
    await served.broker.create("s")
    async with open_connection(served.ws_url) as raw:
        for sid in ("one", "one", "two"):
            await raw.signal("s", b"x", {"id": sid, "signal": "cancel"})
    async with connect(served.ws_url) as c:
        got = [s async for s in _take(c.session("s").signals(0), 2)]
    assert [(g.id, g.offset) for g in got] == [("one", 0), ("two", 2)]


# ---------------------------------------------------------------- reconnecting

@pytest.mark.parametrize("seed", range(2))
async def test_many_cuts_every_record_once_in_order(served: Served, seed: int) -> None:
    """Four tasks publish through a proxy while a subscriber with a small
    window reads through it; the proxy cuts every link at random points.  The
    subscriber sees the log exactly (no gap, no duplicate, in order) and the
    log holds each publish exactly once, in each task's order."""
    rng = random.Random(seed)
    tasks, each = 4, 150
    total = 1 + tasks * each
    await served.broker.create("chat/1")
    async with Proxy.running(served.port) as proxy, \
            connect(proxy.url, client_id="agent", backoff=FAST, rng=random.Random(seed)) as agent, \
            connect(proxy.url, client_id="ui", backoff=FAST, window=16) as ui:
        s = agent.session("chat/1")
        await s.publish(b"start")
        results: list[range | None] = []

        async def publisher(t: int) -> None:
            for i in range(each):
                results.append(await s.publish(b"%d:%d" % (t, i)))
                if rng.random() < 0.02:
                    proxy.cut()

        seen = []
        async with trio.open_nursery() as nursery:
            for t in range(tasks):
                nursery.start_soon(publisher, t)
            async with ui.session("chat/1").subscribe("-1") as sub:
                next_cut = rng.randrange(1, 40)
                async for record in sub:
                    seen.append(record)
                    if len(seen) == next_cut:
                        proxy.cut()
                        next_cut += rng.randrange(1, 40)
                    if len(seen) == total:
                        break
        log = await log_of(served, "chat/1")
    assert [r.offset for r in seen] == list(range(total))
    assert [r.payload for r in seen] == log
    for t in range(tasks):
        mine = [p for p in log if p.startswith(b"%d:" % t)]
        assert mine == [b"%d:%d" % (t, i) for i in range(each)]
    known = [r for r in results if r is not None]
    assert len({r.start for r in known}) == len(known)
    assert proxy.cuts >= 10 and agent.connects > 3 and ui.connects > 3, (
        proxy.cuts, agent.connects, ui.connects)


async def test_idle_links_cut_by_a_proxy_come_back(tmp_path: Path) -> None:
    """A load balancer that drops idle connections (here after 0.1 s; the
    server's heartbeat is too slow to keep them busy): the subscription
    carries on over each new connection."""
    async with serve_in_process(tmp_path / "data", WsConfig(heartbeat_s=1000)) as served, \
            Proxy.running(served.port, idle_cut_s=0.1) as proxy, \
            connect(proxy.url, backoff=FAST) as c:
        await served.broker.create("s")
        async with c.session("s").subscribe() as sub:
            for i in range(3):
                await served.broker.publish("s", [b"%d" % i])
                record = await sub.__anext__()
                assert (record.offset, record.payload) == (i, b"%d" % i)
                cuts = proxy.cuts
                await until(lambda: _more(proxy, cuts))
        assert c.connects >= 3


async def _more(proxy: Proxy, cuts: int) -> bool:
    return proxy.cuts > cuts


async def test_state_while_the_server_is_unreachable(served: Served) -> None:
    async with Proxy.running(served.port) as proxy, connect(proxy.url, backoff=FAST) as c:
        assert c.state is State.CONNECTED and c.connects == 1
        proxy.refuse = True
        proxy.cut()
        assert await c.wait_for(State.RECONNECTING) is State.RECONNECTING
        await until(lambda: _accepted(proxy, 3))           # it keeps trying
        proxy.refuse = False
        await c.wait_for(State.CONNECTED)
        assert c.connects == 2
    assert c.state is State.CLOSED and c.error is None


async def _accepted(proxy: Proxy, n: int) -> bool:
    return proxy.accepted >= n


async def test_give_up_after(served: Served) -> None:
    async with Proxy.running(served.port) as proxy:
        proxy.refuse = True
        with pytest.raises(ConnectionLost):
            async with connect(proxy.url, backoff=Backoff(0.002, 0.01, give_up_after=0.05)):
                pass                                                # pragma: no cover
        proxy.refuse = False
        async with connect(proxy.url, backoff=Backoff(0.002, 0.01, give_up_after=0.05)) as c:
            sub = c.session("s").subscribe(create=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, sub)
                await until(lambda: _attached(sub))
                proxy.refuse = True
                proxy.cut()
                await c.wait_for(State.CLOSED)
            assert isinstance(c.error, ConnectionLost)
            with pytest.raises(ConnectionLost):
                await sub.__anext__()
            with pytest.raises(ConnectionLost):
                await c.session("s").publish(b"x")


async def _attached(sub: client.Subscription[Any]) -> bool:
    return sub._attached


async def _drain(sub: client.Subscription[Any]) -> None:
    try:
        async for _ in sub:
            pass
    except ClientError:
        pass


async def test_epoch_change_across_a_reconnect(served: Served) -> None:
    """The session is deleted and created again while the client is away:
    coming back with its cursor's epoch, the subscription raises EpochChanged
    (and, while attached, a delete raises SessionDeleted)."""
    await served.broker.create("s")
    await served.broker.publish("s", [b"a", b"b"])
    async with Proxy.running(served.port) as proxy, connect(proxy.url, backoff=FAST) as c:
        sub = c.session("s").subscribe()
        assert [(await sub.__anext__()).offset for _ in range(2)] == [0, 1]
        old = sub.epoch
        proxy.refuse = True
        proxy.cut()
        await c.wait_for(State.RECONNECTING)
        await served.broker.delete("s")
        await served.broker.create("s")
        await served.broker.publish("s", [b"new"])
        proxy.refuse = False
        with pytest.raises(EpochChanged) as e:
            await sub.__anext__()
        assert e.value.old_epoch == old and e.value.epoch == (await served.broker.info("s")).epoch
        assert e.value.epoch != old and e.value.code == "epoch_changed"
        # Reset: from the start of the new epoch.
        fresh = c.session("s").subscribe("-1")
        assert (await fresh.__anext__()).payload == b"new"
        await served.broker.delete("s")
        with pytest.raises(SessionDeleted):
            await fresh.__anext__()
    async with connect(served.ws_url) as c:
        await served.broker.create("s")
        with pytest.raises(EpochChanged):
            await c.session("s").subscribe(Cursor(2, old)).__anext__()


# ---------------------------------------------------------------- auth

@pytest.fixture
async def authed(tmp_path: Path) -> Any:
    async with serve_in_process(tmp_path / "data", auth=Authenticator(SECRET)) as s:
        yield s


def token(sub: str = "alice", **kw: Any) -> str:
    return mint(sub, {"chat/*": ["*"]}, secret=SECRET, **kw)


@pytest.mark.parametrize("make, code", [
    (lambda: None, "unauthorized"),
    (lambda: "garbage", "token_invalid"),
    (lambda: token(now=time.time() - 7200, ttl_s=3600), "token_expired"),
], ids=["none", "garbage", "expired"])
async def test_auth_refusal_is_raised_at_once(authed: Served, make: Callable[[], str | None],
                                              code: str) -> None:
    with pytest.raises(ClientError) as e:
        async with connect(authed.ws_url, token=make(), backoff=FAST):
            pass                                                    # pragma: no cover
    assert e.value.code == code


async def test_a_refusal_on_reconnect_closes_the_client(authed: Served) -> None:
    """Tokens come from a provider, fresh for each hello.  Once it hands out
    a bad one, the next reconnect is refused, and that is raised to every
    caller instead of retried."""
    tokens = [token()]
    async with Proxy.running(authed.port) as proxy, \
            connect(proxy.url, token=lambda: tokens[-1], backoff=FAST) as c:
        s = c.session("chat/a")
        await s.publish(b"one", create=True)
        sub = s.subscribe()
        assert (await sub.__anext__()).payload == b"one"
        proxy.cut()                                         # a fresh good token next
        await c.wait_for(State.RECONNECTING)
        await c.wait_for(State.CONNECTED)
        assert await s.publish(b"two") == range(1, 2)
        tokens.append("garbage")
        proxy.cut()
        with pytest.raises(ClientError) as e:
            while True:
                await sub.__anext__()
        assert e.value.code == "token_invalid"
        assert c.state is State.CLOSED and c.error is not None and c.error.code == "token_invalid"
        assert c.connects == 2
        with pytest.raises(ClientError):
            await s.publish(b"three")


async def test_async_token_provider_and_client_id(authed: Served) -> None:
    async def provider() -> str:
        await trio.sleep(0)
        return token("agent-7")

    async with connect(authed.ws_url, token=provider, client_id="agent-7") as c:
        assert c.welcome is not None and c.welcome.client == "agent-7"
        s = c.session("chat/p")
        await s.publish(b"x", create=True)
        record = await s.subscribe().__anext__()
        assert record.publisher == "agent-7"
    with pytest.raises(ClientError) as e:
        async with connect(authed.ws_url, token=provider, client_id="someone-else"):
            pass                                                    # pragma: no cover
    assert e.value.code == "client_mismatch"


# ---------------------------------------------------------------- the rest

def _upgrade_answer(request: bytes) -> bytes:
    lines = request.decode("latin-1").split("\r\n")
    headers = [(k.strip().lower().encode(), v.strip().encode())
               for k, _, v in (line.partition(":") for line in lines[1:] if line)]
    return server_handshake("GET", headers)


def test_ws_codec_without_a_socket() -> None:
    """The client's WebSocket codec, bytes in and out: the upgrade, a server
    message split at every byte, masked client frames, a close that fits."""
    codec = _WsCodec("127.0.0.1:1", "/v1/ws?token=t")
    assert codec.request.startswith(b"GET /v1/ws?token=t HTTP/1.1\r\n")
    wire = _upgrade_answer(codec.request) + _core.build_frame(_core.OP_BINARY, b"hello") \
        + _core.build_frame(_core.OP_PING, b"p")
    for cut in range(len(wire) + 1):
        codec = _WsCodec("127.0.0.1:1", "/v1/ws?token=t")
        answer = _upgrade_answer(codec.request)
        wire = answer + wire[len(answer):]
        got = codec.receive_data(wire[:cut]) + codec.receive_data(wire[cut:])
        assert got == [(_core.OP_BINARY, b"hello"), (_core.OP_PING, b"p")] and codec.open
    server = _core.FrameParser(False, 1 << 20)            # requires masked frames
    sent = codec.message(b"x" * 300) + codec.pong(b"p") + codec.close(1000, "\u00e9" * 100)
    (op1, m1), (op2, m2), (op3, m3) = server.feed(sent)
    assert (op1, m1, op2, m2, op3) == (_core.OP_BINARY, b"x" * 300, _core.OP_PONG, b"p",
                                       _core.OP_CLOSE)
    code, reason = _core.parse_close(m3)
    assert code == 1000 and len(reason.encode()) <= 123 and reason == "\u00e9" * 61
    refused = _WsCodec("127.0.0.1:1", "/v1/ws")
    with pytest.raises(HandshakeError) as e:
        refused.receive_data(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
    assert e.value.status == 404
    wrong = _WsCodec("127.0.0.1:1", "/v1/ws")
    with pytest.raises(HandshakeError):
        wrong.receive_data(_upgrade_answer(codec.request))      # another key's accept


async def test_leaving_closes_the_websocket_politely(served: Served) -> None:
    async with connect(served.ws_url) as c:
        await c.session("s").publish(b"x", create=True)
        conn = c.connection
        assert conn is not None
    assert conn.closed is not None and conn.closed.code == 1000   # the server's answer
    assert c.state is State.CLOSED

def test_backoff_grows_to_its_cap_with_full_jitter() -> None:
    b = Backoff(initial=0.1, maximum=5.0, multiplier=2.0)
    assert [b.cap(n) for n in range(8)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert b.cap(10_000) == 5.0                     # no overflow
    rng = random.Random(7)
    for n in (0, 3, 6, 50):
        delays = [b.delay(n, rng) for _ in range(2000)]
        assert all(0 <= d <= b.cap(n) for d in delays)
        assert len(set(delays)) == len(delays)       # jittered: no two alike
        # Full jitter: spread over the whole range, about half the cap on average.
        assert min(delays) < 0.05 * b.cap(n) and max(delays) > 0.95 * b.cap(n)
        assert 0.45 * b.cap(n) < sum(delays) / len(delays) < 0.55 * b.cap(n)
    assert Backoff(1, 1, 1).cap(100) == 1
    for bad in ({"initial": 0}, {"initial": 2, "maximum": 1}, {"multiplier": 0.5},
                {"give_up_after": -1}):
        with pytest.raises(ValueError):
            Backoff(**bad)


async def test_bad_url_and_refused_dial(served: Served) -> None:
    with pytest.raises(ClientError) as e:
        async with connect("http://127.0.0.1:1/v1/ws"):
            pass                                                    # pragma: no cover
    assert e.value.code == "bad_url"
    with pytest.raises(ClientError) as e:
        async with connect(f"ws://127.0.0.1:{served.port}/nope", backoff=FAST):
            pass                                                    # pragma: no cover
    assert e.value.code == "bad_handshake" and "404" in e.value.message


async def test_local_misuse_is_refused_in_the_caller(served: Served) -> None:
    async with connect(served.ws_url) as c:
        s = c.session("s")
        for call in (lambda: s.publish([]), lambda: s.publish([b"a"], meta=[1, 2]),
                     lambda: s.publish(b"a", kind=64)):
            with pytest.raises(ValueError):
                await call()
        with pytest.raises(ValueError):
            s.subscribe(kinds=[])
        with pytest.raises(ValueError):
            c.session("")
        big = b"x" * (2 << 20)
        with pytest.raises(ClientError) as e:
            await s.publish(big, create=True)
        assert e.value.code == "message_too_large"
        assert await s.publish(b"still fine", create=True) == range(0, 1)


async def test_a_body_error_is_not_wrapped(served: Served) -> None:
    with pytest.raises(KeyError):
        async with connect(served.ws_url):
            raise KeyError("mine")

"""Presence on the WebSocket (docs/protocol.md, "Presence"), and the sans-IO
registry and feeds under it (broker/_presence.py).

The registry tests drive ``Registry`` and ``Feed`` with explicit times; the
rest run a real server in-process and talk to it over real sockets: raw
WebSockets where the test needs to see every frame or to drop TCP, the
Python client elsewhere.  (SSE, long-poll and ``view=presence`` are in
test_presence_http.py.)
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import msgpack
import pytest
import trio
import trio.testing

from broker import _frames as F
from broker import client
from broker._auth import Authenticator, mint
from broker._config import FsyncPolicy
from broker._presence import JOIN, LEAVE, Feed, Registry
from broker._ws import WsConfig
from conftest import Served, serve_in_process
from _wsraw import RawWs

Raw = Callable[..., Awaitable[RawWs]]
SECRET = "a test secret that is long enough for HS256"


def member(mid: str, client_id: str = "c", transport: str = "ws") -> F.Member:
    return F.Member(mid, client_id, transport, 0)


# ---------------------------------------------------------------- the registry, sans-IO

def test_members_join_and_leave_in_order_and_watchers_hear_it() -> None:
    reg = Registry()
    heard: list[tuple[str, str]] = []

    def watcher(kind: str, m: F.Member) -> None:
        heard.append((kind, m.id))

    reg.watch("s", watcher)
    reg.join("s", member("a"))
    reg.join("s", member("b"))
    reg.join("other", member("c"))
    assert [m.id for m in reg.members("s")] == ["a", "b"] and len(reg) == 3
    reg.leave("s", "a")
    reg.leave("s", "a")                      # twice: nothing more happens
    reg.leave("s", "nobody")
    assert heard == [(JOIN, "a"), (JOIN, "b"), (LEAVE, "a")]
    reg.unwatch("s", watcher)
    reg.leave("s", "b")
    reg.leave("other", "c")
    assert heard[-1] == (LEAVE, "a") and reg.empty and len(reg) == 0


def test_a_long_poll_reader_lingers_and_a_new_poll_keeps_it() -> None:
    reg = Registry()
    heard: list[tuple[str, str]] = []
    reg.watch("s", lambda kind, m: heard.append((kind, m.id)))
    first = reg.hold("s", member("lp-1", "bob", "longpoll"))
    assert first == "lp-1" and heard == [(JOIN, "lp-1")]
    reg.release("s", "bob", until=10.0)
    assert reg.expire(5.0) == 10.0 and len(reg) == 1
    # Polled again within the linger: the same member, no events.
    assert reg.hold("s", member("lp-2", "bob", "longpoll")) == "lp-1"
    assert reg.expire(11.0) == float("inf") and len(reg) == 1     # held: never expires
    reg.release("s", "bob", until=20.0)
    assert reg.expire(19.0) == 20.0 and heard == [(JOIN, "lp-1")]
    # Two polls of one client at once are one member, released by the last.
    reg.hold("s", member("lp-3", "bob", "longpoll"))
    reg.hold("s", member("lp-4", "bob", "longpoll"))
    reg.release("s", "bob", until=21.0)
    assert reg.expire(30.0) == float("inf") and len(reg) == 1
    reg.release("s", "bob", until=40.0)
    assert reg.expire(39.0) == 40.0
    assert reg.expire(40.0) == float("inf")
    assert heard == [(JOIN, "lp-1"), (LEAVE, "lp-1")]
    assert [m.id for m in reg.members("s")] == []
    reg.release("s", "bob", until=50.0)      # a stray release after it left: nothing
    assert reg.hold("s", member("lp-5", "bob", "longpoll")) == "lp-5"   # a new member


@pytest.mark.parametrize("changes, sent", [
    ([(JOIN, "a")], [(JOIN, "a")]),
    ([(JOIN, "a"), (LEAVE, "a")], []),                      # never seen: cancels out
    ([(LEAVE, "a")], [(LEAVE, "a")]),
    ([(LEAVE, "a"), (JOIN, "a")], [(JOIN, "a")]),           # a join replaces what it holds
    ([(LEAVE, "a"), (JOIN, "a"), (LEAVE, "a")], [(LEAVE, "a")]),
    ([(JOIN, "a"), (LEAVE, "a"), (JOIN, "a")], [(JOIN, "a")]),
    ([(JOIN, "a"), (JOIN, "b"), (LEAVE, "a")], [(JOIN, "b")]),
])
def test_a_feed_sends_net_changes(changes: list[tuple[str, str]],
                                  sent: list[tuple[str, str]]) -> None:
    feed = Feed()
    assert feed.take() == (True, [])         # a new feed starts with the whole set
    assert not feed.due
    for kind, mid in changes:
        feed.add(kind, member(mid))
    resync, got = feed.take()
    assert not resync and [(k, m.id) for k, m in got] == sent


def test_a_feed_gives_up_past_its_limit_and_asks_for_the_set() -> None:
    feed = Feed(limit=4)
    feed.take()
    for i in range(5):
        feed.add(JOIN, member(str(i)))
    assert feed.resync and not feed.pending
    feed.add(JOIN, member("late"))           # the set is read when sent: nothing kept
    assert feed.take() == (True, [])


@pytest.mark.parametrize("seed", range(20))
def test_what_a_watcher_is_sent_adds_up_to_the_set(seed: int) -> None:
    """Random joins and leaves (a storm), with sends at random moments: the
    client that applies what it is sent ends with the registry's set, and
    the feed never holds more than its limit."""
    rng = random.Random(seed)
    reg, feed = Registry(), Feed(limit=rng.choice([2, 8, 64]))
    reg.watch("s", feed.add)
    held: dict[str, F.Member] = {}

    def send() -> None:
        nonlocal held
        resync, changes = feed.take()
        if resync:
            held = {m.id: m for m in reg.members("s")}
        for kind, m in changes:
            if kind == JOIN:
                held[m.id] = m
            else:
                assert held.pop(m.id).id == m.id       # only leaves of what it holds
    ids = [f"m{i}" for i in range(12)]
    for step in range(2000):
        mid = rng.choice(ids)
        if any(m.id == mid for m in reg.members("s")):
            reg.leave("s", mid)
        else:
            reg.join("s", F.Member(mid, "c", "ws", step))
        assert len(feed.pending) <= feed.limit
        if rng.random() < 0.1:
            send()
    send()
    assert held == {m.id: m for m in reg.members("s")}


# ---------------------------------------------------------------- helpers

async def next_presence(ws: RawWs) -> F.Frame:
    """The next members, join or leave frame; pings are answered, the rest skipped."""
    while True:
        frame = await ws.frame()
        if isinstance(frame, F.Ping):
            await ws.send(F.Pong(frame.id))
        elif isinstance(frame, (F.Members, F.Join, F.Leave)):
            return frame


async def watch(raw: Raw, port: int, session: str = "chat", hidden: bool = True,
                **hello: Any) -> tuple[RawWs, F.Members]:
    """A raw connection attached to ``session`` with presence; its first members."""
    ws = await raw(port, hello=F.Hello(hello.pop("client", "watcher"), **hello))
    await ws.send(F.Attach(1, session, presence=True, hidden=hidden, create=True))
    assert isinstance(await ws.frame(), F.Attached)
    members = await next_presence(ws)
    assert isinstance(members, F.Members)
    return ws, members


async def joined(ws: RawWs) -> F.Member:
    frame = await next_presence(ws)
    assert isinstance(frame, F.Join), frame
    return frame.member


async def left(ws: RawWs) -> F.Member:
    frame = await next_presence(ws)
    assert isinstance(frame, F.Leave), frame
    return frame.member


async def settle(served: Served, session: str = "chat", want: int = 0) -> None:
    """Wait (bounded) until ``session`` has ``want`` members: a closed
    connection is cleaned up by the server's task, a moment later."""
    with trio.fail_after(10):
        while len(served.broker.presence.members(session)) != want:
            await trio.sleep(0.01)


# ---------------------------------------------------------------- join and leave

async def test_devices_and_an_agent_join_and_leave(raw: Raw, served: Served) -> None:
    watcher, first = await watch(raw, served.port)
    assert first == F.Members("chat", ())            # the watcher is hidden
    async with client.open_connection(served.ws_url, client_id="phone",
                                      presence_info={"device": "phone"}) as phone, \
            client.open_connection(served.ws_url, client_id="agent") as agent:
        await phone.attach("chat", offset=-1)
        m = await joined(watcher)
        assert phone.welcome is not None
        assert (m.id, m.client, m.transport, m.info) == (
            phone.welcome.connection, "phone", "ws", {"device": "phone"})
        assert abs(m.since / 1e6 - time.time()) < 600
        # An agent that reads signals only is a member too, with its own info.
        await agent.attach("chat", kinds=[1], info={"role": "agent"})
        a = await joined(watcher)
        assert (a.client, a.transport, a.info) == ("agent", "ws", {"role": "agent"})
        assert await phone.presence("chat") == [m, a]
        await phone.detach("chat")
        assert await left(watcher) == m
    assert await left(watcher) == a                  # the agent's connection closed
    assert served.broker.presence.members("chat") == []


async def test_a_subscriber_with_presence_sees_itself_unless_hidden(raw: Raw,
                                                                    served: Served) -> None:
    shown, members = await watch(raw, served.port, hidden=False, client="shown")
    assert [m.client for m in members.members] == ["shown"]
    hidden, members = await watch(raw, served.port, hidden=True, client="hidden")
    assert [m.client for m in members.members] == ["shown"]
    plain = await raw(served.port, client="plain")
    await plain.send(F.Attach(2, "chat", hidden=True))
    assert isinstance(await plain.frame(), F.Attached)
    await plain.send(F.Presence(3, "chat"))
    answer = await next_presence(plain)
    assert isinstance(answer, F.Members) and answer.id == 3
    assert [m.client for m in answer.members] == ["shown"]


async def test_one_connection_is_one_member_of_a_session(raw: Raw, served: Served) -> None:
    watcher, _ = await watch(raw, served.port)
    ws = await raw(served.port, client="twice")
    await ws.send(F.Attach(2, "chat"))
    assert isinstance(await ws.frame(), F.Attached)
    assert isinstance(await ws.frame(), F.UpToDate)
    first = await joined(watcher)
    await ws.send(F.Attach(3, "chat"))
    err = await ws.frame()
    assert isinstance(err, F.Error) and err.code == "already_attached"
    assert served.broker.presence.members("chat") == [first]
    await ws.send(F.Detach(4, "chat"))
    assert await left(watcher) == first
    await ws.send(F.Attach(5, "chat"))
    again = await joined(watcher)
    assert again.id == first.id and again.client == "twice"


async def test_an_unclean_drop_leaves(raw: Raw, served: Served) -> None:
    watcher, _ = await watch(raw, served.port)
    ws = await raw(served.port, client="dropped")
    await ws.send(F.Attach(2, "chat"))
    assert isinstance(await ws.frame(), F.Attached)
    m = await joined(watcher)
    await ws.aclose()                                # TCP closed, no close frame
    assert await left(watcher) == m


async def test_a_heartbeat_timeout_leaves(raw: Raw, tmp_path: Path,
                                          mock_clock: trio.testing.MockClock) -> None:
    async with serve_in_process(tmp_path, WsConfig(heartbeat_s=25),
                                fsync=FsyncPolicy("never")) as s:
        watcher, _ = await watch(raw, s.port)
        silent = await raw(s.port, client="silent")
        await silent.send(F.Attach(2, "chat"))
        assert isinstance(await silent.frame(), F.Attached)
        m = await joined(watcher)
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(25)                          # both are pinged
        ping = await watcher.frame()
        assert isinstance(ping, F.Ping)
        await watcher.send(F.Pong(ping.id))
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(25)                          # only the watcher answered
        assert await silent.close_code() == 4008
        assert await left(watcher) == m              # (its next ping is answered on the way)


async def test_token_expiry_leaves(raw: Raw, tmp_path: Path,
                                   mock_clock: trio.testing.MockClock) -> None:
    wall = time.time()
    auth = Authenticator(SECRET, clock=lambda: wall + trio.current_time())

    def tok(sub: str, ttl_s: float) -> str:
        # Not mint(now=...): PyJWT checks iat against the real clock.
        claims = {"sub": sub, "iat": int(time.time()), "exp": int(auth.clock() + ttl_s),
                  "caps": {"chat": ["read", "create"]}}
        return jwt.encode(claims, SECRET, algorithm="HS256")

    async with serve_in_process(tmp_path, WsConfig(heartbeat_s=100_000), auth=auth,
                                fsync=FsyncPolicy("never")) as s:
        watcher, _ = await watch(raw, s.port, client=None, token=tok("watcher", 10_000))
        short = await raw(s.port, hello=F.Hello(None, tok("short", 120)))
        await short.send(F.Attach(2, "chat"))
        assert isinstance(await short.frame(), F.Attached)
        assert (await joined(watcher)).client == "short"
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(200)
        assert await short.close_code() == 4001
        assert (await left(watcher)).client == "short"


async def test_server_shutdown_leaves(served: Served) -> None:
    heard: list[tuple[str, str]] = []
    served.broker.presence.watch("chat", lambda kind, m: heard.append((kind, m.client)))
    async with client.open_connection(served.ws_url, client_id="a") as a, \
            client.open_connection(served.ws_url, client_id="b") as b:
        await a.attach("chat", create=True)
        await b.attach("chat")
        served.server.ws.shut_down()                 # every connection closes with 1001
        await a.wait_closed()
        await b.wait_closed()
        assert a.closed is not None and a.closed.code == 1001
    await settle(served)
    assert sorted(heard) == [("join", "a"), ("join", "b"), ("leave", "a"), ("leave", "b")]


async def test_presence_is_never_in_the_log(raw: Raw, served: Served) -> None:
    async with client.open_connection(served.ws_url, client_id="pub") as pub:
        await pub.publish("chat", [b"one", b"two"], create=True)
        watcher, _ = await watch(raw, served.port)
        for i in range(5):
            ws = await raw(served.port, client=f"guest-{i}")
            await ws.send(F.Attach(2, "chat", info={"i": i}))
            assert isinstance(await ws.frame(), F.Attached)
            await joined(watcher)
            await ws.aclose()
            await left(watcher)
        await pub.publish("chat", [b"three"])
    batch = await served.broker.read("chat")
    assert batch.payloads() == [b"one", b"two", b"three"]
    assert (await served.broker.info("chat")).next_offset == 3


async def test_a_reconnect_storm_leaves_nothing_behind(raw: Raw, served: Served) -> None:
    """Many connections attach and go, cleanly and not, while one watcher
    watches: the watcher's view adds up to the registry's (empty) set, and
    once it goes too the registry holds nothing at all."""
    watcher, first = await watch(raw, served.port)
    held = {m.id for m in first.members}

    async def one(i: int) -> None:
        if i % 3:
            ws = await raw(served.port, client=f"storm-{i % 7}")
            await ws.send(F.Attach(2, "chat", info={"n": i}))
            assert isinstance(await ws.frame(), F.Attached)
            await ws.aclose()                        # unclean
        else:
            async with client.open_connection(served.ws_url, client_id=f"storm-{i}") as c:
                await c.attach("chat")

    async with trio.open_nursery() as nursery:
        for i in range(120):
            nursery.start_soon(one, i)
    await settle(served)
    await trio.testing.wait_all_tasks_blocked()      # what is due to the watcher is sent
    await watcher.send(F.Presence(99, "chat"))        # and this answer comes after it
    with trio.fail_after(10):
        while True:
            frame = await next_presence(watcher)
            if isinstance(frame, F.Members) and frame.id == 99:
                assert frame.members == ()
                break
            if isinstance(frame, F.Members):
                held = {m.id for m in frame.members}
            elif isinstance(frame, F.Join):
                held.add(frame.member.id)
            else:
                assert isinstance(frame, F.Leave)
                held.remove(frame.member.id)
    assert held == set()
    await watcher.aclose()
    with trio.fail_after(10):
        while not served.broker.presence.empty:
            await trio.sleep(0.01)


async def test_a_watcher_that_does_not_read_holds_a_bounded_feed(raw: Raw,
                                                                  served: Served) -> None:
    """While the server cannot send to a watcher (it stopped reading, and its
    socket is full of data), presence changes are not queued for it: its
    feed gives up past its limit, and when it reads again it gets the whole
    set, which adds up to the registry's."""
    watcher, _ = await watch(raw, served.port)
    [conn] = [c for c in served.server.ws._conns if c.client == "watcher"]
    sub = conn.subs["chat"]
    with trio.fail_after(20):
        while conn.sending is None:                  # until the writer is stuck in a send
            await served.broker.append("chat", b"x" * (512 << 10))
            await trio.testing.wait_all_tasks_blocked()
    presence = served.broker.presence
    for i in range(600):                             # a storm: 300 come and go, 300 stay
        presence.join("chat", F.Member(f"m{i}", f"c{i}", "sse", i))
        if i % 2:
            presence.leave("chat", f"m{i}")
        assert sub.feed is not None and len(sub.feed.pending) <= sub.feed.limit
    assert sub.feed.resync
    held: set[str] = set()
    with trio.fail_after(20):
        while True:
            frame = await next_presence(watcher)
            if isinstance(frame, F.Members):
                held = {m.id for m in frame.members}
            elif isinstance(frame, F.Join):
                held.add(frame.member.id)
            elif isinstance(frame, F.Leave):
                held.remove(frame.member.id)
            if held == {m.id for m in presence.members("chat")}:
                break
    assert len(held) == 300
    for m in presence.members("chat"):
        presence.leave("chat", m.id)


# ---------------------------------------------------------------- the presence frame, errors

async def test_presence_frame_answers_members_or_an_error(raw: Raw, served: Served) -> None:
    ws = await raw(served.port, client="asker")
    await ws.send(F.Presence(1, "nowhere"))
    err = await ws.frame()
    assert isinstance(err, F.Error) and (err.code, err.session, err.id) == (
        "session_not_found", "nowhere", 1)
    await ws.send(F.Presence(2, "a/../b"))
    err = await ws.frame()
    assert isinstance(err, F.Error) and (err.code, err.id) == ("invalid_session_name", 2)
    await ws.send(F.Attach(3, "chat", create=True, info={"x": 1.5}))
    assert isinstance(await ws.frame(), F.Attached)
    await ws.send(F.Presence(4, "chat"))
    answer = await next_presence(ws)
    assert isinstance(answer, F.Members) and answer.id == 4
    assert [(m.client, m.info) for m in answer.members] == [("asker", {"x": 1.5})]


BAD_INFO: list[Any] = [
    "role=agent", [1], {"": 1}, {"k" * 65: 1}, {str(i): i for i in range(17)},
    {"k": "v" * 257}, {"k": {"nested": 1}}, {"k": [1, 2]}, {"k": b"bytes"}, {"k": 1 << 53},
    {1: "v"},
]


@pytest.mark.parametrize("info", BAD_INFO, ids=repr)
async def test_bad_info_gets_a_clear_error(raw: Raw, served: Served, info: Any) -> None:
    ws = await raw(served.port, hello=False)
    await ws.send({"t": "hello", "client": "x", "info": info})
    err = await ws.frame()
    assert isinstance(err, F.Error) and err.code == "bad_frame" and "'info'" in err.message
    await ws.send(F.Hello("x", None, {"fine": True}))        # the connection carries on
    assert isinstance(await ws.frame(), F.Welcome)
    await ws.send_message(msgpack.packb({"t": "attach", "id": 9, "s": "chat", "create": True,
                                         "info": info}))
    err = await ws.frame()
    assert isinstance(err, F.Error) and (err.code, err.session, err.id) == ("bad_frame", "chat", 9)
    assert "attach 'info'" in err.message
    await ws.send_message(msgpack.packb({"t": "attach", "id": 10, "s": "chat", "create": True,
                                         "presence": "yes"}))
    err = await ws.frame()
    assert isinstance(err, F.Error) and (err.code, err.id) == ("bad_frame", 10)
    assert served.broker.presence.members("chat") == []


def test_the_client_refuses_bad_presence_info() -> None:
    with pytest.raises(ValueError, match="presence_info"):
        client.Client("ws://x/v1/ws", dial=lambda u: None,  # type: ignore[arg-type,return-value]
                      backoff=client.Backoff(), connect_timeout=1, window=1, max_retry_wait=1,
                      rng=None, presence_info={"k": {"deep": 1}})


async def test_with_auth_presence_needs_read(raw: Raw, tmp_path: Path) -> None:
    async with serve_in_process(tmp_path, auth=Authenticator(SECRET)) as s:
        admin = mint("admin", {"*": ["*"]}, secret=SECRET)
        blind = mint("blind", {"chat": ["append"]}, secret=SECRET)
        async with client.open_connection(s.ws_url, token=admin) as c:
            await c.attach("chat", create=True, info={"role": "admin"})
            async with client.open_connection(s.ws_url, token=blind) as b:
                with pytest.raises(client.ClientError) as e:
                    await b.presence("chat")
                assert e.value.code == "forbidden"
                with pytest.raises(client.ClientError) as e:
                    await b.attach("chat", presence=True, hidden=True)
                assert e.value.code == "forbidden"
            members = await c.presence("chat")
            assert [(m.client, m.info) for m in members] == [("admin", {"role": "admin"})]


# ---------------------------------------------------------------- the Python client

async def test_client_session_presence_and_events(served: Served) -> None:
    async with client.connect(served.ws_url, client_id="ui",
                              presence_info={"device": "laptop"}) as c:
        chat = c.session("chat")
        await chat.publish(b"x", create=True)
        async with chat.subscribe("now", presence=True) as sub:
            events = sub.presence_events()
            sync = await events.__anext__()
            assert sync.action == "sync"
            assert [(m.client, m.info) for m in sync.members] == [("ui", {"device": "laptop"})]
            async with client.connect(served.ws_url, client_id="agent",
                                      presence_info={"role": "agent"}) as other:
                async with other.session("chat").signals():
                    ev = await events.__anext__()
                    assert ev.action == "join" and ev.member is not None
                    assert (ev.member.client, ev.member.info) == ("agent", {"role": "agent"})
                    assert {m.client for m in await chat.presence()} == {"ui", "agent"}
                    assert set(sub.members) == {m.id for m in await chat.presence()}
            ev = await events.__anext__()
            assert ev.action == "leave" and ev.member is not None and ev.member.client == "agent"
            assert [m.client for m in sub.members.values()] == ["ui"]
        with pytest.raises(ValueError):
            chat.subscribe().presence_events()

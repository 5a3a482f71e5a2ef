"""Token auth on the WebSocket protocol against a real server: hello, ?token=,
capabilities per frame, the publisher stamped from the token, refresh and
expiry.  (Per-connection limits are in test_ws_limits.py.)"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
import trio.testing

from broker import _core, _frames, client
from broker._auth import Authenticator, mint
from broker._config import FsyncPolicy
from broker._ws import WsConfig
from conftest import Served, serve_in_process
from _wsraw import RawWs

SECRET = "a test secret that is long enough for HS256"
ALL = {"chat/*": ["*"]}


def token(sub: str = "alice", caps: dict[str, list[str]] | None = None, **kw: Any) -> str:
    return mint(sub, ALL if caps is None else caps, secret=kw.pop("secret", SECRET), **kw)


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _tampered() -> str:
    head, _, sig = token(caps={"chat/mine": ["read"]}).split(".")
    claims = {"sub": "alice", "exp": int(time.time()) + 3600, "caps": {"*": ["*"]}}
    return f"{head}.{_b64(claims)}.{sig}"


def _alg_none() -> str:
    claims = {"sub": "alice", "exp": int(time.time()) + 3600, "caps": {"*": ["*"]}}
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."


@pytest.fixture
async def authed(tmp_path: Path) -> AsyncIterator[Served]:
    async with serve_in_process(tmp_path / "data", auth=Authenticator(SECRET)) as s:
        yield s


@pytest.fixture
def raw(raw: Callable[..., Awaitable[RawWs]]) -> Callable[..., Awaitable[RawWs]]:
    """conftest's ``raw``, with no hello unless one is given:
    ``await raw(port, path=..., hello=Hello(...))``."""
    async def connect(port: int, path: str = "/v1/ws",
                      hello: _frames.Hello | None = None) -> RawWs:
        return await raw(port, path=path, hello=hello if hello is not None else False)
    return connect


async def refused(ws: RawWs, code: str) -> None:
    """``ws`` gets an error ``code`` about no session or request, then close 4001."""
    err = await ws.frame()
    assert isinstance(err, _frames.Error), err
    assert (err.code, err.session, err.id) == (code, None, None), err
    assert await ws.close_code() == 4001


# ---------------------------------------------------------------- hello

@pytest.mark.parametrize("make, code", [
    (lambda: None, "unauthorized"),
    (lambda: "", "unauthorized"),
    (lambda: "garbage", "token_invalid"),
    (lambda: "a.b.c", "token_invalid"),
    (lambda: token(now=time.time() - 7200, ttl_s=3600), "token_expired"),
    (_alg_none, "token_invalid"),
    (lambda: token(secret="another secret, just as long as the real one"), "token_invalid"),
    (_tampered, "token_invalid"),
    (lambda: "x" * 9000, "token_invalid"),
], ids=["none", "empty", "garbage", "not-json", "expired", "alg-none", "wrong-key", "tampered",
        "huge"])
async def test_hello_without_a_valid_token_is_refused(
        authed: Served, raw: Any, make: Callable[[], str | None], code: str) -> None:
    async with client.open_connection(authed.ws_url, token=token()) as bystander:
        await bystander.publish("chat/x", [b"before"], create=True)
        ws = await raw(authed.port)
        await ws.send(_frames.Hello(None, make()))
        await refused(ws, code)
        assert (await bystander.publish("chat/x", [b"after"])).offset == 1


async def test_hello_client_must_be_the_tokens_sub(authed: Served, raw: Any) -> None:
    ws = await raw(authed.port)
    await ws.send(_frames.Hello("mallory", token("alice")))
    await refused(ws, "client_mismatch")
    ws = await raw(authed.port, hello=_frames.Hello("alice", token("alice")))
    await ws.send(_frames.Ping(1))
    assert await ws.frame() == _frames.Pong(1)


async def test_welcome_names_the_sub_and_the_ttl(authed: Served, raw: Any) -> None:
    ws = await raw(authed.port)
    await ws.send(_frames.Hello(None, token("alice", ttl_s=600)))
    welcome = await ws.frame()
    assert isinstance(welcome, _frames.Welcome) and welcome.client == "alice"
    assert welcome.ttl is not None and 500 < welcome.ttl <= 600


@pytest.mark.parametrize("url, hello, outcome", [
    ("good", None, "alice"),
    ("garbage", "good", "alice"),            # the hello's token wins ...
    ("good", "garbage", "token_invalid"),    # ... whichever is the valid one
    ("bob", "good", "alice"),
    (None, None, "unauthorized"),
])
async def test_token_in_the_upgrade_url(authed: Served, raw: Any, url: str | None,
                                        hello: str | None, outcome: str) -> None:
    tokens = {"good": token("alice"), "bob": token("bob"), "garbage": "garbage", None: None}
    path = "/v1/ws" if url is None else f"/v1/ws?x=1&token={tokens[url]}"
    ws = await raw(authed.port, path)
    await ws.send(_frames.Hello(None, tokens[hello]))
    if outcome == "alice":
        welcome = await ws.frame()
        assert isinstance(welcome, _frames.Welcome) and welcome.client == "alice"
    else:
        await refused(ws, outcome)


async def test_client_connect_raises_the_refusal(authed: Served) -> None:
    for tok, code in ((None, "unauthorized"), ("garbage", "token_invalid")):
        with pytest.raises(client.ClientError) as e:
            async with client.connect(authed.ws_url, token=tok):
                pass                                                # pragma: no cover
        assert e.value.code == code


async def test_auth_off_ignores_tokens(served: Served, raw: Any) -> None:
    ws = await raw(served.port)
    await ws.send(_frames.Hello("me", "not a token"))
    welcome = await ws.frame()
    assert isinstance(welcome, _frames.Welcome)
    assert (welcome.client, welcome.ttl) == ("me", None)
    await ws.send(_frames.Refresh(1, "still not a token"))
    assert await ws.frame() == _frames.Refreshed(1)
    await ws.send(_frames.Publish(2, "any/where", (b"x",), create=True))
    assert isinstance(await ws.frame(), _frames.Ack)


# ---------------------------------------------------------------- capabilities

CAPS = {"ro/*": ["read"], "rw/*": ["read", "append"], "sig/*": ["signal"],
        "all/*": ["*"], "new/*": ["read", "append", "create"]}


def _attach(rid: int, name: str) -> _frames.Frame:
    return _frames.Attach(rid, name, offset=0)


def _attach_create(rid: int, name: str) -> _frames.Frame:
    return _frames.Attach(rid, name, offset=0, create=True)


def _publish(rid: int, name: str) -> _frames.Frame:
    return _frames.Publish(rid, name, (b"x",))


def _publish_create(rid: int, name: str) -> _frames.Frame:
    return _frames.Publish(rid, name, (b"x",), create=True)


def _signal(rid: int, name: str) -> _frames.Frame:
    return _frames.Signal(rid, name, b"stop")


def _publish_signal_kind(rid: int, name: str) -> _frames.Frame:
    """A signal in a publish frame's clothes: kind 1 is a signal whichever frame carries it."""
    return _frames.Publish(rid, name, (b"stop",), kind=1)


@pytest.mark.parametrize("make, op, denied", [
    (_attach, "read", "sig"),
    (_attach_create, "create", "rw"),
    (_publish, "append", "ro"),
    (_publish_create, "create", "rw"),
    (_signal, "signal", "rw"),
    (_publish_signal_kind, "signal", "rw"),
    (_attach, "read", "elsewhere"),
])
async def test_each_frame_needs_its_operation(authed: Served, raw: Any, make: Any, op: str,
                                              denied: str) -> None:
    """Refused alike whether the session exists or not, and the connection
    carries on."""
    await authed.broker.create(f"{denied}/exists")
    ws = await raw(authed.port, hello=_frames.Hello(None, token(caps=CAPS)))
    errors = []
    for rid, name in ((1, f"{denied}/exists"), (2, f"{denied}/missing")):
        await ws.send(make(rid, name))
        err = await ws.frame()
        assert isinstance(err, _frames.Error), err
        assert (err.code, err.session, err.id) == ("forbidden", name, rid)
        assert op in err.message
        errors.append(err.message.replace(name, "NAME"))
    assert errors[0] == errors[1]
    await ws.send(_frames.Publish(3, "all/fine", (b"fine",), create=True))
    assert isinstance(await ws.frame(), _frames.Ack)


async def test_an_impossible_name_is_refused_before_the_globs(authed: Served,
                                                             raw: Any) -> None:
    """A glob is a regular expression whose cost grows with the name: a name
    longer than any valid one must never reach it."""
    ws = await raw(authed.port, hello=_frames.Hello(None, token(caps={"a/*/*/*/*/*/*/x": ["*"]})))
    name = "a/" + "/" * 5000
    await ws.send(_frames.Attach(1, name))
    err = await ws.frame()
    assert isinstance(err, _frames.Error) and (err.code, err.id) == ("invalid_session_name", 1)


async def test_allowed_frames_pass(authed: Served, raw: Any) -> None:
    for name in ("ro/1", "rw/1", "sig/1"):
        await authed.broker.create(name)
    ws = await raw(authed.port, hello=_frames.Hello(None, token(caps=CAPS)))
    await ws.send(_frames.Publish(1, "rw/1", (b"a",)))
    assert isinstance(await ws.frame(), _frames.Ack)
    await ws.send(_frames.Signal(2, "sig/1", b"stop"))
    assert isinstance(await ws.frame(), _frames.Ack)
    await ws.send(_frames.Publish(3, "new/1", (b"a",), create=True))
    assert isinstance(await ws.frame(), _frames.Ack)
    await ws.send(_frames.Publish(5, "sig/1", (b"stop",), kind=1))     # a signal, so signal
    assert isinstance(await ws.frame(), _frames.Ack)
    await ws.send(_frames.Attach(4, "ro/1", offset=0))
    assert isinstance(await ws.frame(), _frames.Attached)


async def test_a_token_for_another_session(authed: Served) -> None:
    async with client.open_connection(authed.ws_url,
                                      token=token(caps={"chat/mine": ["*"]})) as c:
        await authed.broker.create("chat/theirs")
        with pytest.raises(client.ClientError) as e:
            await c.attach("chat/theirs", offset=-1)
        assert (e.value.code, e.value.session) == ("forbidden", "chat/theirs")
        sub = await c.attach("chat/mine", offset=-1, create=True)
        await c.publish("chat/mine", [b"mine"])
        assert (await sub.__anext__()).payload == b"mine"


async def test_the_publisher_is_the_tokens_sub(authed: Served) -> None:
    async with client.open_connection(authed.ws_url, token=token("agent-7")) as c:
        assert c.welcome is not None and c.welcome.client == "agent-7"
        await c.publish("chat/p", [b"a"], create=True)
        await c.signal("chat/p", b"s")
        sub = await c.attach("chat/p", offset=-1)
        data = await sub.next_frame()
        assert isinstance(data, _frames.Data)
        assert [r.publisher for r in data.records] == ["agent-7", "agent-7"]


# ---------------------------------------------------------------- refresh and expiry

@pytest.fixture
async def clocked(tmp_path: Path,
                  mock_clock: trio.testing.MockClock) -> AsyncIterator[tuple[Served, Any]]:
    """A server whose token clock is Trio's (mock) clock, so ``mock_clock.jump``
    ages tokens too; returns it and ``mint`` at that clock.  No group-commit
    timer and no heartbeats, so nothing else waits on the clock."""
    wall = time.time()
    auth = Authenticator(SECRET, clock=lambda: wall + trio.current_time())

    def at_now(sub: str = "alice", caps: dict[str, list[str]] | None = None,
               ttl_s: float = 120) -> str:
        # Not mint(now=...): PyJWT checks iat against the real clock.
        claims = {"sub": sub, "iat": int(time.time()), "exp": int(auth.clock() + ttl_s),
                  "caps": ALL if caps is None else caps}
        return jwt.encode(claims, SECRET, algorithm="HS256")

    async with serve_in_process(tmp_path / "data", WsConfig(heartbeat_s=100_000), auth=auth,
                                fsync=FsyncPolicy("never")) as s:
        yield s, at_now


async def jump(clock: trio.testing.MockClock, seconds: float) -> None:
    await trio.testing.wait_all_tasks_blocked()
    clock.jump(seconds)


async def test_expiry_warns_then_closes(clocked: tuple[Served, Any],
                                        mock_clock: trio.testing.MockClock, raw: Any) -> None:
    s, at_now = clocked
    ws = await raw(s.port)
    await ws.send(_frames.Hello(None, at_now(ttl_s=120)))
    welcome = await ws.frame()
    assert isinstance(welcome, _frames.Welcome) and welcome.ttl is not None
    await jump(mock_clock, welcome.ttl - 61)
    await ws.send(_frames.Ping(1))
    assert await ws.frame() == _frames.Pong(1)       # no warning yet
    await jump(mock_clock, 2)
    warning = await ws.frame()
    assert isinstance(warning, _frames.Expiring) and 58 < warning.ttl <= 60
    await jump(mock_clock, 60)
    await refused(ws, "token_expired")


async def test_expiry_ends_a_connection_whose_peer_does_not_read(
        clocked: tuple[Served, Any], mock_clock: trio.testing.MockClock, raw: Any) -> None:
    """A peer that stops reading blocks the writer, which keeps the expiry
    timer: the connection must still end at the token's expiry, or it could
    go on publishing on a dead token."""
    s, at_now = clocked
    ws = await raw(s.port, hello=_frames.Hello(None, at_now(ttl_s=120)))
    ping = _core.build_frame(_core.OP_PING, b"p" * 125, mask=os.urandom(4)) * 512

    async def flood() -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            for _ in range((32 << 20) // len(ping)):
                await ws.send_raw(ping)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        await jump(mock_clock, 121)
        await trio.testing.wait_all_tasks_blocked()
        assert s.server.ws.connections == 0
        nursery.cancel_scope.cancel()


async def test_a_refresh_moves_the_expiry_of_a_blocked_send(
        clocked: tuple[Served, Any], mock_clock: trio.testing.MockClock, raw: Any) -> None:
    """A slow reader that refreshed in time is not dropped at the old expiry
    while the writer waits on it."""
    s, at_now = clocked
    await s.broker.create("chat/big")
    for _ in range(8):
        await s.broker.append_many("chat/big", [b"x" * 65536] * 16)
    ws = await raw(s.port, hello=_frames.Hello(None, at_now(ttl_s=120)))
    await ws.send(_frames.Attach(1, "chat/big", offset=0))
    await trio.testing.wait_all_tasks_blocked()          # the writer is stuck in a send
    await ws.send(_frames.Refresh(2, at_now(ttl_s=1000)))
    await jump(mock_clock, 121)
    await trio.testing.wait_all_tasks_blocked()
    assert s.server.ws.connections == 1
    while not isinstance(frame := await ws.frame(), _frames.Refreshed):
        pass
    assert frame.id == 2


async def test_refresh_extends_the_connection(clocked: tuple[Served, Any],
                                              mock_clock: trio.testing.MockClock) -> None:
    s, at_now = clocked
    async with client.open_connection(s.ws_url, token=at_now(ttl_s=120)) as c:
        await c.publish("chat/a", [b"0"], create=True)
        await jump(mock_clock, 100)
        await c.expiring.wait()
        assert c.expiring_ttl is not None and c.expiring_ttl <= 60
        refreshed = await c.refresh(at_now(ttl_s=120))
        assert refreshed.ttl is not None and refreshed.ttl > 119
        assert not c.expiring.is_set()
        await jump(mock_clock, 50)                    # past the first token's expiry
        assert (await c.publish("chat/a", [b"1"])).offset == 1
        sub = await c.attach("chat/a", offset="now")
        await jump(mock_clock, 200)                   # past the second's, with no refresh
        with pytest.raises(client.ClientError) as e:
            async for _ in sub:
                pass                                                # pragma: no cover
        assert e.value.code == "token_expired"
        assert c.closed is not None and c.closed.code == 4001


async def test_refresh_for_another_sub_closes(authed: Served) -> None:
    async with client.open_connection(authed.ws_url, token=token("alice")) as c:
        sub = await c.attach("chat/a", offset="now", create=True)
        with pytest.raises(client.ClientError) as e:
            await c.refresh(token("bob"))
        assert e.value.code == "client_mismatch"
        with pytest.raises(client.ClientError):
            await sub.__anext__()
        assert c.closed is not None and c.closed.code == 4001


@pytest.mark.parametrize("bad, code", [
    ("garbage", "token_invalid"),
    (token(now=time.time() - 7200, ttl_s=3600), "token_expired"),
])
async def test_a_refused_refresh_keeps_the_current_token(authed: Served, bad: str,
                                                         code: str) -> None:
    async with client.open_connection(authed.ws_url, token=token()) as c:
        with pytest.raises(client.ClientError) as e:
            await c.refresh(bad)
        assert e.value.code == code
        assert (await c.publish("chat/a", [b"x"], create=True)).offset == 0


async def test_refresh_applies_the_new_caps_at_once(authed: Served) -> None:
    async with client.open_connection(authed.ws_url, token=token(caps=ALL)) as c:
        kept = await c.attach("chat/kept", offset=-1, create=True)
        lost = await c.attach("chat/lost", offset=-1, create=True)
        await c.refresh(token(caps={"chat/kept": ["read", "append"]}))
        with pytest.raises(client.ClientError) as e:
            async for _ in lost:
                pass                                                # pragma: no cover
        assert (e.value.code, e.value.session) == ("forbidden", "chat/lost")
        with pytest.raises(client.ClientError) as e:
            await c.publish("chat/lost", [b"x"])
        assert e.value.code == "forbidden"
        await c.publish("chat/kept", [b"still"])
        assert (await kept.__anext__()).payload == b"still"

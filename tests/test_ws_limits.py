"""Per-connection limits on the WebSocket protocol against a real server:
sessions attached at once, the publish rate, the hello timeout, records per
publish.  Each refusal is an error frame; other connections carry on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from broker import _core, _frames, client
from broker._config import FsyncPolicy
from broker._errors import SessionNotFound
from broker._ws import WsConfig
from conftest import serve_in_process
from _wsraw import RawWs


async def exists(s: Any, name: str) -> bool:
    try:
        await s.broker.info(name)
    except SessionNotFound:
        return False
    return True


async def expect_error(ws: RawWs, code: str, session: str | None,
                       request_id: int | None) -> _frames.Error:
    err = await ws.frame()
    assert isinstance(err, _frames.Error), err
    assert (err.code, err.session, err.id) == (code, session, request_id), err
    return err


def test_config_is_validated() -> None:
    for bad in ({"max_sessions": 0}, {"hello_timeout_s": 0}, {"publish_rate": -1},
                {"publish_burst": -1}, {"expiry_warning_s": -1}):
        with pytest.raises(ValueError):
            WsConfig(**bad)


async def test_too_many_sessions(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path, WsConfig(max_sessions=2)) as s:
        async with client.open_connection(s.ws_url) as c, \
                client.open_connection(s.ws_url) as other:
            a = await c.attach("a", offset=-1, create=True)
            await c.attach("b", offset=-1, create=True)
            with pytest.raises(client.ClientError) as e:
                await c.attach("c", offset=-1, create=True)
            assert (e.value.code, e.value.session) == ("too_many_sessions", "c")
            assert "at most 2" in e.value.message
            assert not await exists(s, "c")
            for name in ("a", "b"):                 # a limit per connection
                await other.attach(name, offset=-1)
            await a.detach()
            await c.attach("c", offset=-1, create=True)


async def test_publish_rate(tmp_path: Path, mock_clock: trio.testing.MockClock,
                            raw: Any) -> None:
    """The bucket holds 4 records and refills 2 per second.  Nothing moves
    the (mock) clock but the test, and fsync=never keeps the group-commit
    timer out of it."""
    async with serve_in_process(tmp_path, WsConfig(publish_rate=2, publish_burst=4,
                                                   heartbeat_s=100_000),
                                fsync=FsyncPolicy("never")) as s:
        await s.broker.create("s")
        ws = await raw(s.port)
        await ws.send(_frames.Publish(1, "s", (b"a", b"b", b"c")))
        assert isinstance(await ws.frame(), _frames.Ack)
        await ws.send(_frames.Publish(2, "s", (b"d", b"e")))
        err = await expect_error(ws, "rate_limited", "s", 2)
        assert err.retry_after == pytest.approx(0.5)
        assert "retry in 0.5 s" in err.message
        await ws.send(_frames.Signal(3, "s", b"stop"))
        assert isinstance(await ws.frame(), _frames.Ack)     # the last record in the bucket
        await ws.send(_frames.Signal(4, "s", b"again"))
        await expect_error(ws, "rate_limited", "s", 4)
        await ws.send(_frames.Publish(5, "s", (b"x",) * 5))
        err = await expect_error(ws, "batch_too_large", "s", 5)
        assert "burst of 4" in err.message and err.retry_after is None
        other = await raw(s.port)                              # a bucket of its own
        await other.send(_frames.Publish(1, "s", (b"o",) * 4))
        assert isinstance(await other.frame(), _frames.Ack)
        assert (await s.broker.read("s")).payloads() == [b"a", b"b", b"c", b"stop"] + [b"o"] * 4
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(1)
        await ws.send(_frames.Publish(6, "s", (b"d", b"e")))
        ack = await ws.frame()
        assert isinstance(ack, _frames.Ack) and ack.offset == 8


async def test_rate_limited_surfaces_in_the_client(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path, WsConfig(publish_rate=0.001, publish_burst=1)) as s:
        async with client.open_connection(s.ws_url) as c:
            await c.publish("s", [b"a"], create=True)
            with pytest.raises(client.ClientError) as e:
                await c.publish("s", [b"b"])
            assert e.value.code == "rate_limited"
            assert e.value.retry_after is not None and e.value.retry_after > 100


async def test_hello_timeout(tmp_path: Path, autojump_clock: trio.abc.Clock,
                             raw: Any) -> None:
    async with serve_in_process(tmp_path, WsConfig(hello_timeout_s=5, heartbeat_s=100_000)) as s:
        greeted = await raw(s.port)
        start = trio.current_time()
        idle = await raw(s.port, hello=False)
        err = await expect_error(idle, "hello_timeout", None, None)
        assert "5 s" in err.message
        assert await idle.close_code() == 4002
        assert trio.current_time() - start >= 5
        await greeted.send(_frames.Ping(1))
        assert await greeted.frame() == _frames.Pong(1)


async def test_max_publish_records(tmp_path: Path, raw: Any) -> None:
    async with serve_in_process(tmp_path, WsConfig(max_publish_records=3)) as s:
        ws = await raw(s.port)
        await ws.send(_frames.Publish(1, "s", (b"x",) * 4, create=True))
        err = await expect_error(ws, "batch_too_large", "s", 1)
        assert "at most 3" in err.message
        assert not await exists(s, "s")
        await ws.send(_frames.Publish(2, "s", (b"x",) * 3, create=True))
        assert isinstance(await ws.frame(), _frames.Ack)


async def test_json_too_deep_to_parse_is_a_bad_payload(tmp_path: Path, raw: Any) -> None:
    """Python's JSON parser gives up on deep nesting with RecursionError, not
    ValueError: that must be a refusal, not a dropped connection."""
    async with serve_in_process(tmp_path) as s:
        await s.broker.create("j", content_type="application/json")
        ws = await raw(s.port)
        await ws.send(_frames.Publish(1, "j", (b"[" * 100_000,)))
        await expect_error(ws, "bad_payload", "j", 1)
        await ws.send(_frames.Publish(2, "j", (b"[[1]]",)))
        assert isinstance(await ws.frame(), _frames.Ack)


# ---------------------------------------------------------------- a peer that does not read

def queued(s: Any) -> int:
    """Bytes the server has queued for its one WebSocket connection."""
    (conn,) = s.server.ws._conns
    return sum(map(len, conn.out))


async def flood_pings(ws: RawWs, total: int) -> None:
    """Send about ``total`` bytes of WebSocket pings and read nothing; stop
    quietly if the server drops the connection."""
    batch = _core.build_frame(_core.OP_PING, b"p" * 125, mask=os.urandom(4)) * 512
    try:
        for _ in range(total // len(batch)):
            await ws.send_raw(batch)
    except trio.BrokenResourceError:
        pass


async def test_a_peer_that_does_not_read_cannot_make_the_server_queue(
        tmp_path: Path, autojump_clock: trio.abc.Clock, raw: Any) -> None:
    """Every ping gets a pong.  A peer that pings and never reads would have
    the server queue pongs without end if it went on reading: it stops while
    more than ``max_round_bytes`` of answers wait."""
    async with serve_in_process(tmp_path, WsConfig(heartbeat_s=100_000)) as s:
        ws = await raw(s.port)
        with trio.move_on_after(60):
            await flood_pings(ws, 32 << 20)     # more than the sockets' buffers hold
        assert queued(s) <= WsConfig().max_round_bytes + 1024
        other = await raw(s.port)
        await other.send(_frames.Ping(1))
        assert await other.frame() == _frames.Pong(1)


async def test_the_hello_timeout_holds_against_a_peer_that_does_not_read(
        tmp_path: Path, autojump_clock: trio.abc.Clock, raw: Any) -> None:
    """The writer keeps the hello timeout; blocked on a peer that does not
    read, it must still end the connection (no close frame can be sent)."""
    async with serve_in_process(tmp_path, WsConfig(hello_timeout_s=5, heartbeat_s=100_000)) as s:
        ws = await raw(s.port, hello=False)
        with trio.move_on_after(60):
            await flood_pings(ws, 32 << 20)
        await trio.sleep(60)
        assert s.server.ws.connections == 0

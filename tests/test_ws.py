"""The WebSocket protocol against a real server: handshake, frames, errors,
multiplexing, producers, heartbeats.  (Resume, slow readers, signals and
cross-transport reads are in test_ws_resume.py.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from broker import _core, _frames, client
from broker._handshake import client_request
from broker._ws import WsConfig
from conftest import Served, serve_in_process


async def _http(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        out = b""
        while b"\r\n\r\n" not in out:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            out += chunk
    return out


# ---------------------------------------------------------------- handshake

@pytest.mark.parametrize("path,drop,status,code", [
    ("/v1/ws", "Sec-WebSocket-Protocol", b"400", b"bad_subprotocol"),
    ("/v1/ws", "Sec-WebSocket-Key", b"400", b"bad_handshake"),
    ("/v1/elsewhere", None, b"404", b"not_found"),
])
async def test_bad_handshakes_get_an_http_error(served: Served, path: str, drop: str | None,
                                                status: bytes, code: bytes) -> None:
    request, _ = client_request("x", path)
    if drop:
        request = b"\r\n".join(line for line in request.split(b"\r\n")
                               if not line.startswith(drop.encode()))
    answer = await _http(served.port, request)
    assert answer.startswith(b"HTTP/1.1 " + status) and code in answer


async def test_hello_first_and_only_once(raw: Any, served: Served) -> None:
    ws = await raw(served.port, hello=False)
    await ws.send(_frames.Attach(1, "s"))
    err = await ws.frame()
    assert isinstance(err, _frames.Error) and err.code == "hello_required"
    assert await ws.close_code() == 4000
    ws = await raw(served.port)
    await ws.send(_frames.Hello("again"))
    assert (await ws.frame()).code == "bad_frame"          # type: ignore[union-attr]
    assert await ws.close_code() == 4000


async def test_server_names_an_anonymous_client(raw: Any, served: Served) -> None:
    ws = await raw(served.port, hello=False)
    await ws.send(_frames.Hello())
    welcome = await ws.frame()
    assert isinstance(welcome, _frames.Welcome)
    assert welcome.client.startswith("anon-") and welcome.heartbeat == 25
    assert welcome.max_message == WsConfig().max_message


# ---------------------------------------------------------------- bad input

BAD_FRAMES: list[tuple[bytes, str, str | None, int | None]] = [
    (b"\xc1garbage", "bad_frame", None, None),
    (msgpack.packb([1, 2]), "bad_frame", None, None),
    (msgpack.packb({"t": "nope", "s": "a", "id": 4}), "bad_frame", "a", 4),
    (msgpack.packb({"t": "publish", "s": "a", "id": 5, "r": ["text"]}), "bad_frame", "a", 5),
    (msgpack.packb({"t": "attach", "s": "a", "id": 6, "offset": "yesterday"}), "bad_offset",
     "a", 6),
    (msgpack.packb({"t": "attach", "s": "a", "id": 7, "kinds": [64]}), "bad_frame", "a", 7),
    (msgpack.packb({"t": "ack", "s": "a", "id": 8, "offset": 0, "count": 1}), "bad_frame",
     None, None),                                     # a server frame, sent by a client
]


async def test_bad_frames_get_errors_and_the_connection_carries_on(raw: Any, served: Served) -> None:
    ws = await raw(served.port)
    for body, code, session, request_id in BAD_FRAMES:
        await ws.send_message(body)
        err = await ws.frame()
        assert isinstance(err, _frames.Error), err
        assert (err.code, err.session) == (code, session), err
        if request_id is not None:
            assert err.id == request_id
    await ws.send(_frames.Publish(9, "a", (b"still fine",), create=True))
    ack = await ws.frame()
    assert isinstance(ack, _frames.Ack) and ack.offset == 0


@pytest.mark.parametrize("send,code", [
    (lambda ws: ws.send_message(b"{}", _core.OP_TEXT), 1003),
    (lambda ws: ws.send_raw(b"\x82\x05hello"), 1002),                  # unmasked
    (lambda ws: ws.send_raw(b"\xf2\x80" + os.urandom(4)), 1002),       # reserved bits
    (lambda ws: ws.send_message(b"x" * (70 * 1024)), 1009),            # over max_message
])
async def test_broken_websocket_framing_closes_that_connection_only(raw: Any, 
        tmp_path: Path, send: Any, code: int) -> None:
    async with serve_in_process(tmp_path, WsConfig(max_message=64 * 1024)) as s:
        async with client.open_connection(s.ws_url, client_id="bystander") as other:
            await other.publish("s", [b"before"], create=True)
            ws = await raw(s.port)
            await send(ws)
            assert await ws.close_code() == code
            assert (await other.publish("s", [b"after"])).offset == 1


async def test_errors_for_sessions_and_requests(served: Served) -> None:
    async with client.open_connection(served.ws_url) as c:
        with pytest.raises(client.ClientError) as e:
            await c.attach("missing", offset=0)
        assert e.value.code == "session_not_found"
        with pytest.raises(client.ClientError) as e:
            await c.publish("missing", [b"x"])
        assert e.value.code == "session_not_found"
        await c.publish("s", [b"a", b"b"], create=True)
        with pytest.raises(client.ClientError) as e:
            await c.attach("s", offset=3)
        assert e.value.code == "offset_out_of_range"
        await c.attach("s", offset="now")
        with pytest.raises(client.ClientError) as e:
            await c.attach("s")
        assert e.value.code == "already_attached"
        with pytest.raises(client.ClientError) as e:
            await c.publish("s", [b"x"] * 10_001)
        assert e.value.code == "batch_too_large"
        await served.broker.close_session("s")
        with pytest.raises(client.ClientError) as e:
            await c.publish("s", [b"x"])
        assert e.value.code == "session_closed"


# ---------------------------------------------------------------- publish and attach

async def test_publish_attach_multiplexed(served: Served) -> None:
    async with client.open_connection(served.ws_url, client_id="agent") as c:
        for name in ("a", "b"):
            ack = await c.publish(name, [b"%s%d" % (name.encode(), i) for i in range(3)],
                                  meta=[None, {"i": 1}, None], create=True)
            assert (ack.offset, ack.count) == (0, 3)
        subs = [await c.attach(name, offset=-1) for name in ("a", "b")]
        for sub, name in zip(subs, ("a", "b")):
            data = await sub.next_frame()
            assert isinstance(data, _frames.Data)
            assert [(r.offset, r.payload, r.publisher, r.meta) for r in data.records] == [
                (i, b"%s%d" % (name.encode(), i), "agent", {"i": 1} if i == 1 else None)
                for i in range(3)]
            assert await sub.next_frame() == _frames.UpToDate(name, 3)
        await c.publish("b", [b"live"])
        live = await subs[1].next_frame()
        assert isinstance(live, _frames.Data) and live.records[0].offset == 3
        await subs[0].detach()
        with pytest.raises(client.ClientError) as e:
            await subs[0].detach()
        assert e.value.code == "not_attached"


async def test_idempotent_producer_over_websocket(served: Served) -> None:
    async with client.open_connection(served.ws_url) as c:
        first = await c.publish("s", [b"a", b"b"], producer=("p", 0, 0), create=True)
        assert (first.offset, first.count, first.dup) == (0, 2, False)
        again = await c.publish("s", [b"a", b"b"], producer=("p", 0, 0))
        # A retry is a duplicate, answered with where the original landed.
        assert (again.dup, again.offset, again.count) == (True, 0, 2)
        with pytest.raises(client.ClientError) as e:
            await c.publish("s", [b"x"], producer=("p", 0, 5))
        assert e.value.code == "producer_sequence_gap"
        assert (await c.publish("s", [b"c"], producer=("p", 1, 0))).offset == 2
        with pytest.raises(client.ClientError) as e:
            await c.publish("s", [b"x"], producer=("p", 0, 1))
        assert e.value.code == "stale_producer_epoch"
    assert (await served.broker.read("s")).payloads() == [b"a", b"b", b"c"]


async def test_a_retry_after_a_restart_is_a_duplicate_with_its_offsets(tmp_path: Path) -> None:
    # The producer table and where its recent appends landed are rebuilt from
    # the log (the append-start flag and the stamp), so the retry is recognised
    # and answered with the original's offsets.
    for restart in (False, True):
        async with serve_in_process(tmp_path / "data") as s, \
                client.open_connection(s.ws_url, client_id="agent") as c:
            ack = await c.publish("s", [b"a"], producer=("p", 0, 0), create=not restart)
            assert ack.dup is restart
            assert (ack.offset, ack.count) == (0, 1)
            assert (await s.broker.read("s")).payloads() == [b"a"]


async def test_pipelined_publishes_ack_in_order(raw: Any, served: Served) -> None:
    ws = await raw(served.port)
    await ws.send(_frames.Publish(0, "s", (b"first",), create=True))
    await ws.frame()
    n = 500
    await ws.send_raw(b"".join(
        _core.build_frame(_core.OP_BINARY, _frames.encode(
            _frames.Publish(i, "s", (b"%d" % i,) * 2)), mask=os.urandom(4))
        for i in range(1, n + 1)))
    acks = [await ws.frame() for _ in range(n)]
    assert [(a.id, a.offset) for a in acks] == [            # type: ignore[union-attr]
        (i, 1 + 2 * (i - 1)) for i in range(1, n + 1)]


async def test_subscribers_at_the_tail_share_one_frame(raw: Any, served: Served) -> None:
    async with client.open_connection(served.ws_url) as pub:
        await pub.publish("s", [b"x"], create=True)
        readers = [await raw(served.port) for _ in range(3)]
        for i, ws in enumerate(readers):
            await ws.send(_frames.Attach(i, "s", offset=1))
            assert isinstance(await ws.frame(), _frames.Attached)
            assert isinstance(await ws.frame(), _frames.UpToDate)
        await pub.publish("s", [b"y", b"z"])
        frames = [await ws.message() for ws in readers]
        assert frames[0] == frames[1] == frames[2]
        fan = served.server.ws._fanouts["s"]
        assert fan.users == 3 and len(fan.frames) == 1      # built once, sent three times


# ---------------------------------------------------------------- heartbeats

async def test_heartbeat_pings_and_drops_a_silent_peer(raw: Any, 
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    async with serve_in_process(tmp_path, WsConfig(heartbeat_s=25)) as s:
        answering = await raw(s.port, client="answers")
        silent = await raw(s.port, client="silent")
        for _ in range(3):
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(25)
            ping = await answering.frame()
            assert isinstance(ping, _frames.Ping) and ping.id is not None
            await answering.send(_frames.Pong(ping.id))
            if _ == 0:
                assert isinstance(await silent.frame(), _frames.Ping)
        assert await silent.close_code() == 4008
        await answering.send(_frames.Ping(77))
        assert await answering.frame() == _frames.Pong(77)


async def test_websocket_level_ping_gets_a_pong(raw: Any, served: Served) -> None:
    ws = await raw(served.port)
    await ws.send_message(b"are you there", _core.OP_PING)
    assert await ws.message() == (_core.OP_PONG, b"are you there")
    await ws.send_message(_core.close_payload(1000, "bye"), _core.OP_CLOSE)
    assert await ws.close_code() == 1000


async def test_client_offset_moves_per_record_not_per_frame(served: Served) -> None:
    async with client.open_connection(served.ws_url) as c:
        await c.publish("s", [b"a", b"b", b"c"], create=True)
        sub = await c.attach("s", offset=-1)
        async for record in sub:
            if record.offset == 1:
                break                       # the frame held all three
        assert sub.offset == 2
        again = await c.attach("t", offset=-1, create=True)
        assert again.offset == 0

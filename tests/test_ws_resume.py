"""Resuming WebSocket subscriptions (docs/protocol.md, "WebSocket protocol").

A subscriber is cut off at random points, even inside a frame, while an agent
keeps publishing; it comes back with its offset and epoch and must get exactly
what it missed.  Around that: epochs across delete and re-create, slow readers
and credit, the same records over HTTP, and signals sent while an agent was
away.  Every test runs a real server in this process on 127.0.0.1 with a
random port and a temporary data dir (conftest.serve_in_process); the heavy
ones use ``Raw``, a client on a bare socket, so a cut costs one round trip.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import random
import socket
import struct
import sys
import warnings
from collections import deque
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio
import trio.testing

from broker import _core, _frames
from broker._frames import Ack, Attach, Attached, Data, Event, Hello, Ping, Pong, Publish, UpToDate
from broker._handshake import check_server_response, client_request
from broker._ws import WsConfig
from broker.client import Attachment, ClientError, Record, SessionEnded, open_connection
from conftest import Served, serve_in_process


def payload(offset: int) -> bytes:
    return b"%07d" % offset


def http_offset(offset: int) -> str:
    return "0000000000000000_%016d" % offset


# ------------------------------------------------------------------ a raw client

_open: set[Raw] = set()


@pytest.fixture(autouse=True)
async def _close_raw_sockets() -> AsyncIterator[None]:
    try:
        yield
    finally:                # pytest-trio throws a failed test's error in at the yield
        while _open:
            _open.pop().stream.socket.close()


_failed = False        # a test here failed: from then on, collect garbage around each test


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """A test that fails with the server crashed leaves sockets behind, which
    pytest holds on to for a while (sys.last_value, for one): once a test has
    failed, collect quietly around every test rather than let their warnings
    fail whichever test runs next."""
    global _failed
    if _failed:
        quiet_collect()
    yield
    if hasattr(sys, "last_value"):
        del sys.last_type, sys.last_value, sys.last_traceback
        _failed = True
    if _failed:
        quiet_collect()


def quiet_collect() -> None:
    """gc.collect(), without the warnings of sockets a failed test left behind."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


class Raw:
    """A WebSocket client on a bare TCP socket (_handshake + _core.FrameParser).

    ``open`` sends the upgrade and the first frames in one write; ``feed``
    takes the server's bytes (the 101 first), so a test decides exactly how
    many bytes a connection gets to see before it is cut."""

    def __init__(self, stream: trio.SocketStream, key: str) -> None:
        self.stream = stream
        self.key = key
        self.head: bytes | None = b""          # None once the 101 has been read
        self.parser = _core.FrameParser(True, 1 << 26)
        self.frames: deque[_frames.Frame] = deque()

    @classmethod
    async def open(cls, port: int, *frames: _frames.Frame, rcvbuf: int | None = None) -> Raw:
        sock = trio.socket.socket()
        if rcvbuf is not None:         # a fixed buffer: no autotuning for a reader that stalls
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            await sock.connect(("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        request, key = client_request(f"127.0.0.1:{port}")
        ws = cls(trio.SocketStream(sock), key)
        _open.add(ws)
        await ws.stream.send_all(request + b"".join(map(masked, frames)))
        return ws

    def feed(self, data: bytes) -> None:
        if self.head is not None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            check_server_response(head, self.key)
            self.head = None
        for op, body in self.parser.feed(data):
            assert op == _core.OP_BINARY, (op, body)
            self.frames.append(_frames.decode(body))
        assert self.parser.error is None, self.parser.error

    async def send(self, *frames: _frames.Frame) -> None:
        await self.stream.send_all(b"".join(map(masked, frames)))

    async def frame(self) -> _frames.Frame:
        while not self.frames:
            data = await self.stream.receive_some(1 << 16)
            assert data, "the server closed the connection"
            self.feed(data)
        return self.frames.popleft()

    async def until_pong(self, ping_id: int) -> list[_frames.Frame]:
        """Ping, and the frames that arrive before the pong."""
        await self.send(Ping(ping_id))
        seen = []
        while (frame := await self.frame()) != Pong(ping_id):
            seen.append(frame)
        return seen

    async def cut(self, how: str) -> None:
        """Drop the connection without a closing handshake."""
        sock = self.stream.socket
        if how == "rst":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif how == "eof":             # half-close, then wait for the server to hang up
            sock.shutdown(socket.SHUT_WR)
            while await self.stream.receive_some(1 << 16):
                pass
        _open.discard(self)
        await self.stream.aclose()


def masked(frame: _frames.Frame) -> bytes:
    return _core.build_frame(_core.OP_BINARY, _frames.encode(frame), mask=os.urandom(4))


class Reader:
    """What one subscriber has read of a session whose record i is payload(i):
    every frame is checked as it comes, across any number of connections."""

    def __init__(self, payload_of: Any = payload) -> None:
        self.next = 0
        self.epoch: int | None = None
        self.payload_of = payload_of

    def see(self, frame: _frames.Frame) -> None:
        if isinstance(frame, Data):
            for r in frame.records:            # no gap, no duplicate, in order
                assert (r.offset, r.kind, r.payload) == (self.next, 0,
                                                         self.payload_of(self.next))
                self.next += 1
        elif isinstance(frame, Attached):
            assert frame.offset == self.next and frame.next >= self.next
            assert self.epoch in (None, frame.epoch)
            self.epoch = frame.epoch
        elif isinstance(frame, UpToDate):
            assert frame.next == self.next
        else:
            assert isinstance(frame, (_frames.Welcome, Ping)), frame


class Agent:
    """A publisher on a Raw connection: publishes of 1..8 records of payload(i),
    pipelined up to ``window`` deep; checks every ack (in order, right offsets)."""

    def __init__(self, ws: Raw, session: str, window: int) -> None:
        self.ws = ws
        self.session = session
        self.window = trio.Semaphore(window)
        self.size = window
        self.ids = itertools.count(1)
        self.sent: deque[tuple[int, int, int]] = deque()    # (id, offset, count)
        self.offset = 0                                     # of the next record to publish
        self.acked = 0

    @classmethod
    async def open(cls, port: int, session: str = "s", window: int = 32) -> Agent:
        return cls(await Raw.open(port, Hello("agent")), session, window)

    async def publish_all(self, upto: int, rng: random.Random, make: Any = payload,
                          most: int = 8) -> None:
        """Publish records up to offset ``upto``; return once all are acked."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._acks)
            while self.offset < upto:
                count = min(rng.randint(1, most), upto - self.offset)
                await self.window.acquire()
                rid, first = next(self.ids), self.offset
                self.sent.append((rid, first, count))
                self.offset += count
                await self.ws.send(Publish(rid, self.session,
                                           tuple(make(i) for i in range(first, first + count))))
            for _ in range(self.size):                  # every ack is in
                await self.window.acquire()
            for _ in range(self.size):
                self.window.release()
            nursery.cancel_scope.cancel()

    async def _acks(self) -> None:
        while True:
            frame = await self.ws.frame()
            if isinstance(frame, (_frames.Welcome, Ping)):
                continue
            rid, offset, count = self.sent.popleft()
            assert frame == Ack(rid, self.session, offset, count)
            self.acked = offset + count
            self.window.release()


async def settled(served: Served, connections: int = 0) -> None:
    """Wait until the server holds ``connections`` connections and the
    sessions' cursors and watchers are back to what those hold."""
    ws = served.server.ws
    with trio.fail_after(10):
        while ws.connections > connections:
            await trio.testing.wait_all_tasks_blocked(0.001)
    if connections == 0:
        for actor in served.broker._actors.values():
            assert (actor.readers, actor.watchers) == (0, set())
        assert ws._fanouts == {}


# ------------------------------------------------------------------ resuming

def budget(rng: random.Random) -> int:
    """How many bytes a connection sees before it is cut: inside the 101, the
    welcome or attached, the first data frame, or some way into the stream."""
    return rng.choice([rng.randrange(0, 300), rng.randrange(300, 1500),
                       rng.randrange(1500, 5000)])


@pytest.mark.parametrize("how", ["close", "rst", "eof"])
async def test_resume_at_random_cuts(tmp_path: Path, how: str) -> None:
    """An agent publishes 30,000 records; the subscriber is cut about a thousand
    times at random byte positions and resumes each time from its offset."""
    total = 30_000
    rng = random.Random(f"cuts-{how}")
    reader = Reader()
    cuts = inside = 0                       # inside: cuts within a frame or the 101
    # A small ring, segments and batches: resumes read from the ring and from
    # disk, across segments, and a cut lands in a different frame every time.
    async with serve_in_process(tmp_path / "data", ring_bytes=16 * 1024,
                                segment_bytes=128 * 1024, max_batch_records=32) as served:
        await served.broker.create("s")
        agent = await Agent.open(served.port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.publish_all, total, rng)
            while reader.next < total:
                ws = await Raw.open(served.port, Hello("sub"),
                                    Attach(1, "s", reader.next, reader.epoch))
                left = budget(rng)
                while left > 0 and reader.next < total:
                    data = await ws.stream.receive_some(1 << 16)
                    assert data
                    ws.feed(data[:left])
                    left -= len(data)
                    while ws.frames:
                        reader.see(ws.frames.popleft())
                inside += ws.parser.buffered > 0 or ws.head is not None
                await ws.cut(how)
                cuts += 1
        assert agent.acked == total and reader.next == total
        await agent.ws.cut("close")
        await settled(served)
    print(f"{cuts} cuts, {inside} inside a frame")
    assert cuts >= 500 and inside >= cuts // 4, (cuts, inside)


@pytest.mark.parametrize("seed", range(3))
async def test_resume_client_after_cancel(served: Served, seed: int) -> None:
    """broker.client.open_connection: the subscriber cancels its connection
    after a random number of records (which takes effect when it next waits
    for a frame) and resumes with Attachment.offset and .epoch."""
    total = 3000
    rng = random.Random(seed)
    await served.broker.create("s")
    agent = await Agent.open(served.port)
    seen: list[int] = []
    offset: int | str = "-1"
    epoch = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.publish_all, total, rng)
        while len(seen) < total:
            want = rng.randrange(0, 100)
            with trio.CancelScope() as cut:
                async with open_connection(served.ws_url, client_id="sub") as c:
                    sub = await c.attach("s", offset, epoch=epoch)
                    assert epoch in (None, sub.epoch)
                    if want == 0:
                        cut.cancel()
                    async for record in sub:
                        seen.append(record.offset)
                        assert record.payload == payload(record.offset)
                        if len(seen) == total or (want := want - 1) == 0:
                            cut.cancel()
            offset, epoch = sub.offset, sub.epoch
    assert seen == list(range(total))
    await agent.ws.cut("close")
    await settled(served)


async def test_client_outlives_heartbeats(tmp_path: Path) -> None:
    """broker.client.open_connection answers the server's pings, so a
    subscription lasts past any number of heartbeat intervals (time passes for
    real: heartbeats are the server's clock)."""
    async with serve_in_process(tmp_path / "data", ws=WsConfig(heartbeat_s=0.05)) as served, \
            open_connection(served.ws_url, client_id="sub") as c:
        await c.publish("s", [payload(0)], create=True)
        sub = await c.attach("s", 0)
        for i in range(1, 5):
            await trio.sleep(0.12)                     # two pings or so
            await c.publish("s", [payload(i)])
        assert [(r.offset, r.payload) for r in await next_records(sub, 5)] == [
            (i, payload(i)) for i in range(5)]


@pytest.mark.parametrize("count, gets", [(0, 1), (5, 1), (1024, 1), (1025, 1), (3000, 2),
                                         (3000, 3)])
async def test_resume_from_http_offset(served: Served, count: int, gets: int) -> None:
    """Read over HTTP, go on over WebSocket from the Stream-Next-Offset string."""
    async with open_connection(served.ws_url, client_id="agent") as c, \
            httpx.AsyncClient(base_url=served.http_url) as http:
        await c.publish("s", [b"-"], create=True)       # offset 0, then payload(i) at i
        for start in range(1, count, 500):
            await c.publish("s", [payload(i) for i in range(start, min(count, start + 500))])
        end = max(count, 1)
        offset, body = "-1", b""
        for _ in range(gets):
            r = await http.get("/v1/stream/s", params={"offset": offset})
            assert r.status_code == 200
            body += r.content
            offset = r.headers["stream-next-offset"]
        n = int(offset.split("_")[1])
        assert body == b"-" + b"".join(payload(i) for i in range(1, n))
        sub = await c.attach("s", offset)
        await c.publish("s", [payload(i) for i in range(end, end + 10)])
        reader = Reader(lambda i: b"-" if i == 0 else payload(i))
        reader.next = n
        while reader.next < end + 10:
            frame = await sub.next_frame()
            reader.see(frame)
            assert not isinstance(frame, Attached)
        assert sub.offset == end + 10


# ------------------------------------------------------------------ epochs

async def recreate(served: Served, http: httpx.AsyncClient, via: str) -> None:
    if via == "http":
        assert (await http.put("/v1/stream/s")).status_code == 201
    else:
        await served.broker.create("s")


@pytest.mark.parametrize("via", ["http", "broker"])
@pytest.mark.parametrize("again", [None, 0, 2, 9])
async def test_reattach_after_delete(served: Served, via: str, again: int | None) -> None:
    """Back with an epoch the session no longer has: ``epoch_changed`` with the
    new one if it was re-created (with ``again`` records), else ``deleted``."""
    async with httpx.AsyncClient(base_url=served.http_url) as http:
        async with open_connection(served.ws_url, client_id="c") as c:
            await c.publish("s", [b"a", b"b", b"c"], create=True)
            sub = await c.attach("s", -1)
            while not isinstance(await sub.next_frame(), UpToDate):
                pass
            epoch, offset = sub.epoch, sub.offset
        assert offset == 3
        if via == "http":
            assert (await http.delete("/v1/stream/s")).status_code == 204
        else:
            await served.broker.delete("s")
        if again is not None:
            await recreate(served, http, via)
            if again:
                await served.broker.publish("s", [b"x%d" % i for i in range(again)])
        async with open_connection(served.ws_url, client_id="c") as c:
            with pytest.raises(SessionEnded) as ended:
                await c.attach("s", offset, epoch=epoch)
            if again is None:
                assert (ended.value.event, ended.value.epoch) == ("deleted", None)
                return
            assert ended.value.event == "epoch_changed"
            fresh = await c.attach("s", -1)
            assert ended.value.epoch == fresh.epoch != epoch
            records = await frames_until_up_to_date(fresh)
            assert [r.payload for r in records] == [b"x%d" % i for i in range(again)]


@pytest.mark.parametrize("via", ["http", "broker"])
async def test_attached_client_sees_delete(served: Served, via: str) -> None:
    async with httpx.AsyncClient(base_url=served.http_url) as http, \
            open_connection(served.ws_url) as c:
        await c.publish("s", [b"a"], create=True)
        sub = await c.attach("s", -1)
        assert isinstance(await sub.next_frame(), Data)
        assert isinstance(await sub.next_frame(), UpToDate)
        if via == "http":
            assert (await http.delete("/v1/stream/s")).status_code == 204
        else:
            await served.broker.delete("s")
        assert await sub.next_frame() == Event("s", "deleted")


async def backlog(served: Served, records: int, size: int = 64 * 1024) -> None:
    """``records`` records of ``size`` bytes, record i filled with i."""
    for start in range(0, records, 16):
        await served.broker.publish("s", [big(i, size) for i in range(start, start + 16)])


def big(offset: int, size: int = 64 * 1024) -> bytes:
    return offset.to_bytes(8, "little") * (size // 8)


async def stalled(served: Served, client: str) -> Any:
    """The server side of ``client``'s connection, once its writer is stuck in a
    send the client does not read."""
    await trio.testing.wait_all_tasks_blocked(0.05)
    (conn,) = [c for c in served.server.ws._conns if c.client == client]
    return conn


async def test_stalled_subscriber_sees_epoch_changed(served: Served) -> None:
    """A subscriber whose writer is stuck mid-catch-up while its session is
    deleted and re-created gets ``epoch_changed`` with the new epoch, and never
    a record of the new session."""
    first, _ = await served.broker.create("s")
    await backlog(served, 256)                             # 16 MiB
    ws = await Raw.open(served.port, Hello("slow"), Attach(1, "s", 0), rcvbuf=4096)
    conn = await stalled(served, "slow")
    behind = conn.subs["s"].cursor.offset
    assert behind < 128, "the backlog did not fill the socket buffers"
    await served.broker.delete("s")
    second, _ = await served.broker.create("s")
    await served.broker.publish("s", [b"new"])
    reader = Reader(big)
    while not isinstance(frame := await ws.frame(), Event):
        reader.see(frame)
    assert reader.epoch == first.epoch and behind <= reader.next < 256
    assert frame == Event("s", "epoch_changed", second.epoch)
    assert second.epoch != first.epoch
    assert await ws.until_pong(1) == []                     # the subscription is over


# ------------------------------------------------------------------ slow readers

async def test_stalled_reader_holds_nothing_back(tmp_path: Path) -> None:
    """100 MiB to four subscribers, one of which never reads: the others get
    it all, exactly once and in order, the publisher gets every ack, and the
    server neither queues for the stalled one nor grows with the backlog."""
    size, records, warm = 64 * 1024, 1600, 64
    volume = size * records
    proc = psutil.Process()
    peak = 0

    def sample() -> None:
        nonlocal peak
        peak = max(peak, proc.memory_info().rss)

    def make(i: int) -> bytes:
        sample()
        return big(i, size)

    async def read(ws: Raw, reader: Reader, upto: int) -> None:
        while reader.next < upto:
            reader.see(await ws.frame())
            sample()

    async with serve_in_process(tmp_path / "data") as served:
        await served.broker.create("s")
        slow = await Raw.open(served.port, Hello("slow"), Attach(1, "s", 0), rcvbuf=4096)
        fast = {await Raw.open(served.port, Hello(f"fast{i}"), Attach(1, "s", 0)): Reader(big)
                for i in range(3)}
        agent = await Agent.open(served.port, window=8)
        rng = random.Random(0)
        await agent.publish_all(warm, rng, make, most=15)   # every buffer has been used once
        for ws, reader in fast.items():
            await read(ws, reader, warm)
        quiet_collect()
        peak = base = proc.memory_info().rss
        async with trio.open_nursery() as nursery:
            for ws, reader in fast.items():
                nursery.start_soon(read, ws, reader, records)
            await agent.publish_all(records, rng, make, most=15)
        assert agent.acked == records
        conn = await stalled(served, "slow")
        assert sum(map(len, conn.out)) < 64 * 1024 and len(conn.ready) <= 1
        assert conn.subs["s"].cursor.offset * size < volume // 8
        growth = peak - base
        print(f"RSS growth {growth / 2**20:.1f} MiB for {volume / 2**20:.0f} MiB published")
        assert growth < volume // 4, f"RSS grew by {growth / 2**20:.1f} MiB"
        # Back from its stall, it reads everything, from disk.
        await read(slow, Reader(big), records)


@pytest.mark.parametrize("grants", [[10, 5, 100], [1, 1, 1, 2, 100], [49, 1, 1], [50, 1],
                                    [1000]])
async def test_credit_window(served: Served, grants: list[int]) -> None:
    """Attached with credit, a subscriber gets exactly that many records and
    no more, even as records keep coming, until a ``credit`` frame grants more."""
    end = 50
    await served.broker.create("s")
    await served.broker.publish("s", [payload(i) for i in range(end)])
    ws = await Raw.open(served.port, Hello("c"), Attach(1, "s", 0, credit=grants[0]))
    reader = Reader()
    ping = 0
    for i, grant in enumerate(grants):
        if i:
            await ws.send(_frames.Credit("s", grant))
        limit = reader.next + grant                     # where this credit runs out
        while reader.next < min(limit, end):
            reader.see(await ws.frame())
        await served.broker.publish("s", [payload(end)])
        end += 1
        if limit >= end:
            while reader.next < end:
                reader.see(await ws.frame())
            continue
        # Out of credit: two round trips see the end of any round the writer had begun.
        for _ in range(2):
            ping += 1
            frames = await ws.until_pong(ping)
            assert [f for f in frames if isinstance(f, Data)] == []
            for f in frames:
                reader.see(f)
    assert reader.next == min(sum(grants), end)


# ------------------------------------------------------------------ across transports

async def next_records(sub: Attachment, n: int) -> list[Record]:
    """The next ``n`` records of ``sub``, whatever up_to_date frames come between."""
    got: list[Record] = []
    while len(got) < n:
        frame = await sub.next_frame()
        assert isinstance(frame, (Data, UpToDate)), frame
        if isinstance(frame, Data):
            got += frame.records
    assert len(got) == n
    return got


async def frames_until_up_to_date(sub: Attachment) -> list[Record]:
    records: list[Record] = []
    while not isinstance(frame := await sub.next_frame(), UpToDate):
        assert isinstance(frame, Data), frame
        records += frame.records
    return records


@pytest.mark.parametrize("publishes", [1, 2, 7, 100])
async def test_ws_records_read_over_http(served: Served, publishes: int) -> None:
    """Records published over WebSocket, of any kind, are the same payloads at
    the same offsets over HTTP: each ack's offset, as an HTTP offset, reads
    from that publish's first record on."""
    payloads = [b"%d," % i * (i % 4) for i in range(300)]
    cuts = sorted(random.Random(publishes).sample(range(1, 300), publishes - 1))
    batches = [payloads[a:b] for a, b in zip([0, *cuts], [*cuts, 300])]
    async with open_connection(served.ws_url, client_id="agent") as c, \
            httpx.AsyncClient(base_url=served.http_url) as http:
        acks = [await c.publish("s", batch, kind=i % 3, create=True)
                for i, batch in enumerate(batches)]
        sig = await c.signal("s", b"stop")
        assert [(a.offset, a.count) for a in acks] == [(a, b - a) for a, b in
                                                        zip([0, *cuts], [*cuts, 300])]
        assert (sig.offset, sig.count) == (300, 1)
        for start in [0, *cuts, 300]:
            r = await http.get("/v1/stream/s", params={"offset": http_offset(start)})
            assert r.status_code == 200
            assert r.content == b"".join(payloads[start:]) + b"stop"
            assert r.headers["stream-next-offset"] == http_offset(301)


def strict_json(text: bytes) -> Any:
    """RFC 8259 JSON: no NaN or Infinity, UTF-8 without a byte order mark."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")
    return json.loads(text.decode("utf-8"), parse_constant=refuse)


JSON_VALUES = [b'{"a":1}', b'{"b": [1, 2.5, null]}', b"[1,2]", b'"x"', b"null", b"-3.5e2",
               b"true", '"é"'.encode()]


async def test_json_session_across_transports(served: Served) -> None:
    """A JSON session made over HTTP takes JSON payloads over WebSocket, one
    record each, and HTTP reads them back as one JSON array; what HTTP appends
    arrives over WebSocket as compact JSON text."""
    async with open_connection(served.ws_url, client_id="agent") as c, \
            httpx.AsyncClient(base_url=served.http_url) as http:
        r = await http.put("/v1/stream/j", headers={"content-type": "application/json"})
        assert r.status_code == 201
        ack = await c.publish("j", JSON_VALUES)
        assert (ack.offset, ack.count) == (0, len(JSON_VALUES))
        r = await http.get("/v1/stream/j", params={"offset": "-1"})
        assert r.headers["content-type"].startswith("application/json")
        assert strict_json(r.content) == [strict_json(v) for v in JSON_VALUES]
        r = await http.get("/v1/stream/j", params={"offset": http_offset(2)})
        assert strict_json(r.content) == [strict_json(v) for v in JSON_VALUES[2:]]
        r = await http.post("/v1/stream/j", content=b'[{"c": 2}, [3]]',
                            headers={"content-type": "application/json"})
        assert r.status_code == 204
        sub = await c.attach("j", len(JSON_VALUES))
        records = await frames_until_up_to_date(sub)
        assert [(r.offset, r.kind, r.payload, r.publisher, r.meta, r.producer)
                for r in records] == [(8, 0, b'{"c":2}', None, None, None),
                                      (9, 0, b"[3]", None, None, None)]


@pytest.mark.parametrize("bad", [b"not json", b"", b"{", b"1 2", b"\xff", b"'x'",
                                 b"NaN", b"Infinity", b"-Infinity", b"[NaN]",
                                 b"\xef\xbb\xbf1", '"a"'.encode("utf-16"),
                                 '"a"'.encode("utf-16-le"), '"a"'.encode("utf-32"),
                                 b'"\\ud800"'])
async def test_json_session_refuses_other_payloads(served: Served, bad: bytes) -> None:
    """A publish with any payload that is not one JSON value in UTF-8 is
    refused whole with ``bad_payload``, and the connection carries on."""
    async with open_connection(served.ws_url, client_id="agent") as c, \
            httpx.AsyncClient(base_url=served.http_url) as http:
        r = await http.put("/v1/stream/j", headers={"content-type": "application/json"})
        assert r.status_code == 201
        with pytest.raises(ClientError) as refused:
            await c.publish("j", [b"1", bad])
        assert (refused.value.code, refused.value.session) == ("bad_payload", "j")
        ack = await c.publish("j", [b"2"])
        assert (ack.offset, ack.count) == (0, 1)
        r = await http.get("/v1/stream/j", params={"offset": "-1"})
        assert strict_json(r.content) == [2]


@pytest.mark.parametrize("bodies", [[b"a"], [b"one", b"", b"three" * 1000], [bytes(range(256))]])
async def test_http_appends_arrive_over_ws(served: Served, bodies: list[bytes]) -> None:
    """Each HTTP POST is one record over WebSocket: kind 0, no header, at the
    offset HTTP gave it, to a subscriber attached live or from an HTTP offset."""
    async with open_connection(served.ws_url, client_id="reader") as c, \
            httpx.AsyncClient(base_url=served.http_url) as http:
        r = await http.put("/v1/stream/h", headers={"content-type": "application/octet-stream"})
        assert r.status_code == 201
        live = await c.attach("h", "now")
        offsets = []
        for body in bodies:
            if not body:
                continue                # an empty POST is a 400: nothing to append
            r = await http.post("/v1/stream/h", content=body,
                                headers={"content-type": "application/octet-stream"})
            assert r.status_code == 204
            offsets.append(int(r.headers["stream-next-offset"].split("_")[1]) - 1)
        sent = [b for b in bodies if b]
        assert offsets == list(range(len(sent)))
        got = await next_records(live, len(sent))
        assert [(r.offset, r.kind, r.payload) for r in got] == list(zip(offsets, [0] * 9, sent))
        assert {(r.publisher, r.meta, r.producer) for r in got} == {(None, None, None)}
        async with open_connection(served.ws_url) as c2:
            again = await c2.attach("h", http_offset(0))
            assert await frames_until_up_to_date(again) == got


# ------------------------------------------------------------------ signals

@pytest.mark.parametrize("away", [[b"cancel"], [b"cancel", b"approve"]])
@pytest.mark.parametrize("chatter", [0, 1, 50])
async def test_signal_sent_while_agent_away(served: Served, away: list[bytes],
                                            chatter: int) -> None:
    """An agent that listens for signals only gets each signal exactly once:
    those sent while it was away when it re-attaches from its offset, and none
    of them again from the offset after that."""
    messages = [b"m%d" % i for i in range(chatter)]
    async with open_connection(served.ws_url, client_id="user") as user:
        await user.publish("chat", [b"hello", *messages], create=True)
        async with open_connection(served.ws_url, client_id="agent") as agent:
            sub = await agent.attach("chat", -1, kinds=[1])
            await user.publish("chat", messages or [b"more"])
            ack = await user.signal("chat", b"approve", meta={"by": "user"})
            await user.publish("chat", messages or [b"more"])
            signals = await next_records(sub, 1)
            assert [(r.offset, r.kind, r.payload, r.publisher, r.meta) for r in signals] == [
                (ack.offset, 1, b"approve", "user", {"by": "user"})]
            offset, epoch = sub.offset, sub.epoch
        assert offset == signals[0].offset + 1
        sent = []
        for payload_ in away:                    # the agent is away
            await user.publish("chat", messages or [b"more"])
            sent.append((await user.signal("chat", payload_)).offset)
        await user.publish("chat", messages or [b"more"])
        async with open_connection(served.ws_url, client_id="agent") as agent:
            sub = await agent.attach("chat", offset, epoch=epoch, kinds=[1])
            got = await frames_until_up_to_date(sub)
            assert [(r.offset, r.kind, r.payload) for r in got] == list(zip(sent, [1] * 9, away))
            offset = sub.offset
        end = (await served.broker.info("chat")).next_offset
        assert offset == end                     # up_to_date moved past the messages
        async with open_connection(served.ws_url, client_id="agent") as agent:
            sub = await agent.attach("chat", offset, epoch=epoch, kinds=[1])
            assert await frames_until_up_to_date(sub) == []
            await user.signal("chat", b"later")
            assert [r.payload for r in await next_records(sub, 1)] == [b"later"]


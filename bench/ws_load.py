"""Load generator for W2, W3 and W4 over WebSocket (bench/ws_bench.sh, shared/BENCH.md).

    python bench/ws_load.py w2 URL [--messages N] [--batch B] [--window R] [k=v ...]
    python bench/ws_load.py w3 URL --rate R [--seconds D] [--batch B] [k=v ...]
    python bench/ws_load.py w4 URL [--subs N] [--seconds D] [--batch B] [--half-rate R] [k=v ...]
    python bench/ws_load.py rate RESULTS.jsonl RUN SERVER BATCH   # a W2 rate of that run
    python bench/ws_load.py report RESULTS.jsonl                  # min/median/max, ratios

Each workload prints one JSON line; ``k=v`` arguments are copied into it (a
``kind=...`` replaces the workload's name), so the shell script can tag
results with their run and server.  ``--server-pid`` adds the server's CPU
time over the measured interval (from /proc).

Theory of operation
-------------------
The machine has two cores and the server under test uses one of them, so the
load generator must cost less per message than the server.  It therefore
uses no framework: plain non-blocking sockets on one ``select.epoll`` loop in
one process, the broker's sans-IO handshake helpers (``client_request``,
``check_server_response``), the compiled ``FrameParser(client_side=True)`` to
split the server's frames, and ``build_frame(..., mask=key)`` for the masked
client frames.  Server frames are decoded with plain ``msgpack.unpackb``; the
protocol's validating codec (``_frames.decode``) would build and check a
Record per record, which costs more than the server spends sending it.  A
subscriber that only counts does not even unpack: it reads the record count
and the first offset from the data frame's msgpack header (``_data_head``).

Publishes batch records (``{"t": "publish", "id", "s", "r": [B payloads]}``)
and are pipelined: at most ``--window`` records are sent and not yet acked.
A publish's records all carry one payload of 100 bytes whose first 8 bytes
are ``time.monotonic_ns()`` when the publish was queued for sending.  The
subscribers run in the same process, so their clock is the publisher's, and a
record's latency is the receive time of the socket read that completed its
data frame minus that stamp: publish-to-deliver, including the server's group
commit and the client's own queueing.

* W2: one connection publishes ``--messages`` as fast as the window allows;
  messages/s is messages / (first send to last ack).
* W3: a publisher paced at ``--rate`` and one subscriber (attached at "now"),
  ``--warmup`` s, then latency of every record for ``--seconds``.
* W4: ``--subs`` subscribers and the publisher on one loop.  First the
  publisher goes as fast as the window allows (``--lag`` can also bound how
  far the subscribers may fall behind): deliveries/s is the records received
  by all subscribers per second.  Then it is paced at half of that
  (deliveries/s / subscribers / 2 messages/s, or ``--half-rate``), and the
  latency is taken on every ``--lat-every``-th subscriber.

Pacing: by default one publish of ``B`` records each time ``B`` messages are
due, which is the W2 publisher spaced out; ``--tick-ms`` instead publishes
what is due every tick, in publishes of at most ``B``.

Checks: acks must be contiguous (each ``offset`` is the previous one plus its
``count``), and every subscriber must receive each record once, in order, with
no gap (each data frame starts at the offset after the previous one), and,
after the publisher stops, all of them.  A failure is reported in the row
(``bad_acks``, ``gaps``, ``missing``) rather than ending the run.  Every
connection ends with the WebSocket closing handshake, reading until the
server closes: a socket closed with unread data would send a TCP reset.

Peers: bench/ws_relay_trio.py and bench/ws_relay_websockets.py speak the
subset used here (hello, attach with offset "now", publish, ack, data,
up_to_date) in the same frame shapes, so one tool drives all three servers.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import struct
import sys
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import msgpack

from broker import _core
from broker._handshake import check_server_response, client_request

Row = dict[str, Any]
Msg = dict[str, Any]

PAYLOAD_BYTES = 100
_STAMP = struct.Struct("<q")
_OP_BINARY = _core.OP_BINARY
_unpackb = msgpack.unpackb
_packb = msgpack.packb
_now = time.monotonic_ns


class LoadError(Exception):
    pass


# ---------------------------------------------------------------- one connection

class Conn:
    """A client WebSocket connection on a non-blocking socket.

    ``on_message`` is called with each server message (msgpack bytes); pings
    (WebSocket and protocol level) are answered here.  Outgoing frames are
    queued in ``out`` and written by ``flush``, which asks the loop for
    EPOLLOUT while anything is left.
    """

    __slots__ = ("sock", "fd", "parser", "out", "loop", "on_message", "name", "closed",
                 "closing")

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.parser = _core.FrameParser(client_side=True, max_message=64 << 20)
        self.out = bytearray()
        self.loop: Loop | None = None
        self.on_message: Callable[[bytes, int], None] = _ignore
        self.name = name
        self.closed = False
        self.closing = False           # our close frame is sent: discard what comes

    def send(self, msg: Msg) -> None:
        self.send_body(_packb(msg))

    def send_body(self, body: bytes, op: int = _OP_BINARY) -> None:
        self.out += _core.build_frame(op, body, mask=os.urandom(4))

    def flush(self) -> None:
        out = self.out
        if not out:
            return
        try:
            n = self.sock.send(out)
        except BlockingIOError:
            n = 0
        del out[:n]
        if self.loop is not None:
            self.loop.want_write(self, bool(out))

    def readable(self) -> None:
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return
        if not data:
            self.closed = True
            if self.closing:
                if self.loop is not None:
                    self.loop.remove(self)
                return
            raise LoadError(f"{self.name}: the server closed the connection")
        if self.closing:
            return
        now = _now()
        for op, payload in self.parser.feed(data):
            if op == _OP_BINARY:
                self.on_message(payload, now)
            elif op == _core.OP_PING:
                self.send_body(payload, _core.OP_PONG)
                self.flush()
            elif op == _core.OP_CLOSE:
                self.closed = True
                raise LoadError(f"{self.name}: closed by the server: "
                                f"{_core.parse_close(payload)}")
        if self.parser.error is not None:
            raise LoadError(f"{self.name}: bad framing from the server: {self.parser.error}")


def _ignore(msg: bytes, now: int) -> None:
    pass


def connect_all(host: str, port: int, names: list[str], client_ids: list[str]) -> list[Conn]:
    """Open len(names) connections: all handshakes are sent before any answer
    is read (the server handles them concurrently), then each sends hello and
    gets its welcome.  Blocking until done; the sockets are non-blocking after."""
    socks: list[tuple[socket.socket, str]] = []
    for _ in names:
        s = socket.create_connection((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req, key = client_request(f"{host}:{port}")
        s.sendall(req)
        socks.append((s, key))
    conns = []
    for (s, key), name, client in zip(socks, names, client_ids):
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise LoadError(f"{name}: connection closed during the handshake")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        check_server_response(head, key)
        c = Conn(s, name)
        early = c.parser.feed(rest) if rest else []
        if early:
            raise LoadError(f"{name}: frames before hello: {early!r}")
        c.send({"t": "hello", "client": client})
        s.sendall(c.out)
        c.out.clear()
        conns.append(c)
    for c in conns:
        c.sock.settimeout(30)
        welcome = None
        while welcome is None:
            data = c.sock.recv(65536)
            if not data:
                raise LoadError(f"{c.name}: closed before welcome")
            for op, payload in c.parser.feed(data):
                m = _unpackb(payload) if op == _OP_BINARY else {}
                if m.get("t") == "welcome":
                    welcome = m
                elif m.get("t") == "error":
                    raise LoadError(f"{c.name}: {m}")
        c.sock.setblocking(False)
    return conns


class Loop:
    """epoll over the connections; level-triggered."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.writing: set[int] = set()

    def add(self, conn: Conn) -> None:
        conn.loop = self
        self.conns[conn.fd] = conn
        self.ep.register(conn.fd, select.EPOLLIN)

    def remove(self, conn: Conn) -> None:
        self.ep.unregister(conn.fd)
        del self.conns[conn.fd]
        self.writing.discard(conn.fd)

    def close_all(self, timeout: float = 10.0) -> int:
        """The closing handshake on every connection: send a close frame, then
        read and discard until the server closes.  A socket closed with unread
        data in its buffer would send a reset instead of a FIN.  Returns how
        many connections did not finish in time (closed anyway)."""
        conns = list(self.conns.values())
        for c in conns:
            c.send_body(_core.close_payload(1000), _core.OP_CLOSE)
            c.closing = True
            c.flush()
        end = time.perf_counter() + timeout
        while self.conns and time.perf_counter() < end:
            self.poll(0.05)
        left = len(self.conns)
        for c in list(self.conns.values()):
            self.remove(c)
        for c in conns:
            c.sock.close()
        return left

    def want_write(self, conn: Conn, on: bool) -> None:
        fd = conn.fd
        if on != (fd in self.writing):
            if on:
                self.writing.add(fd)
            else:
                self.writing.discard(fd)
            self.ep.modify(fd, select.EPOLLIN | (select.EPOLLOUT if on else 0))

    def poll(self, timeout: float) -> None:
        conns = self.conns
        for fd, ev in self.ep.poll(timeout, 4096):
            c = conns[fd]
            if ev & select.EPOLLOUT:
                c.flush()
            if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                c.readable()


# ---------------------------------------------------------------- publisher

class Publisher:
    """Pipelined publishes of 100-byte payloads on one connection.

    ``sent``/``acked`` count records.  Acks arrive in publish order; each must
    start where the previous one ended."""

    def __init__(self, conn: Conn, session: str, batch: int, window: int) -> None:
        self.conn = conn
        self.session = session
        self.batch = batch
        self.window = window
        self.sent = 0
        self.acked = 0
        self.next_offset: int | None = None     # what the next ack must start at
        self.ids = 0
        self.bad_acks = 0
        self.error: Msg | None = None
        # The part of every publish map that never changes; "id" and "r" follow.
        self.head = (b"\x85" + _packb("t") + _packb("publish") + _packb("s") + _packb(session)
                     + _packb("create") + _packb(True))
        self.fill = b"p" * (PAYLOAD_BYTES - _STAMP.size)
        conn.on_message = self.on_message

    def publish(self, n: int, stamp: int) -> None:
        self.ids += 1
        payload = _STAMP.pack(stamp) + self.fill
        body = (self.head + b"\xa2id" + _packb(self.ids) + b"\xa1r" + _packb([payload] * n))
        self.conn.send_body(body)
        self.sent += n

    def on_message(self, raw: bytes, now: int) -> None:
        m = _unpackb(raw)
        t = m["t"]
        if t == "ack":
            count = m["count"]
            if self.next_offset is not None and m["offset"] != self.next_offset:
                self.bad_acks += 1
            self.next_offset = m["offset"] + count
            self.acked += count
        elif t == "error":
            self.error = m
            raise LoadError(f"publisher: {m}")
        elif t == "ping":
            self.conn.send({"t": "pong", "id": m.get("id")})

    def in_flight(self) -> int:
        return self.sent - self.acked


# ---------------------------------------------------------------- subscriber

class Subscriber:
    """One attached session on one connection: counts records, checks order,
    and (while ``lat`` is not None) appends each record's latency in ns.

    Counting does not decode the records: a data frame is the msgpack map
    ``{"t": "data", "s": session, "r": [[offset, ts, kind, header, payload], ...]}``
    (the broker and both relays pack the keys in that order), so the count is
    the array header after ``prefix`` and the first offset is the integer after
    it.  Only latency needs every record's payload, and then the frame is
    unpacked whole."""

    __slots__ = ("conn", "session", "prefix", "attached", "live", "next", "count", "frames",
                 "gaps", "lat", "shared")

    def __init__(self, conn: Conn, session: str, shared: list[int]) -> None:
        self.conn = conn
        self.session = session
        self.prefix = (b"\x83" + _packb("t") + _packb("data") + _packb("s") + _packb(session)
                       + _packb("r"))
        self.attached = False
        self.live = False             # up_to_date seen
        self.next = -1                # offset the next data frame must start at
        self.count = 0                # records received
        self.frames = 0               # data frames received
        self.gaps = 0
        self.lat: list[int] | None = None
        self.shared = shared          # [records received by all subscribers]
        conn.on_message = self.on_message

    def attach(self) -> None:
        self.conn.send({"t": "attach", "id": 1, "s": self.session, "offset": "now",
                        "create": True})

    def on_message(self, raw: bytes, now: int) -> None:
        lat = self.lat
        if lat is None and raw.startswith(self.prefix):
            n, first = _data_head(raw, len(self.prefix))
            if first != self.next:
                self.gaps += 1
            self.next = first + n
            self.count += n
            self.frames += 1
            self.shared[0] += n
            return
        m = _unpackb(raw)
        t = m["t"]
        if t == "data":
            r = m["r"]
            if r[0][0] != self.next:
                self.gaps += 1
            self.next = r[-1][0] + 1
            n = len(r)
            self.count += n
            self.frames += 1
            self.shared[0] += n
            if lat is not None:
                unpack = _STAMP.unpack_from
                lat += [now - unpack(x[4])[0] for x in r]
        elif t == "attached":
            self.attached = True
            self.next = m["offset"]
        elif t == "up_to_date":
            self.live = True
        elif t == "ping":
            self.conn.send({"t": "pong", "id": m.get("id")})
            self.conn.flush()
        elif t == "error" or t == "event":
            raise LoadError(f"subscriber {self.conn.name}: {m}")


_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from


def _data_head(p: bytes, pos: int) -> tuple[int, int]:
    """(records, first offset) of a data frame whose "r" array starts at ``pos``."""
    b = p[pos]
    if 0x90 <= b <= 0x9F:
        n, pos = b & 0x0F, pos + 1
    elif b == 0xDC:
        n, pos = _U16(p, pos + 1)[0], pos + 3
    elif b == 0xDD:
        n, pos = _U32(p, pos + 1)[0], pos + 5
    else:
        raise LoadError(f"data 'r' is not an array: {p[pos:pos + 8]!r}")
    if p[pos] != 0x95:
        raise LoadError(f"a data record is not [offset, ts, kind, header, payload]: "
                        f"{p[pos:pos + 8]!r}")
    b = p[pos + 1]
    if b < 0x80:
        return n, b
    if b == 0xCC:
        return n, p[pos + 2]
    if b == 0xCD:
        return n, _U16(p, pos + 2)[0]
    if b == 0xCE:
        return n, _U32(p, pos + 2)[0]
    if b == 0xCF:
        return n, _U64(p, pos + 2)[0]
    raise LoadError(f"a record offset is not an unsigned integer: {p[pos:pos + 8]!r}")


# ---------------------------------------------------------------- helpers

def _split(url: str) -> tuple[str, int]:
    u = urllib.parse.urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or 80


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) of ``pid``; 0 without one."""
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Wall, client CPU and server CPU over an interval."""

    def __init__(self, server_pid: int | None) -> None:
        self.pid = server_pid
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        self.s0 = _cpu_s(server_pid)

    def stop(self) -> Row:
        wall = time.perf_counter() - self.t0
        return {"seconds": wall,
                "client_cpu_pct": 100 * (time.process_time() - self.c0) / wall,
                "server_cpu_pct": 100 * (_cpu_s(self.pid) - self.s0) / wall}


def _percentiles(lat_ns: list[int]) -> Row:
    if not lat_ns:
        return {"p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None, "samples": 0}
    import numpy as np
    a = np.asarray(lat_ns, dtype=np.int64) / 1e6
    p50, p99, p999 = np.percentile(a, [50, 99, 99.9])
    return {"p50_ms": float(p50), "p99_ms": float(p99), "p999_ms": float(p999),
            "max_ms": float(a.max()), "samples": len(lat_ns)}


def _pace(pub: Publisher, loop: Loop, rate: float, t_start: float, base: int,
          t_end: float, tick: float | None = None) -> float:
    """Publish at ``rate`` messages/s until ``t_end``, counting from ``t_start``
    (perf_counter), when ``pub.sent`` was ``base``.  With ``tick`` None, one
    publish of ``pub.batch`` records each time that many are due (the W2
    publisher, spaced out); with a tick (s), every tick what is due, in
    publishes of at most ``pub.batch``.  Returns the most that publishing fell
    behind by (s)."""
    batch, window = pub.batch, pub.window
    step = batch if tick is None else 1
    late = 0.0
    while True:
        now = time.perf_counter()
        if now >= t_end:
            break
        due = int(rate * (now - t_start)) - (pub.sent - base)
        if due >= step:
            stamp = _now()
            while due >= step and pub.in_flight() < window:
                n = min(batch, due)
                pub.publish(n, stamp)
                due -= n
            pub.conn.flush()
        late = max(late, (due - step + 1) / rate)
        if due >= step:
            wait = 0.001                    # the window is full: wait for acks
        elif tick is None:
            wait = (pub.sent - base + step - rate * (now - t_start)) / rate
        else:
            wait = tick
        loop.poll(min(max(wait, 0.0), 0.1))
    return late


def _drain(loop: Loop, done: Callable[[], bool], timeout: float) -> bool:
    end = time.perf_counter() + timeout
    while not done():
        if time.perf_counter() > end:
            return False
        loop.poll(0.05)
    return True


# ---------------------------------------------------------------- workloads

def w2(url: str, session: str, messages: int, batch: int, window: int,
       server_pid: int | None) -> Row:
    """One connection publishes ``messages`` records, pipelined; acked records/s."""
    host, port = _split(url)
    (conn,) = connect_all(host, port, ["publisher"], ["w2-publisher"])
    loop = Loop()
    loop.add(conn)
    pub = Publisher(conn, session, batch, window)
    stamp = _now()
    meter = Meter(server_pid)
    while pub.acked < messages:
        room = min(window - pub.in_flight(), messages - pub.sent)
        while room > 0:
            n = min(batch, room)
            pub.publish(n, stamp)
            room -= n
        conn.flush()
        loop.poll(1.0)
    row = meter.stop()
    row["unclean_closes"] = loop.close_all()
    row.update(messages=messages, batch=batch, window=window,
               msgs_s=messages / row["seconds"], publishes=pub.ids, bad_acks=pub.bad_acks)
    return row


def w3(url: str, session: str, rate: float, seconds: float, warmup: float, batch: int,
       window: int, tick: float | None, server_pid: int | None) -> Row:
    """A publisher paced at ``rate`` and one subscriber: latency percentiles."""
    host, port = _split(url)
    sub_conn, pub_conn = connect_all(host, port, ["subscriber", "publisher"],
                                     ["w3-subscriber", "w3-publisher"])
    loop = Loop()
    loop.add(sub_conn)
    loop.add(pub_conn)
    shared = [0]
    sub = Subscriber(sub_conn, session, shared)
    sub.attach()
    sub_conn.flush()
    if not _drain(loop, lambda: sub.attached and sub.live, 10):
        raise LoadError("the subscriber was not attached within 10 s")
    pub = Publisher(pub_conn, session, batch, window)
    t0 = time.perf_counter()
    _pace(pub, loop, rate, t0, 0, t0 + warmup, tick)
    sub.lat = []
    meter = Meter(server_pid)
    sent0, recv0 = pub.sent, sub.count
    late = _pace(pub, loop, rate, t0, 0, t0 + warmup + seconds, tick)
    row = meter.stop()
    lat, sub.lat = sub.lat, None
    sent = pub.sent - sent0
    received = sub.count - recv0
    drained = _drain(loop, lambda: sub.count >= pub.sent and pub.acked >= pub.sent, 10)
    row.update(rate=rate, batch=batch, tick_ms=tick and 1000 * tick, sent_msgs_s=sent / row["seconds"],
               recv_msgs_s=received / row["seconds"], publishes=pub.ids,
               max_late_ms=1000 * late, missing=pub.sent - sub.count, drained=drained,
               gaps=sub.gaps, bad_acks=pub.bad_acks, unclean_closes=loop.close_all(),
               **_percentiles(lat))
    return row


def w4(url: str, session: str, subs: int, seconds: float, warmup: float, batch: int,
       window: int, lag: int, half: float | None, tick: float | None, lat_every: int,
       server_pid: int | None) -> Row:
    """``subs`` subscribers and one publisher on one session: deliveries/s with
    the publisher as fast as acks and the subscribers allow, then latency with
    it paced at half that rate.  Latency is taken on every ``lat_every``-th
    subscriber (all of its records): decoding every record of every
    subscriber would cost the client more than the server spends sending."""
    host, port = _split(url)
    t_setup = time.perf_counter()
    names = [f"sub{i}" for i in range(subs)]
    conns = connect_all(host, port, names + ["publisher"],
                        [f"w4-{n}" for n in names] + ["w4-publisher"])
    pub_conn = conns.pop()
    loop = Loop()
    shared = [0]
    subscribers = []
    for c in conns:
        loop.add(c)
        s = Subscriber(c, session, shared)
        s.attach()
        c.flush()
        subscribers.append(s)
    loop.add(pub_conn)
    if not _drain(loop, lambda: all(s.attached and s.live for s in subscribers), 60):
        raise LoadError(f"only {sum(s.live for s in subscribers)} of {subs} subscribers "
                        "attached within 60 s")
    setup_s = time.perf_counter() - t_setup
    pub = Publisher(pub_conn, session, batch, window)

    # -- max rate: closed loop on acks (window), and with ``lag`` on the
    # subscribers' average lag (at most that many records behind the publisher).
    stamp = 0
    t0 = time.perf_counter()
    measuring: Meter | None = None
    d0 = p0 = a0 = 0
    t_end = t0 + warmup + seconds
    while True:
        now = time.perf_counter()
        if measuring is None and now >= t0 + warmup:
            measuring, d0, p0, a0 = Meter(server_pid), shared[0], pub.sent, pub.acked
        if now >= t_end:
            break
        room = window - pub.in_flight()
        if lag:
            room = min(room, lag - (pub.sent - shared[0] // subs))
        if room > 0:
            stamp = _now()
            while room > 0:
                n = min(batch, room)
                pub.publish(n, stamp)
                room -= n
            pub_conn.flush()
        loop.poll(0.001)
    assert measuring is not None
    max_row = measuring.stop()
    deliveries = shared[0] - d0
    dps = deliveries / max_row["seconds"]
    pub_rate = (pub.sent - p0) / max_row["seconds"]
    ack_rate = (pub.acked - a0) / max_row["seconds"]
    drained_max = _drain(loop, lambda: all(s.count >= pub.sent for s in subscribers), 30)
    missing_max = sum(max(0, pub.sent - s.count) for s in subscribers)

    # -- half rate, paced; latency of every delivery in the measured interval
    rate = half if half else dps / subs / 2
    lat: list[int] = []
    t1, base = time.perf_counter(), pub.sent
    _pace(pub, loop, rate, t1, base, t1 + warmup, tick)
    for s in subscribers[::lat_every]:
        s.lat = lat
    meter = Meter(server_pid)
    d1, p1 = shared[0], pub.sent
    late = _pace(pub, loop, rate, t1, base, t1 + warmup + seconds, tick)
    half_row = meter.stop()
    for s in subscribers:
        s.lat = None
    half_deliveries = shared[0] - d1
    half_sent = pub.sent - p1
    drained = _drain(loop, lambda: all(s.count >= pub.sent for s in subscribers), 30)
    missing = sum(max(0, pub.sent - s.count) for s in subscribers)
    unclean = loop.close_all()
    row: Row = {"subs": subs, "batch": batch, "window": window, "lag": lag,
                "lat_subs": len(subscribers[::lat_every]),
                "tick_ms": tick and 1000 * tick,
                "setup_s": setup_s,
                "deliveries_s": dps, "max_pub_msgs_s": pub_rate, "max_acked_msgs_s": ack_rate,
                "max_seconds": max_row["seconds"],
                "max_client_cpu_pct": max_row["client_cpu_pct"],
                "max_server_cpu_pct": max_row["server_cpu_pct"],
                "drained_max": drained_max, "missing_max": missing_max,
                "half_rate": rate, "half_sent_msgs_s": half_sent / half_row["seconds"],
                "half_deliveries_s": half_deliveries / half_row["seconds"],
                "half_client_cpu_pct": half_row["client_cpu_pct"],
                "half_server_cpu_pct": half_row["server_cpu_pct"],
                "half_max_late_ms": 1000 * late,
                "drained": drained, "missing": missing,
                "gaps": sum(s.gaps for s in subscribers), "bad_acks": pub.bad_acks,
                "published": pub.sent, "unclean_closes": unclean}
    row.update(_percentiles(lat))
    return row


# ---------------------------------------------------------------- report

SERVERS = ("broker", "broker-durable", "relay-trio", "relay-ws")
PEERS = ("relay-trio", "relay-ws")


def _fmt(values: list[Any], nd: int = 0) -> str:
    """median [min..max] of the values that are not None."""
    xs: list[float] = [x for x in values if x is not None]
    if not xs:
        return "-"

    def f(x: float) -> str:
        return f"{x:,.{nd}f}"
    if len(xs) == 1:
        return f(xs[0])
    return f"{f(statistics.median(xs))} [{f(min(xs))}..{f(max(xs))}]"


def _load(path: str) -> list[Row]:
    return [json.loads(line) for line in open(path) if line.strip()]


def w2_rate(path: str, run: int, server: str, batch: int) -> None:
    rows = [r for r in _load(path) if r["kind"] == "w2" and r["run"] == run
            and r["server"] == server and r["batch"] == batch]
    if not rows:
        sys.exit(f"no W2 row for run {run}, {server}, batch {batch}")
    print(f"{rows[-1]['msgs_s']:.0f}")


def report(path: str) -> None:
    rows = _load(path)
    by: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in rows:
        by[r["kind"], r["server"]].append(r)
    servers = [s for s in SERVERS if any(k[1] == s for k in by)]

    def ratios(kind: str, key: str, peer: str, where: Callable[[Row], bool] = lambda r: True
               ) -> str:
        b = {r["run"]: r[key] for r in by.get((kind, "broker"), []) if where(r)}
        o = {r["run"]: r[key] for r in by.get((kind, peer), []) if where(r)}
        return _fmt([b[k] / o[k] for k in b if k in o and b[k] is not None and o[k]], 2)

    w2rows = [r for s in servers for r in by.get(("w2", s), [])]
    if w2rows:
        batches = sorted({r["batch"] for r in w2rows})
        print("W2, one connection publishes 100-byte messages, pipelined: messages/s "
              "acknowledged, median [min..max] over runs\n")
        print("| server | " + " | ".join(f"batch {b}" for b in batches)
              + " | server CPU % | client CPU % |")
        print("|---|" + "---|" * (len(batches) + 2))
        for s in servers:
            rs = by.get(("w2", s), [])
            if not rs:
                continue
            cells = [_fmt([r["msgs_s"] for r in rs if r["batch"] == b]) for b in batches]
            print(f"| {s} | " + " | ".join(cells)
                  + f" | {_fmt([r['server_cpu_pct'] for r in rs])}"
                  f" | {_fmt([r['client_cpu_pct'] for r in rs])} |")
        bad = sum(r["bad_acks"] for r in w2rows)
        print(f"\nnon-contiguous acks: {bad}\n")
        print("W2 ratios broker / peer (per run, median [min..max])\n")
        print("| peer | " + " | ".join(f"batch {b}" for b in batches) + " |")
        print("|---|" + "---|" * len(batches))
        for p in PEERS:
            if p in servers and "broker" in servers:
                cells = []
                for b in batches:
                    def same_batch(r: Row, b: int = b) -> bool:
                        return bool(r["batch"] == b)
                    cells.append(ratios("w2", "msgs_s", p, same_batch))
                print(f"| {p} | " + " | ".join(cells) + " |")
        print()
    for kind, title in (("w3", "W3, a publisher paced at 50% of the server's own W2 rate "
                                "(batch 100) in the same run"),
                        ("w3fixed", "W3 at one rate for every server")):
        w3rows = [r for s in servers for r in by.get((kind, s), [])]
        if not w3rows:
            continue
        print(f"{title}, one subscriber: publish-to-deliver latency, median [min..max] "
              "over runs\n")
        print("| server | rate msgs/s | received msgs/s | p50 ms | p99 ms | p999 ms | max ms"
              " | server CPU % | client CPU % | missing | gaps |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for s in servers:
            rs = by.get((kind, s), [])
            if rs:
                print(f"| {s} | {_fmt([r['rate'] for r in rs])}"
                      f" | {_fmt([r['recv_msgs_s'] for r in rs])}"
                      f" | {_fmt([r['p50_ms'] for r in rs], 2)}"
                      f" | {_fmt([r['p99_ms'] for r in rs], 2)}"
                      f" | {_fmt([r['p999_ms'] for r in rs], 2)}"
                      f" | {_fmt([r['max_ms'] for r in rs], 1)}"
                      f" | {_fmt([r['server_cpu_pct'] for r in rs])}"
                      f" | {_fmt([r['client_cpu_pct'] for r in rs])}"
                      f" | {sum(r['missing'] for r in rs)} | {sum(r['gaps'] for r in rs)} |")
        print(f"\n{kind} ratios broker / peer (p50, p99, p999: below 1 means the broker "
              "is faster)\n")
        print("| peer | rate | p50 | p99 | p999 |")
        print("|---|---|---|---|---|")
        for p in PEERS:
            if p in servers and "broker" in servers:
                print(f"| {p} | {ratios(kind, 'rate', p)} | {ratios(kind, 'p50_ms', p)}"
                      f" | {ratios(kind, 'p99_ms', p)} | {ratios(kind, 'p999_ms', p)} |")
        print()
    w4rows = [r for s in servers for r in by.get(("w4", s), [])]
    if w4rows:
        print(f"W4, {w4rows[0]['subs']:,} subscribers on one session in one client process: "
              "median [min..max] over runs\n")
        print("| server | deliveries/s (max) | acked msgs/s (max) | server CPU % | client CPU %"
              " | half rate msgs/s | half deliveries/s | p50 ms | p99 ms | p999 ms"
              " | missing | gaps |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for s in servers:
            rs = by.get(("w4", s), [])
            if rs:
                print(f"| {s} | {_fmt([r['deliveries_s'] for r in rs])}"
                      f" | {_fmt([r.get('max_acked_msgs_s', r['max_pub_msgs_s']) for r in rs])}"
                      f" | {_fmt([r['max_server_cpu_pct'] for r in rs])}"
                      f" | {_fmt([r['max_client_cpu_pct'] for r in rs])}"
                      f" | {_fmt([r['half_rate'] for r in rs])}"
                      f" | {_fmt([r['half_deliveries_s'] for r in rs])}"
                      f" | {_fmt([r['p50_ms'] for r in rs], 2)}"
                      f" | {_fmt([r['p99_ms'] for r in rs], 2)}"
                      f" | {_fmt([r['p999_ms'] for r in rs], 2)}"
                      f" | {sum(r['missing'] + r['missing_max'] for r in rs)}"
                      f" | {sum(r['gaps'] for r in rs)} |")
        print("\nW4 ratios broker / peer (p99 below 1 means the broker is faster)\n")
        print("| peer | deliveries/s | half rate | p50 | p99 |")
        print("|---|---|---|---|---|")
        for p in PEERS:
            if p in servers and "broker" in servers:
                print(f"| {p} | {ratios('w4', 'deliveries_s', p)}"
                      f" | {ratios('w4', 'half_rate', p)} | {ratios('w4', 'p50_ms', p)}"
                      f" | {ratios('w4', 'p99_ms', p)} |")
        print()


# ---------------------------------------------------------------- command line

def _tags(args: list[str]) -> Row:
    out: Row = {}
    for a in args:
        k, _, v = a.partition("=")
        for conv in (int, float):
            try:
                out[k] = conv(v)
                break
            except ValueError:
                pass
        else:
            out[k] = v
    return out


def main(argv: list[str]) -> None:
    if argv and argv[0] == "rate":
        w2_rate(argv[1], int(argv[2]), argv[3], int(argv[4]))
        return
    if argv and argv[0] == "report":
        report(argv[1])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("w2", "w3", "w4"))
    ap.add_argument("url", help="http://127.0.0.1:PORT (the path /v1/ws is added)")
    ap.add_argument("tags", nargs="*", help="k=v pairs copied into the JSON line")
    ap.add_argument("--session", default=None)
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=100, help="records per publish")
    ap.add_argument("--window", type=int, default=32768, help="records in flight (unacked)")
    ap.add_argument("--rate", type=float, default=0.0, help="W3: messages/s")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--subs", type=int, default=1000)
    ap.add_argument("--lag", type=int, default=0,
                    help="W4: most records the subscribers may be behind, on average "
                         "(0: no limit)")
    ap.add_argument("--lat-every", type=int, default=10,
                    help="W4: take latency on every this-many-th subscriber")
    ap.add_argument("--half-rate", type=float, default=0.0,
                    help="W4: the paced rate (messages/s) instead of half the maximum")
    ap.add_argument("--tick-ms", type=float, default=0.0,
                    help="pacing: publish what is due every this many ms (0: one publish "
                         "of --batch records each time that many are due)")
    ap.add_argument("--server-pid", type=int, default=None)
    a = ap.parse_intermixed_args(argv)
    session = a.session or f"{a.mode}-{os.getpid()}-{a.batch}"
    tick = a.tick_ms / 1000 if a.tick_ms > 0 else None
    if a.mode == "w2":
        row = w2(a.url, session, a.messages, a.batch, a.window, a.server_pid)
    elif a.mode == "w3":
        if a.rate <= 0:
            ap.error("w3 needs --rate")
        row = w3(a.url, session, a.rate, a.seconds, a.warmup, a.batch, a.window,
                 tick, a.server_pid)
    else:
        row = w4(a.url, session, a.subs, a.seconds, a.warmup, a.batch, a.window, a.lag,
                 a.half_rate or None, tick, a.lat_every, a.server_pid)
    print(json.dumps({"kind": a.mode, **_tags(a.tags), **row}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

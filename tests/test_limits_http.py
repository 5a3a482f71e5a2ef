"""The HTTP listener's limits (broker/_server.py, HttpLimits) against a real
server in the test's own Trio run: connection count, slow heads and bodies,
idle keep-alive, body size and the per-connection publish rate.

Raw Trio sockets throughout, since each test is about what happens on one
connection (a half-sent request line, a read that outlives a timeout), which
an HTTP client library hides.  The timeouts are short (a fraction of a
second), and every wait on the server is bounded by ``trio.fail_after``; no
test asserts how long anything took.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from broker import _frames
from broker._http import BadRequest, Phase, RequestReader
from broker._limits import HttpLimits
from broker._ws import WsConfig
from conftest import Served, serve_in_process
from _wsraw import RawWs

WAIT = 15           # seconds: a bound on any wait, far above every timeout used here


class Conn:
    """One raw HTTP/1.1 client connection with its own read buffer."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        chunk = await self.stream.receive_some(65536)
        self.buf += chunk
        return bool(chunk)

    async def _until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            assert await self._fill(), f"closed before {marker!r}: {bytes(self.buf)!r}"
        i = self.buf.index(marker) + len(marker)
        out = bytes(self.buf[:i])
        del self.buf[:i]
        return out

    async def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            assert await self._fill(), "closed mid-body"
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response: status, headers (lower-case names), whole body."""
        with trio.fail_after(WAIT):
            head = (await self._until(b"\r\n\r\n")).decode("latin-1")
            status_line, *lines = head.split("\r\n")[:-2]
            status = int(status_line.split()[1])
            headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
            if headers.get("transfer-encoding") == "chunked":
                body = b""
                while size := int((await self._until(b"\r\n")).strip(), 16):
                    body += (await self._exactly(size + 2))[:-2]
                await self._until(b"\r\n")
            else:
                body = await self._exactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def closed(self) -> bytes:
        """Read until the server closes; what came before the close."""
        with trio.fail_after(WAIT):
            while await self._fill():
                pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    async def aclose(self) -> None:
        await self.stream.aclose()


def request(method: str, target: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "host: localhost"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


HEALTHZ = request("GET", "/healthz")
TEXT = "text/plain"


def error_code(body: bytes) -> str:
    code: str = json.loads(body)["error"]["code"]
    return code


@pytest.fixture
async def conns() -> AsyncIterator[Any]:
    """``await conns(port)`` opens a Conn that is closed after the test."""
    opened: list[Conn] = []

    async def connect(port: int) -> Conn:
        c = await Conn.open(port)
        opened.append(c)
        return c

    yield connect
    for c in opened:
        await c.aclose()


async def create(c: Conn, name: str, *records: bytes) -> None:
    await c.send(request("PUT", f"/v1/stream/{name}", content_type=TEXT))
    assert (await c.response())[0] == 201
    for record in records:
        await c.send(request("POST", f"/v1/stream/{name}", record, content_type=TEXT))
        assert (await c.response())[0] == 204


async def read_all(c: Conn, name: str) -> bytes:
    await c.send(request("GET", f"/v1/stream/{name}?offset=-1"))
    status, _, body = await c.response()
    assert status == 200
    return body


async def wait_for(predicate: Any) -> None:
    """Until ``predicate()`` holds: for what happens in the server after a
    client's close, which no event here reports."""
    with trio.fail_after(WAIT):
        while not predicate():
            await trio.sleep(0.01)


# ------------------------------------------------------------ the reader, sans-IO

def test_the_reader_tells_where_it_is_in_a_message() -> None:
    reader = RequestReader()
    steps = [(b"", Phase.IDLE), (b"PO", Phase.HEAD),
             (b"ST /a HTTP/1.1\r\ncontent-length: 3\r\n", Phase.HEAD),
             (b"\r\n", Phase.BODY), (b"ab", Phase.BODY), (b"c", Phase.IDLE),
             (b"GET /b HTTP/1.1\r\n\r\nGE", Phase.HEAD), (b"T /c HTTP/1.1\r\n\r\n", Phase.IDLE)]
    done = []
    for data, phase in steps:
        done += [r.target for r in reader.feed(data)]
        assert reader.phase is phase, data
    assert done == ["/a", "/b", "/c"]


def test_requests_before_garbage_come_out_first() -> None:
    reader = RequestReader()
    got = reader.feed(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n\x00\x01 nonsense\r\n\r\n")
    assert [r.target for r in got] == ["/a", "/b"]
    assert reader.error is not None and reader.error.status == 400
    with pytest.raises(BadRequest):
        reader.feed(b"GET /c HTTP/1.1\r\n\r\n")


def test_a_chunked_trailer_adds_no_header() -> None:
    # Merged into the headers, a trailer could bring what the head did not
    # have, such as an Authorization that no proxy in front ever saw.
    [req] = RequestReader().feed(
        b"POST /v1/stream/x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\nauthorization: Bearer smuggled\r\n\r\n")
    assert req.body == b"hi" and req.header(b"authorization") is None


@pytest.mark.parametrize("wire", [
    b"POST / HTTP/1.1\r\ncontent-length: 11\r\n\r\n",
    b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n6\r\nabcdef\r\n5\r\nghijk\r\n",
])
def test_the_reader_refuses_a_body_over_its_limit(wire: bytes) -> None:
    with pytest.raises(BadRequest) as refused:
        RequestReader(max_body_bytes=10).feed(wire)
    assert (refused.value.status, refused.value.code) == (413, "body_too_large")
    ok = wire.replace(b"11", b"10").replace(b"5\r\nghijk", b"4\r\nghij") + (
        b"0123456789" if b"content-length" in wire else b"0\r\n\r\n")
    assert len(RequestReader(max_body_bytes=10).feed(ok)) == 1


# ------------------------------------------------------------ connections

@pytest.mark.parametrize("holder", ["http", "websocket"])
async def test_a_connection_beyond_the_limit_gets_503(tmp_path: Path, conns: Any,
                                                      holder: str) -> None:
    async with serve_in_process(tmp_path / "data",
                                limits=HttpLimits(max_connections=2)) as s:
        first = await conns(s.port)
        await first.send(HEALTHZ)
        assert (await first.response())[0] == 200
        if holder == "http":
            second = await conns(s.port)
            await second.send(HEALTHZ)
            assert (await second.response())[0] == 200
        else:
            ws = await RawWs.connect(s.port)       # an upgraded connection counts too
        over = await conns(s.port)
        answer = await over.closed()               # answered and closed unasked
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), answer
        assert b"\r\nretry-after: 1\r\n" in head and b"connection: close" in head
        assert error_code(body) == "too_many_connections"
        # The connections inside the limit carry on.
        await first.send(HEALTHZ)
        assert (await first.response())[0] == 200
        # Once one closes, a new connection is served.
        if holder == "http":
            await second.aclose()
        else:
            await ws.aclose()
        await wait_for(lambda: s.server.connections < 2)
        again = await conns(s.port)
        await again.send(HEALTHZ)
        assert (await again.response())[0] == 200


async def test_a_refused_connection_that_already_sent_its_request_reads_the_503(
        tmp_path: Path, conns: Any) -> None:
    async with serve_in_process(tmp_path / "data",
                                limits=HttpLimits(max_connections=1)) as s:
        first = await conns(s.port)
        await first.send(HEALTHZ)
        assert (await first.response())[0] == 200
        over = await conns(s.port)
        await over.send(request("POST", "/v1/stream/x", b"y" * 1000, content_type=TEXT))
        status, _, body = await over.response()
        assert status == 503 and error_code(body) == "too_many_connections"


# ------------------------------------------------------------ slow requests

@pytest.mark.parametrize("first,part", [
    (True, b""),                                    # a connection that never speaks
    (True, b"GET /heal"),
    (False, b"GET /heal"),                          # on a kept-alive connection
    (True, b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n"),
    (False, b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n"),
    (True, b"GET /v1/ws HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\n"),
])
async def test_a_slow_request_head_gets_408(tmp_path: Path, conns: Any, first: bool,
                                            part: bytes) -> None:
    limits = HttpLimits(header_timeout_s=0.3, keepalive_timeout_s=WAIT)
    async with serve_in_process(tmp_path / "data", limits=limits) as s:
        c = await conns(s.port)
        if not first:
            await c.send(HEALTHZ)
            assert (await c.response())[0] == 200
        await c.send(part)
        answer = await c.closed()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer
        assert b"connection: close" in head
        assert error_code(body) == "request_timeout"
        # Others are served as ever.
        other = await conns(s.port)
        await other.send(HEALTHZ)
        assert (await other.response())[0] == 200


async def test_a_stalled_body_gets_408_and_nothing_is_stored(tmp_path: Path,
                                                             conns: Any) -> None:
    limits = HttpLimits(header_timeout_s=0.3)
    async with serve_in_process(tmp_path / "data", limits=limits) as s:
        c = await conns(s.port)
        await create(c, "s")
        await c.send(b"POST /v1/stream/s HTTP/1.1\r\nhost: localhost\r\ncontent-type: text/plain\r\n"
                     b"content-length: 10\r\n\r\nabc")
        answer = await c.closed()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer
        assert error_code(body) == "request_timeout"
        assert b"body" in body
        other = await conns(s.port)
        assert await read_all(other, "s") == b""


async def test_a_body_that_keeps_coming_is_not_cut(tmp_path: Path, conns: Any) -> None:
    # The body rule is per read: each piece must come within the timeout,
    # however long the whole body takes.
    limits = HttpLimits(header_timeout_s=1.0)
    async with serve_in_process(tmp_path / "data", limits=limits) as s:
        c = await conns(s.port)
        await create(c, "s")
        body = b"steady"
        await c.send(b"POST /v1/stream/s HTTP/1.1\r\nhost: localhost\r\ncontent-type: text/plain\r\n"
                     b"content-length: %d\r\n\r\n" % len(body))
        for byte in body:               # 6 pieces, 1.5 s in all: longer than the timeout
            await trio.sleep(0.25)
            await c.send(bytes([byte]))
        assert (await c.response())[0] == 204
        assert await read_all(c, "s") == body


async def test_an_idle_keep_alive_connection_is_closed_quietly(tmp_path: Path,
                                                               conns: Any) -> None:
    limits = HttpLimits(keepalive_timeout_s=0.3)
    async with serve_in_process(tmp_path / "data", limits=limits) as s:
        c = await conns(s.port)
        for _ in range(2):              # requests in a row keep it open
            await c.send(HEALTHZ)
            assert (await c.response())[0] == 200
        assert await c.closed() == b""  # then idle: closed without a word


# ------------------------------------------------- answers are never cut

async def test_long_poll_and_sse_outlive_the_timeouts(tmp_path: Path, conns: Any) -> None:
    limits = HttpLimits(header_timeout_s=0.2, keepalive_timeout_s=0.2)
    async with serve_in_process(tmp_path / "data", limits=limits,
                                streams={"long_poll_timeout_s": 1.0, "sse_max_s": 1.0}) as s:
        c = await conns(s.port)
        await create(c, "s", b"one")
        # A long-poll at the tail waits its full second, then 204.
        await c.send(request("GET", "/v1/stream/s?offset=now&live=long-poll"))
        status, headers, _ = await c.response()
        assert status == 204 and "stream-cursor" in headers
        # An SSE response runs its full second and ends cleanly.
        await c.send(request("GET", "/v1/stream/s?offset=-1&live=sse"))
        status, headers, body = await c.response()
        assert status == 200 and headers["content-type"] == "text/event-stream"
        assert b"event: data\ndata:one\n" in body and b'"upToDate": true' in body
        # The connection is still good for another request.
        await c.send(HEALTHZ)
        assert (await c.response())[0] == 200


async def test_an_upgraded_websocket_outlives_the_timeouts(tmp_path: Path) -> None:
    limits = HttpLimits(header_timeout_s=0.2, keepalive_timeout_s=0.2)
    async with serve_in_process(tmp_path / "data", WsConfig(heartbeat_s=1.0),
                                limits=limits) as s:
        ws = await RawWs.connect(s.port)
        try:
            with trio.fail_after(WAIT):
                ping = await ws.frame()        # the server's first heartbeat, after 1 s
            assert isinstance(ping, _frames.Ping)
            await ws.send(_frames.Pong(ping.id))
            await ws.send(_frames.Publish(1, "w", (b"x",), create=True))
            with trio.fail_after(WAIT):
                ack = await ws.frame()
            assert isinstance(ack, _frames.Ack) and ack.id == 1
        finally:
            await ws.aclose()


# ------------------------------------------------------------ body size

@pytest.mark.parametrize("framing", ["declared", "chunked"])
async def test_a_body_over_max_body_bytes_gets_413(tmp_path: Path, conns: Any,
                                                   framing: str) -> None:
    async with serve_in_process(tmp_path / "data",
                                limits=HttpLimits(max_body_bytes=1000)) as s:
        c = await conns(s.port)
        await create(c, "s", b"x" * 1000)           # at the limit: stored
        over = await conns(s.port)
        head = b"POST /v1/stream/s HTTP/1.1\r\nhost: localhost\r\ncontent-type: text/plain\r\n"
        if framing == "declared":
            # Refused on the header alone: the body is never sent.
            await over.send(head + b"content-length: 1001\r\n\r\n")
        else:
            await over.send(head + b"transfer-encoding: chunked\r\n\r\n"
                            + b"3e8\r\n" + b"y" * 1000 + b"\r\n")
            await over.send(b"1\r\nz\r\n")       # one byte over
        answer = await over.closed()
        head_out, _, body = answer.partition(b"\r\n\r\n")
        assert head_out.startswith(b"HTTP/1.1 413 "), answer
        assert error_code(body) == "body_too_large" and b"1000 bytes" in body
        assert await read_all(c, "s") == b"x" * 1000


# ------------------------------------------------------------ publish rate

async def test_posts_beyond_the_publish_rate_get_429(tmp_path: Path, conns: Any) -> None:
    # 0.2 per second, 2 at once: a third POST right away waits about 5 s.
    limits = HttpLimits(publish_rate=0.2, publish_burst=2)
    async with serve_in_process(tmp_path / "data", limits=limits) as s:
        c = await conns(s.port)
        await c.send(request("PUT", "/v1/stream/s", content_type=TEXT))
        assert (await c.response())[0] == 201       # a PUT takes no token
        for record in (b"a", b"b"):
            await c.send(request("POST", "/v1/stream/s", record, content_type=TEXT))
            assert (await c.response())[0] == 204
        await c.send(request("POST", "/v1/stream/s", b"c", content_type=TEXT))
        status, headers, body = await c.response()
        assert status == 429 and error_code(body) == "rate_limited"
        assert headers["retry-after"].isdigit() and 1 <= int(headers["retry-after"]) <= 5
        # The connection stays open, reads are not limited, and the refused
        # append was not stored.
        assert await read_all(c, "s") == b"ab"
        # Another connection has a bucket of its own.
        other = await conns(s.port)
        await other.send(request("POST", "/v1/stream/s", b"d", content_type=TEXT))
        assert (await other.response())[0] == 204
        assert await read_all(other, "s") == b"abd"


# ------------------------------------------------------------ record size

async def test_a_record_over_max_record_bytes_is_refused_on_both_transports(
        tmp_path: Path, conns: Any) -> None:
    async with serve_in_process(tmp_path / "data", max_record_bytes=64) as s:
        c = await conns(s.port)
        await create(c, "s", b"x" * 64)               # at the limit: stored
        await c.send(request("POST", "/v1/stream/s", b"y" * 65, content_type=TEXT))
        status, _, body = await c.response()
        assert status == 413 and error_code(body) == "record_too_large"
        ws = await RawWs.connect(s.port)
        try:
            await ws.send(_frames.Publish(1, "s", (b"z" * 65,)))
            refused = await ws.frame()
            assert isinstance(refused, _frames.Error) and refused.code == "record_too_large"
            assert refused.id == 1 and refused.session == "s"
            await ws.send(_frames.Publish(2, "s", (b"ok",)))     # the connection carries on
            assert isinstance(await ws.frame(), _frames.Ack)
        finally:
            await ws.aclose()
        assert await read_all(c, "s") == b"x" * 64 + b"ok"

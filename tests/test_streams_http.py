"""The Durable Streams HTTP API (broker/_streams.py) against a real `broker serve`.

Every test talks to a server process on a random port over real sockets:
httpx for ordinary requests, raw sockets where a request has to be malformed,
cut short or trickled.  Most tests share one server (``srv``, started with a
short long-poll timeout and SSE lifetime) and each uses its own stream; the
restart tests start their own on a temporary data dir.
"""

from __future__ import annotations

import base64
import json
import queue
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from broker._http import MAX_BODY_BYTES

LONG_POLL_MS = 400
SSE_MAX_S = 1.0
JSON = {"content-type": "application/json"}
TEXT = {"content-type": "text/plain"}
BYTES = {"content-type": "application/octet-stream"}
ZERO = "0000000000000000_0000000000000000"


# ------------------------------------------------------------------ helpers

class Server:
    """`broker serve --port 0` as a child process; stderr is drained by a thread
    (kept for failure messages) so the server never blocks on a full pipe."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--port", "0",
             "--data-dir", str(data_dir), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        ports: queue.Queue[int | None] = queue.Queue()
        self._drain = threading.Thread(target=self._read_stderr, args=(ports,), daemon=True)
        self._drain.start()
        port = ports.get(timeout=30)
        if port is None:
            self.stop()
            raise AssertionError("server did not report its port:\n" + "".join(self.log))
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def _read_stderr(self, ports: queue.Queue[int | None]) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                ports.put(int(m.group(1)))
        ports.put(None)

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, **kw)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._drain.join(timeout=30)
            assert self.proc.stderr is not None
            self.proc.stderr.close()
        return rc


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("streams") / "data",
                    "--long-poll-timeout-ms", str(LONG_POLL_MS), "--sse-max-s", str(SSE_MAX_S))
    try:
        yield server
    finally:
        assert server.stop() == 0, "".join(server.log)


@pytest.fixture
def http(srv: Server) -> Iterator[httpx.Client]:
    with srv.client() as c:
        yield c


@pytest.fixture
def name() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


def path(name: str) -> str:
    return f"/v1/stream/{name}"


def off(n: int) -> str:
    return f"{0:016d}_{n:016d}"


def off_n(wire: str) -> int:
    return int(wire.split("_")[1])


def create(c: httpx.Client, name: str, headers: dict[str, str], body: bytes = b"") -> None:
    r = c.put(path(name), headers=headers, content=body)
    assert r.status_code == 201, r.text


def append(c: httpx.Client, name: str, body: bytes, headers: dict[str, str]) -> str:
    r = c.post(path(name), headers=headers, content=body)
    assert r.status_code == 204, r.text
    return r.headers["stream-next-offset"]


def read_json(c: httpx.Client, name: str, offset: str = "-1") -> tuple[list[Any], str]:
    """Catch-up reads from ``offset`` until up to date: (records, next offset)."""
    out: list[Any] = []
    while True:
        r = c.get(path(name), params={"offset": offset})
        assert r.status_code == 200, r.text
        out += r.json()
        offset = r.headers["stream-next-offset"]
        if r.headers.get("stream-up-to-date") == "true":
            return out, offset


class SseParser:
    """The WHATWG event-stream grammar, one line at a time."""

    def __init__(self) -> None:
        self.event = ""
        self.data: list[str] = []

    def line(self, line: str) -> tuple[str, str] | None:
        if line == "":
            if not self.data:
                self.event = ""
                return None
            ev = (self.event or "message", "\n".join(self.data))
            self.event, self.data = "", []
            return ev
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            self.event = value
        elif field == "data":
            self.data.append(value)
        return None


def sse_events(r: httpx.Response) -> Iterator[tuple[str, str]]:
    parser = SseParser()
    for line in r.iter_lines():
        ev = parser.line(line)
        if ev is not None:
            yield ev


async def asse_events(r: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    parser = SseParser()
    async for line in r.aiter_lines():
        ev = parser.line(line)
        if ev is not None:
            yield ev


def read_sse(c: httpx.Client, name: str, offset: str = "-1") -> tuple[httpx.Response,
                                                                      list[tuple[str, str]]]:
    with c.stream("GET", path(name), params={"offset": offset, "live": "sse"}) as r:
        assert r.status_code == 200
        return r, list(sse_events(r))


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, half-close, and return everything the server says."""
    with connect(port) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def recv_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def read_response(f: Any) -> tuple[int, dict[str, str], bytes]:
    """One content-length-framed response from a socket's makefile('rb')."""
    status = int(f.readline().split()[1])
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, f.read(int(headers.get("content-length", "0")))


def healthy(port: int) -> bool:
    with httpx.Client(timeout=10) as c:
        return c.get(f"http://127.0.0.1:{port}/healthz").status_code == 200


# ------------------------------------------------------- create/append/read

def test_byte_mode_round_trip(http: httpx.Client, name: str) -> None:
    r = http.put(path(name), headers=TEXT)
    assert r.status_code == 201
    assert r.headers["stream-next-offset"] == ZERO
    assert r.headers["location"].endswith(path(name))
    assert append(http, name, b"hello ", TEXT) == off(1)
    assert append(http, name, b"world", {"content-type": "text/plain; charset=utf-8"}) == off(2)
    for params in ({"offset": "-1"}, {}):
        r = http.get(path(name), params=params)
        assert r.status_code == 200
        assert r.content == b"hello world"
        assert r.headers["content-type"] == "text/plain"
        assert r.headers["stream-next-offset"] == off(2)
        assert r.headers["stream-up-to-date"] == "true"
    # The same read again is a cache hit.
    etag = r.headers["etag"]
    again = http.get(path(name), params={"offset": "-1"}, headers={"if-none-match": etag})
    assert again.status_code == 304 and again.content == b""


def test_binary_payload_round_trip(http: httpx.Client, name: str) -> None:
    payload = bytes(range(256)) * 4
    create(http, name, BYTES, payload)
    r = http.get(path(name), params={"offset": "-1"})
    assert r.content == payload and r.headers["stream-next-offset"] == off(1)


@pytest.mark.parametrize(("posts", "records"), [
    ([b'{"a":1}'], [{"a": 1}]),
    ([b'[1, {"b": [2, 3]}, "x"]'], [1, {"b": [2, 3]}, "x"]),
    ([b"[[1, 2], [3]]", b"4", b'["five"]'], [[1, 2], [3], 4, "five"]),
    ([b'  "\xc3\xa9t\xc3\xa9"  ', b"null", b"[true, false]"], ["\u00e9t\u00e9", None, True, False]),
])
def test_json_mode_flattens_one_level(http: httpx.Client, name: str, posts: list[bytes],
                                      records: list[Any]) -> None:
    create(http, name, JSON)
    for body in posts:
        nxt = append(http, name, body, JSON)
    assert off_n(nxt) == len(records)
    r = http.get(path(name), params={"offset": "-1"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == records
    tail = http.get(path(name), params={"offset": nxt})
    assert tail.status_code == 200 and tail.content == b"[]"
    assert tail.headers["stream-up-to-date"] == "true"


def test_json_put_with_initial_data(http: httpx.Client, name: str) -> None:
    r = http.put(path(name), headers=JSON, content=b'[{"k": 1}, 2]')
    assert r.status_code == 201 and r.headers["stream-next-offset"] == off(2)
    assert http.get(path(name)).json() == [{"k": 1}, 2]
    empty = f"{name}-empty"
    r = http.put(path(empty), headers=JSON, content=b"[]")
    assert r.status_code == 201 and r.headers["stream-next-offset"] == ZERO
    r = http.get(path(empty), params={"offset": "-1"})
    assert r.status_code == 200 and r.content == b"[]"


def test_head(http: httpx.Client, name: str) -> None:
    create(http, name, JSON, b"[1, 2, 3]")
    r = http.head(path(name))
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-type"] == "application/json"
    assert r.headers["stream-next-offset"] == off(3)
    assert "stream-closed" not in r.headers
    close = http.post(path(name), headers={"stream-closed": "true"})
    assert close.status_code == 204 and close.headers["stream-closed"] == "true"
    r = http.head(path(name))
    assert r.headers["stream-closed"] == "true" and r.headers["stream-next-offset"] == off(3)
    assert http.head(path(f"{name}-missing")).status_code == 404


def test_delete_then_404(http: httpx.Client, name: str) -> None:
    create(http, name, TEXT, b"doomed")
    assert http.delete(path(name)).status_code == 204
    assert http.get(path(name)).status_code == 404
    assert http.head(path(name)).status_code == 404
    assert http.post(path(name), headers=TEXT, content=b"x").status_code == 404
    assert http.delete(path(name)).status_code == 404
    # The name is free again, and the new stream starts empty.
    r = http.put(path(name), headers=JSON)
    assert r.status_code == 201 and r.headers["stream-next-offset"] == ZERO
    assert http.get(path(name)).content == b"[]"


@pytest.mark.parametrize(("first", "again"), [
    (TEXT, TEXT),
    (TEXT, {"content-type": "text/plain; charset=utf-8"}),
    ({**TEXT, "stream-ttl": "3600"}, {"content-type": "TEXT/PLAIN", "stream-ttl": "3600"}),
])
def test_idempotent_put(http: httpx.Client, name: str, first: dict[str, str],
                        again: dict[str, str]) -> None:
    create(http, name, first, b"first")
    r = http.put(path(name), headers=again, content=b"ignored")
    assert r.status_code == 200, r.text
    assert r.headers["stream-next-offset"] == off(1)
    assert "location" not in r.headers
    assert http.get(path(name)).content == b"first"


@pytest.mark.parametrize("conflict", [
    {"content-type": "application/json"},
    {"content-type": "text/plain", "stream-ttl": "60"},
    {"content-type": "text/plain", "stream-closed": "true"},
])
def test_conflicting_put(http: httpx.Client, name: str, conflict: dict[str, str]) -> None:
    create(http, name, TEXT, b"first")
    r = http.put(path(name), headers=conflict)
    assert r.status_code == 409, r.text
    assert http.get(path(name)).content == b"first"
    assert http.head(path(name)).headers["stream-next-offset"] == off(1)


@pytest.mark.parametrize(("raw", "status"), [
    ("a%2Fb", 201),                # a percent-encoded slash is a slash
    ("a%20b", 400),                # names keep to a safe ASCII set (security.md)
    ("a%E2%9C%93", 400),
    ("x%00y", 400),
])
def test_stream_names(http: httpx.Client, raw: str, status: int) -> None:
    unique = f"{uuid.uuid4().hex[:8]}-{raw}"
    r = http.put(f"/v1/stream/{unique}", headers=TEXT, content=b"hi")
    assert r.status_code == status, r.text
    if status == 201:
        assert http.get(f"/v1/stream/{unique}").content == b"hi"


# ------------------------------------------------------------------ offsets

def test_resume_from_every_next_offset(http: httpx.Client, name: str) -> None:
    create(http, name, JSON)
    nexts = [ZERO] + [append(http, name, json.dumps(f"r{i}").encode(), JSON) for i in range(12)]
    assert nexts == [off(i) for i in range(13)]
    records = [f"r{i}" for i in range(12)]
    for i, nxt in enumerate(nexts):
        got, tail = read_json(http, name, nxt)
        assert got == records[i:] and tail == off(12)


def test_resume_across_partial_batches(http: httpx.Client, name: str) -> None:
    # Records of 600 KiB: one catch-up response carries at most ~1 MiB, so the
    # client has to follow Stream-Next-Offset to get the rest, and gets each
    # record exactly once.
    create(http, name, BYTES)
    records = [bytes([i]) * (600 * 1024) for i in range(5)]
    for rec in records:
        append(http, name, rec, BYTES)
    got, offset, responses = b"", "-1", 0
    while True:
        r = http.get(path(name), params={"offset": offset})
        assert r.status_code == 200
        got += r.content
        offset = r.headers["stream-next-offset"]
        responses += 1
        if r.headers.get("stream-up-to-date") == "true":
            break
    assert got == b"".join(records) and offset == off(5)
    assert responses > 1


def test_offset_now(http: httpx.Client, name: str) -> None:
    create(http, name, JSON, b"[1, 2]")
    r = http.get(path(name), params={"offset": "now"})
    assert r.status_code == 200 and r.content == b"[]"
    assert r.headers["stream-next-offset"] == off(2)
    assert r.headers["stream-up-to-date"] == "true"
    append(http, name, b"3", JSON)
    assert read_json(http, name, r.headers["stream-next-offset"]) == ([3], off(3))


@pytest.mark.parametrize("query", [
    "offset=abc", "offset=1_2_3", "offset=5_0000", "offset=", "offset=-1&offset=-1",
    "offset=_5", "offset=0000000000000000_", "offset=-2", "offset=0x10_1",
    f"offset={off(99)}",            # past the tail
    "live=long-poll", "offset=-1&live=forever",
])
def test_bad_offsets_get_400(http: httpx.Client, name: str, query: str) -> None:
    create(http, name, TEXT, b"x")
    r = http.get(f"{path(name)}?{query}")
    assert r.status_code == 400, r.text
    assert "error" in r.json()


def test_long_poll_times_out_with_204(http: httpx.Client, name: str) -> None:
    create(http, name, JSON, b"[1]")
    t0 = time.monotonic()
    r = http.get(path(name), params={"offset": off(1), "live": "long-poll"})
    elapsed = time.monotonic() - t0
    assert r.status_code == 204 and r.content == b""
    assert r.headers["stream-next-offset"] == off(1)
    assert r.headers["stream-up-to-date"] == "true"
    assert r.headers["stream-cursor"].isdigit()
    assert LONG_POLL_MS / 1000 * 0.9 <= elapsed < LONG_POLL_MS / 1000 + 5


def test_long_poll_with_data_returns_at_once(http: httpx.Client, name: str) -> None:
    create(http, name, JSON, b"[1, 2]")
    r = http.get(path(name), params={"offset": off(1), "live": "long-poll"})
    assert r.status_code == 200 and r.json() == [2]
    assert r.headers["stream-next-offset"] == off(2)


@pytest.mark.parametrize("start", ["tail", "now"])
def test_long_poll_wakes_on_append(srv: Server, http: httpx.Client, name: str,
                                   start: str) -> None:
    """A long-poll waiting at the tail answers with the first append that
    lands during its wait.  A poster keeps appending until the poll answers,
    so no sleep has to guess when the poll is parked."""
    create(http, name, JSON, b'["before"]')
    offset = off(1) if start == "tail" else "now"
    done = threading.Event()
    result: list[httpx.Response | BaseException] = []

    def poll() -> None:
        try:
            with srv.client() as c:
                result.append(c.get(path(name), params={"offset": offset, "live": "long-poll"}))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            result.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=poll)
    t.start()
    posted = 0
    try:
        while not done.wait(0.02):
            append(http, name, json.dumps(posted).encode(), JSON)
            posted += 1
    finally:
        t.join()
    r = result[0]
    assert isinstance(r, httpx.Response), r
    assert r.status_code == 200, r.text
    got = r.json()
    # A contiguous run of the poster's records, ending where the header says.
    assert got and got == list(range(got[0], got[0] + len(got)))
    assert off_n(r.headers["stream-next-offset"]) == 1 + got[-1] + 1
    if start == "tail":
        assert got[0] == 0


def test_long_poll_on_closed_stream_returns_at_once(http: httpx.Client, name: str) -> None:
    r = http.put(path(name), headers={**TEXT, "stream-closed": "true"}, content=b"end")
    assert r.status_code == 201 and r.headers["stream-closed"] == "true"
    t0 = time.monotonic()
    r = http.get(path(name), params={"offset": off(1), "live": "long-poll"})
    assert time.monotonic() - t0 < LONG_POLL_MS / 1000 * 0.9
    assert r.status_code == 204 and r.headers["stream-closed"] == "true"
    assert "stream-cursor" not in r.headers


# ---------------------------------------------------------------------- SSE

@pytest.mark.parametrize(("headers", "posts"), [
    (TEXT, [b"alpha ", b"beta\ngamma"]),
    (JSON, [b'{"a": 1}', b"[2, 3]"]),
    (BYTES, [b"\x00\xff\x10", b"\r\n\x80"]),
])
def test_sse_closed_stream(http: httpx.Client, name: str, headers: dict[str, str],
                           posts: list[bytes]) -> None:
    create(http, name, headers)
    for body in posts:
        nxt = append(http, name, body, headers)
    assert http.post(path(name), headers={"stream-closed": "true"}).status_code == 204
    r, events = read_sse(http, name)
    assert r.headers["content-type"] == "text/event-stream"
    binary = headers is BYTES
    assert (r.headers.get("stream-sse-data-encoding") == "base64") is binary
    kinds = [k for k, _ in events]
    assert kinds[-1] == "control" and set(kinds) == {"data", "control"}
    assert kinds[0] == "data"
    final = json.loads(events[-1][1])
    assert final["streamClosed"] is True and final["streamNextOffset"] == nxt
    data = [d for k, d in events if k == "data"]
    if headers is JSON:
        assert [x for d in data for x in json.loads(d)] == [{"a": 1}, 2, 3]
    elif binary:
        assert b"".join(base64.b64decode(d) for d in data) == b"".join(posts)
    else:
        assert "".join(data).encode() == b"".join(posts)


def test_sse_live_updates_in_order(http: httpx.Client, name: str) -> None:
    create(http, name, JSON, b'["r0"]')
    seen: list[Any] = []
    controls: list[dict[str, Any]] = []
    written = 1
    with http.stream("GET", path(name), params={"offset": "-1", "live": "sse"}) as r:
        assert r.status_code == 200
        for kind, data in sse_events(r):
            if kind == "data":
                seen += json.loads(data)
                continue
            assert kind == "control"
            ctl = json.loads(data)
            controls.append(ctl)
            assert off_n(ctl["streamNextOffset"]) == len(seen)
            if ctl.get("streamClosed"):
                break
            if ctl.get("upToDate"):
                # React to the server saying "you are at the tail".
                if written < 4:
                    append(http, name, json.dumps(f"r{written}").encode(), JSON)
                    written += 1
                else:
                    http.post(path(name), headers={"stream-closed": "true"})
        else:
            pytest.fail("the SSE response ended before the close")
    assert seen == ["r0", "r1", "r2", "r3"]
    assert controls[-1] == {"streamNextOffset": off(4), "streamClosed": True}
    assert all("streamCursor" in c for c in controls[:-1])


def test_sse_ends_after_sse_max_s(http: httpx.Client, name: str) -> None:
    create(http, name, TEXT, b"x")
    t0 = time.monotonic()
    r, events = read_sse(http, name)
    elapsed = time.monotonic() - t0
    assert SSE_MAX_S * 0.9 <= elapsed < SSE_MAX_S + 5
    assert events[0] == ("data", "x")
    for kind, data in events[1:]:
        assert kind == "control"
        ctl = json.loads(data)
        assert ctl["upToDate"] is True and ctl["streamNextOffset"] == off(1)
        assert "streamClosed" not in ctl


def test_sse_from_now_and_from_an_offset(http: httpx.Client, name: str) -> None:
    create(http, name, TEXT, b"a")
    append(http, name, b"b", TEXT)
    http.post(path(name), headers={**TEXT, "stream-closed": "true"}, content=b"c")
    _, events = read_sse(http, name, off(1))
    assert [e for e in events if e[0] == "data"] == [("data", "bc")]
    _, events = read_sse(http, name, "now")
    assert [json.loads(d) for _, d in events] == [
        {"streamNextOffset": off(3), "streamClosed": True}]


def test_sse_text_keeps_leading_spaces(http: httpx.Client, name: str) -> None:
    """SSE clients strip one space after ``data:`` (WHATWG HTML, "process the
    field"), so a text record starting with a space must survive that."""
    create(http, name, TEXT, b" indented\n  twice")
    http.post(path(name), headers={"stream-closed": "true"})
    _, events = read_sse(http, name)
    assert [d for k, d in events if k == "data"] == [" indented\n  twice"]


# ----------------------------------------------------------------- restarts

def test_clean_restart_keeps_everything(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = Server(data)
    try:
        with server.client() as c:
            create(c, "s", JSON)
            nexts = [append(c, "s", json.dumps([i, i + 1]).encode(), JSON)
                     for i in range(0, 40, 2)]
            create(c, "closed", TEXT, b"bye")
            c.post(path("closed"), headers={"stream-closed": "true"})
    finally:
        assert server.stop(signal.SIGTERM) == 0, "".join(server.log)
    server = Server(data)
    try:
        with server.client() as c:
            assert read_json(c, "s") == (list(range(40)), off(40))
            for i, nxt in enumerate(nexts):
                assert read_json(c, "s", nxt) == (list(range(2 * i + 2, 40)), off(40))
            assert append(c, "s", b"40", JSON) == off(41)
            h = c.head(path("closed"))
            assert h.headers["stream-closed"] == "true" and h.headers["stream-next-offset"] == off(1)
            assert c.post(path("closed"), headers=TEXT, content=b"more").status_code == 409
    finally:
        assert server.stop() == 0, "".join(server.log)


def test_sigkill_mid_append_loses_no_acknowledged_append(tmp_path: Path) -> None:
    """Rounds of: a client appends in a loop, the server is SIGKILLed at a
    random moment, a new server starts on the same data dir.  Every append
    that got a 2xx is there once, in order, at the offset it was given; the
    one in flight at the kill may or may not be."""
    rng = random.Random()
    data = tmp_path / "data"
    acked: list[tuple[int, str]] = []     # (value, Stream-Next-Offset)
    in_flight: set[int] = set()
    value = 0
    for round_ in range(3):
        server = Server(data)
        try:
            with server.client() as c:
                if round_ == 0:
                    create(c, "log", JSON)
                records, tail = read_json(c, "log")
                check_after_crash(records, acked, in_flight)
                for _, nxt in rng.sample(acked, min(len(acked), 5)):
                    assert read_json(c, "log", nxt)[0] == records[off_n(nxt):]
                value = max([*records, *in_flight], default=-1) + 1
                kill_at = len(acked) + rng.randint(5, 150)
                enough = threading.Event()
                stopped: list[BaseException | int] = []

                def appender(start: int) -> None:
                    v = start
                    try:
                        with server.client() as ac:
                            while True:
                                r = ac.post(path("log"), headers=JSON, content=str(v).encode())
                                if r.status_code != 204:
                                    stopped.append(AssertionError(f"{r.status_code} {r.text}"))
                                    return
                                acked.append((v, r.headers["stream-next-offset"]))
                                v += 1
                                if len(acked) >= kill_at:
                                    enough.set()
                    except httpx.TransportError:
                        in_flight.add(v)
                        stopped.append(v)
                    except BaseException as exc:  # noqa: BLE001 - reported below
                        stopped.append(exc)
                    finally:
                        enough.set()

                t = threading.Thread(target=appender, args=(value,))
                t.start()
                enough.wait(timeout=30)
                server.proc.send_signal(signal.SIGKILL)
                t.join(timeout=30)
                assert stopped and isinstance(stopped[0], int), stopped
        finally:
            server.stop(signal.SIGKILL)
    server = Server(data)
    try:
        with server.client() as c:
            records, tail = read_json(c, "log")
            check_after_crash(records, acked, in_flight)
            for _, nxt in acked[:: max(1, len(acked) // 10)]:
                assert read_json(c, "log", nxt) == (records[off_n(nxt):], tail)
            assert append(c, "log", b'"after"', JSON) == off(len(records) + 1)
    finally:
        assert server.stop() == 0, "".join(server.log)


def check_after_crash(records: list[int], acked: list[tuple[int, str]],
                      in_flight: set[int]) -> None:
    assert records == sorted(set(records)), "duplicated or reordered records"
    for v, nxt in acked:
        i = off_n(nxt) - 1
        assert i < len(records) and records[i] == v, f"acknowledged {v} lost or moved"
    assert set(records) - {v for v, _ in acked} <= in_flight


# ------------------------------------------------------------ many readers

async def test_hundred_concurrent_readers(srv: Server, name: str) -> None:
    """50 long-poll and 50 SSE readers follow one stream while it is appended
    to and then closed; each sees every record exactly once, in order.  SSE
    readers reconnect from their last control event's offset whenever the
    server ends a response (every SSE_MAX_S)."""
    readers, appends, per_append = 100, 10, 3
    expected = ["init"] + [f"r{i}" for i in range(appends * per_append)]
    results: dict[int, list[Any]] = {}
    problems: list[str] = []
    started = 0
    all_started = trio.Event()

    def ready() -> None:
        nonlocal started
        started += 1
        if started == readers:
            all_started.set()

    # Each reader has its own client (httpx's pool gets slow with 100
    # connections in it), sharing one TLS context (unused, but slow to make).
    # Readers note problems instead of raising, so that no reader is cancelled
    # in the middle of a response.
    tls = ssl.create_default_context()

    def client() -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=srv.url, timeout=30, verify=tls)

    async def long_poll(k: int) -> None:
        offset, got, first = "-1", [], True
        async with client() as c:
            while True:
                r = await c.get(path(name), params={"offset": offset, "live": "long-poll"})
                if r.status_code not in (200, 204):
                    problems.append(f"long-poll reader {k}: {r.status_code} {r.text}")
                    return
                if r.status_code == 200:
                    got += r.json()
                offset = r.headers["stream-next-offset"]
                if off_n(offset) != len(got):
                    problems.append(f"long-poll reader {k}: at {offset} after {len(got)}")
                if first:
                    first = False
                    ready()
                if r.headers.get("stream-closed") == "true":
                    results[k] = got
                    return

    async def sse(k: int) -> None:
        offset, got, first, closed = "-1", [], True, False
        async with client() as c:
            while not closed:
                async with c.stream("GET", path(name),
                                    params={"offset": offset, "live": "sse"}) as r:
                    if r.status_code != 200:
                        problems.append(f"sse reader {k}: {r.status_code}")
                        return
                    pending = 0   # records received since the last control event
                    async for kind, data in asse_events(r):
                        if kind == "data":
                            pending += len(json.loads(data))
                            got += json.loads(data)
                            continue
                        ctl = json.loads(data)
                        pending = 0
                        offset = ctl["streamNextOffset"]
                        if off_n(offset) != len(got):
                            problems.append(f"sse reader {k}: at {offset} after {len(got)}")
                        if first:
                            first = False
                            ready()
                        closed = closed or bool(ctl.get("streamClosed"))
                    if pending:
                        problems.append(
                            f"sse reader {k}: a response ended after a data event with no "
                            f"control event, so the client resumes from {offset} and reads "
                            f"those {pending} records again")
        results[k] = got

    async def writer(c: httpx.AsyncClient) -> None:
        await all_started.wait()
        for i in range(0, appends * per_append, per_append):
            body = json.dumps([f"r{j}" for j in range(i, i + per_append)]).encode()
            r = await c.post(path(name), headers=JSON, content=body)
            assert r.status_code == 204
        r = await c.post(path(name), headers={"stream-closed": "true"})
        assert r.status_code == 204

    async with client() as c:
        r = await c.put(path(name), headers=JSON, content=b'["init"]')
        assert r.status_code == 201
        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                for k in range(readers):
                    nursery.start_soon(long_poll if k % 2 else sse, k)
                nursery.start_soon(writer, c)
    assert not problems, "\n".join(problems)
    assert len(results) == readers
    for k, got in results.items():
        assert got == expected, f"reader {k} ({'long-poll' if k % 2 else 'sse'})"


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("garbage", [
    b"\x00\xffNOT HTTP AT ALL\r\n\r\n",
    b"GET /v1/stream/x HTTP/1.1\r\nno colon here\r\n\r\n",
    b"POST /v1/stream/x HTTP/1.1\r\nhost: localhost\r\ncontent-length: nope\r\n\r\n",
    b"GET /v1/stream/x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
])
def test_garbage_gets_400_and_others_keep_working(srv: Server, garbage: bytes) -> None:
    with connect(srv.port) as keep:
        f = keep.makefile("rb")
        req = b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n"
        keep.sendall(req)
        assert read_response(f)[0] == 200
        answer = exchange(srv.port, garbage)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert b'"bad_request"' in answer
        keep.sendall(req)        # the kept-alive connection is unaffected
        assert read_response(f)[0] == 200
        f.close()


def test_requests_before_garbage_are_answered_first(srv: Server) -> None:
    answer = exchange(srv.port, b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n"
                                b"\x00\xffNOT HTTP\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert answer.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 400 " in answer, answer


@pytest.mark.parametrize("stall", ["headers", "body"])
def test_slow_loris_does_not_block_others(srv: Server, http: httpx.Client, name: str,
                                          stall: str) -> None:
    create(http, name, TEXT)
    body = b"slow but steady"
    head = (f"POST {path(name)} HTTP/1.1\r\nhost: localhost\r\ncontent-type: text/plain\r\n"
            f"content-length: {len(body)}\r\n").encode()
    wire = head + b"x-slow: " + b"z" * 12 + b"\r\n\r\n" + body
    cut = len(head) if stall == "headers" else len(wire) - len(body)
    with connect(srv.port) as slow:
        slow.sendall(wire[:cut])
        for byte in wire[cut:]:
            # Meanwhile another client is served, every time (the client's
            # timeout bounds the wait; the last byte may complete the POST,
            # so the read comes before it).
            r = http.get(path(name), params={"offset": "-1"})
            assert r.status_code == 200 and r.content == b""
            slow.sendall(bytes([byte]))
        f = slow.makefile("rb")
        status, headers, _ = read_response(f)
        f.close()
    assert status == 204 and headers["stream-next-offset"] == off(1)
    assert http.get(path(name)).content == body


def test_declared_oversized_body_gets_413_before_it_is_sent(srv: Server, http: httpx.Client,
                                                            name: str) -> None:
    create(http, name, BYTES)
    with connect(srv.port) as s:
        s.sendall(f"POST {path(name)} HTTP/1.1\r\nhost: localhost\r\n"
                  f"content-type: application/octet-stream\r\n"
                  f"content-length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode())
        answer = recv_all(s)      # the server answers and closes with no body sent
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"body_too_large" in answer
    assert http.head(path(name)).headers["stream-next-offset"] == ZERO


def test_streamed_oversized_body_gets_413(srv: Server, http: httpx.Client, name: str) -> None:
    create(http, name, BYTES)
    mib = b"\xab" * (1 << 20)
    chunk = b"%x\r\n%b\r\n" % (len(mib), mib)
    with connect(srv.port) as s:
        s.sendall(f"POST {path(name)} HTTP/1.1\r\nhost: localhost\r\n"
                  "content-type: application/octet-stream\r\n"
                  "transfer-encoding: chunked\r\n\r\n".encode())
        for _ in range(MAX_BODY_BYTES >> 20):
            s.sendall(chunk)
        s.sendall(b"1\r\nx\r\n")  # one byte over; nothing more, so the close is clean
        answer = recv_all(s)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert http.head(path(name)).headers["stream-next-offset"] == ZERO
    assert healthy(srv.port)


def test_record_over_the_record_limit_gets_413(http: httpx.Client, name: str) -> None:
    create(http, name, BYTES, b"keep")
    r = http.post(path(name), headers=BYTES, content=b"\0" * (17 << 20))
    assert r.status_code == 413, r.text
    assert http.get(path(name)).content == b"keep"


@pytest.mark.parametrize("body", [
    b"{", b"[1,", b'{"a" 1}', b"\xff\xfe", b"[]", b"", b"undefined", b"'single'",
    b"NaN", b"[1, Infinity]",
    pytest.param(b"[" * 100_000, id="too-deep-array"),
    pytest.param(b'{"a":' * 100_000, id="too-deep-object"),
])
def test_bad_json_gets_400_and_leaves_the_stream_alone(http: httpx.Client, name: str,
                                                       body: bytes) -> None:
    create(http, name, JSON, b'["ok"]')
    r = http.post(path(name), headers=JSON, content=body)
    assert r.status_code == 400, f"{r.status_code} {r.text}"
    assert http.head(path(name)).headers["stream-next-offset"] == off(1)
    assert http.get(path(name)).json() == ["ok"]


def test_json_with_too_many_values_is_refused_before_parsing(http: httpx.Client,
                                                             name: str) -> None:
    # A million-value body would cost over 100 MB parsed; it is refused on a count.
    create(http, name, JSON, b'["ok"]')
    r = http.post(path(name), headers=JSON, content=b"[" + b"{}," * 1_000_000 + b"{}]")
    assert r.status_code == 413 and r.json()["error"]["code"] == "json_too_large", r.text
    assert http.get(path(name)).json() == ["ok"]


def test_json_lone_surrogate_is_not_a_server_error(http: httpx.Client, name: str) -> None:
    # Grammatically valid JSON (RFC 8259 section 8.2) that is not valid Unicode.
    create(http, name, JSON, b'["ok"]')
    r = http.post(path(name), headers=JSON, content=b'"\\ud800"')
    assert r.status_code in (204, 400), f"{r.status_code} {r.text}"
    got = http.get(path(name))
    assert got.status_code == 200
    json.loads(got.content)


@pytest.mark.parametrize(("headers", "body", "status"), [
    ({}, b"x", 400),                                      # no content type
    (JSON, b"1", 409),                                    # content type mismatch
    (TEXT, b"", 400),                                     # empty append
])
def test_bad_appends(http: httpx.Client, name: str, headers: dict[str, str], body: bytes,
                     status: int) -> None:
    create(http, name, TEXT, b"ok")
    r = http.post(path(name), headers=headers, content=body)
    assert r.status_code == status, r.text
    assert http.get(path(name)).content == b"ok"


def test_append_to_missing_stream_is_404(http: httpx.Client, name: str) -> None:
    assert http.post(path(name), headers=TEXT, content=b"x").status_code == 404
    assert http.get(path(name)).status_code == 404


@pytest.mark.parametrize("headers", [TEXT, JSON])
def test_append_to_closed_stream_gets_409(http: httpx.Client, name: str,
                                          headers: dict[str, str]) -> None:
    create(http, name, headers)
    r = http.post(path(name), headers={**headers, "stream-closed": "true"}, content=b'"last"')
    assert r.status_code == 204
    assert r.headers["stream-closed"] == "true" and r.headers["stream-next-offset"] == off(1)
    r = http.post(path(name), headers=headers, content=b'"more"')
    assert r.status_code == 409, r.text
    assert r.headers["stream-closed"] == "true"
    assert r.headers["stream-next-offset"] == off(1)
    r = http.get(path(name))
    assert r.headers["stream-closed"] == "true"
    assert r.content == (b'["last"]' if headers is JSON else b'"last"')


@pytest.mark.parametrize("method", ["PATCH", "TRACE", "PROPFIND"])
def test_unknown_methods_get_405(http: httpx.Client, name: str, method: str) -> None:
    create(http, name, TEXT)
    r = http.request(method, path(name))
    assert r.status_code == 405, r.text
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert http.post("/healthz").status_code == 405


# ------------------------------------------- restarts: producers and followers

def test_producer_dedupe_survives_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"

    def produce(c: httpx.Client, seq: int, body: bytes) -> httpx.Response:
        return c.post(path("p"), content=body, headers={
            **TEXT, "producer-id": "agent-1", "producer-epoch": "0", "producer-seq": str(seq)})

    server = Server(data)
    try:
        with server.client() as c:
            create(c, "p", TEXT)
            assert produce(c, 0, b"a").status_code == 200
            assert produce(c, 1, b"b").status_code == 200
    finally:
        assert server.stop(signal.SIGKILL) != 0
    server = Server(data)
    try:
        with server.client() as c:
            retry = produce(c, 1, b"b")              # the retry of an acknowledged append
            assert retry.status_code == 204 and retry.headers["producer-seq"] == "1"
            gap = produce(c, 5, b"x")
            assert gap.status_code == 409 and gap.headers["producer-expected-seq"] == "2"
            assert produce(c, 2, b"c").status_code == 200
            assert c.get(path("p"), params={"offset": "-1"}).content == b"abc"
    finally:
        assert server.stop() == 0, "".join(server.log)


def test_followers_resume_across_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = Server(data, "--long-poll-timeout-ms", "300", "--sse-max-s", "1")
    try:
        with server.client() as c:
            create(c, "f", TEXT)
            for word in (b"one ", b"two "):
                append(c, "f", word, TEXT)
            seen_lp = c.get(path("f"), params={"offset": "-1", "live": "long-poll"})
            lp_offset = seen_lp.headers["stream-next-offset"]
            _, events = read_sse(c, "f")        # ends after --sse-max-s
            assert "".join(d for k, d in events if k == "data") == "one two "
            last_control = [json.loads(d) for k, d in events if k == "control"][-1]
            sse_offset = last_control["streamNextOffset"]
    finally:
        assert server.stop(signal.SIGTERM) == 0
    server = Server(data, "--long-poll-timeout-ms", "300", "--sse-max-s", "1")
    try:
        with server.client() as c:
            append(c, "f", b"three", TEXT)
            c.post(path("f"), headers={"stream-closed": "true"})
            lp = c.get(path("f"), params={"offset": lp_offset, "live": "long-poll"})
            assert lp.status_code == 200 and lp.content == b"three"
            _, events = read_sse(c, "f", sse_offset)
            assert [d for k, d in events if k == "data"] == ["three"]
    finally:
        assert server.stop() == 0, "".join(server.log)


def test_read_below_retention_gets_410_with_the_earliest_offset(tmp_path: Path) -> None:
    server = Server(tmp_path / "data", "--segment-bytes", "1024", "--retention-bytes", "2048")
    try:
        with server.client() as c:
            create(c, "r", TEXT)
            for i in range(100):
                append(c, "r", b"%03d" % i * 20, TEXT)
            gone = c.get(path("r"), params={"offset": off(0)})
            assert gone.status_code == 410
            earliest = gone.headers["stream-earliest-offset"]
            assert earliest > off(0)
            again = c.get(path("r"), params={"offset": earliest})
            assert again.status_code == 200
            first = int(earliest.split("_")[1])
            assert again.content.startswith(b"%03d" % first * 20)
    finally:
        assert server.stop() == 0, "".join(server.log)

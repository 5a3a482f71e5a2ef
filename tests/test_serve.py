"""`broker serve` as a real process, and its sans-IO request reader."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from _serveproc import serving
from broker._http import BadRequest, RequestReader


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    with serving(tmp_path / "data") as started:
        yield started


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_healthz_garbage_and_clean_shutdown(server: tuple[subprocess.Popen[str], int]) -> None:
    proc, port = server
    ok = exchange(port, b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 ") and ok.endswith(b'{"status":"ok"}')
    bad = exchange(port, b"\x00\xffNOT HTTP AT ALL\r\n\r\n")
    assert bad.startswith(b"HTTP/1.1 400 ") and b'"bad_request"' in bad
    missing = exchange(port, b"GET /nope HTTP/1.1\r\nhost: localhost\r\n\r\n")
    assert missing.startswith(b"HTTP/1.1 404 ") and b'"not_found"' in missing
    # Garbage on one connection leaves the server answering others.
    again = exchange(port, b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
    assert again.startswith(b"HTTP/1.1 200 ")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_pipelined_requests_split_at_every_byte() -> None:
    wire = (b"POST /a HTTP/1.1\r\nhost: localhost\r\ncontent-length: 5\r\n\r\nhello"
            b"GET /b?x=1 HTTP/1.1\r\nhost: localhost\r\n\r\n")
    for cut in range(len(wire) + 1):
        reader = RequestReader()
        got = reader.feed(wire[:cut]) + reader.feed(wire[cut:])
        assert [(r.method, r.target, bytes(r.body)) for r in got] == [
            ("POST", "/a", b"hello"), ("GET", "/b?x=1", b"")]


def test_oversized_headers_are_refused() -> None:
    reader = RequestReader()
    with pytest.raises(BadRequest):
        reader.feed(b"GET / HTTP/1.1\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n")


def test_option_precedence_file_env_flags(tmp_path: Path) -> None:
    from broker._cli import resolve_options

    cfg = tmp_path / "broker.toml"
    cfg.write_text('port = 1111\nhost = "0.0.0.0"\nfsync = "always"\nsse-max-s = 5\n')
    opts = resolve_options({"config": str(cfg), "port": None, "host": "127.0.0.2"},
                           {"BROKER_PORT": "2222", "BROKER_FSYNC": "never"})
    assert (opts.port, opts.host, opts.fsync, opts.sse_max_s) == (2222, "127.0.0.2", "never", 5.0)
    assert resolve_options({}, {}).port == 4437
    with pytest.raises(ValueError):
        resolve_options({"fsync": "sometimes"}, {})


def test_shutdown_ends_a_waiting_long_poll(server: tuple[subprocess.Popen[str], int]) -> None:
    proc, port = server
    assert exchange(port, b"PUT /v1/stream/s HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\n"
                          b"connection: close\r\n\r\n").startswith(b"HTTP/1.1 201 ")
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        # A first exchange makes sure the server has accepted this connection.
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        s.sendall(b"GET /v1/stream/s?offset=now&live=long-poll HTTP/1.1\r\nhost: localhost\r\n\r\n")
        proc.send_signal(signal.SIGTERM)        # the long-poll would wait 30 s
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 204 ")
    assert proc.wait(timeout=30) == 0


async def test_shutdown_closes_websockets_with_1001(
        server: tuple[subprocess.Popen[str], int]) -> None:
    from _wsraw import RawWs

    proc, port = server
    ws = await RawWs.connect(port)
    try:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await ws.close_code() == 1001
    finally:
        await ws.aclose()
    assert proc.wait(timeout=30) == 0


async def test_a_websocket_reset_leaves_the_server_serving(
        server: tuple[subprocess.Popen[str], int]) -> None:
    import struct

    from _wsraw import RawWs
    from broker import _frames

    proc, port = server
    for _ in range(3):
        ws = await RawWs.connect(port)
        await ws.send(_frames.Publish(1, "s", (b"x" * 1000,) * 100, create=True))
        await ws.send(_frames.Attach(2, "s", offset=-1))
        ws.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
        await ws.aclose()                                   # RST, data unread
    # Nothing to wait on in another process: give it time to meet the resets.
    await trio.sleep(0.5)
    assert exchange(port, b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n").startswith(
        b"HTTP/1.1 200 ")
    assert proc.poll() is None


async def test_limit_flags_reach_the_server(tmp_path: Path) -> None:
    from _wsraw import RawWs
    from broker import _frames

    flags = ("--max-body-bytes", "200", "--max-record-bytes", "50", "--max-batch-records", "2",
             "--http-publish-rate", "0.01", "--http-publish-burst", "4",
             "--ws-max-sessions", "1")
    with serving(tmp_path / "data", *flags) as (proc, port):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)   # one connection
        json_ct = {"content-type": "application/json"}

        def answer(method: str, body: bytes = b"") -> tuple[int, str]:
            c.request(method, "/v1/stream/j", body=body, headers=json_ct)
            r = c.getresponse()
            data = r.read()
            return r.status, json.loads(data)["error"]["code"] if data else ""

        assert answer("PUT") == (201, "")                        # takes no publish token
        assert answer("POST", b"[1,2,3]") == (413, "batch_too_large")
        assert answer("POST", json.dumps(["x" * 60]).encode()) == (413, "record_too_large")
        assert answer("POST", b"[1]") == (204, "")
        assert answer("POST", b"[2]") == (204, "")               # the fourth POST
        assert answer("POST", b"[3]") == (429, "rate_limited")
        c.close()
        big = exchange(port, b"POST /v1/stream/j HTTP/1.1\r\nhost: localhost\r\n"
                             b"content-type: application/json\r\ncontent-length: 201\r\n\r\n")
        assert big.startswith(b"HTTP/1.1 413 ") and b"body_too_large" in big
        ws = await RawWs.connect(port)
        try:
            await ws.send(_frames.Attach(1, "j", offset=-1))
            assert isinstance(await ws.frame(), _frames.Attached)
            await ws.send(_frames.Attach(2, "k", offset=-1, create=True))
            while not isinstance(frame := await ws.frame(), _frames.Error):
                pass
            assert frame.code == "too_many_sessions"
        finally:
            await ws.aclose()


def test_open_serve_on_loopback_refuses_foreign_pages(
        server: tuple[subprocess.Popen[str], int]) -> None:
    _, port = server
    evil = exchange(port, b"PUT /v1/stream/s HTTP/1.1\r\nhost: localhost\r\norigin: https://evil.example\r\n"
                          b"content-length: 0\r\n\r\n")
    assert evil.startswith(b"HTTP/1.1 403 ") and b"origin_refused" in evil
    mine = exchange(port, f"PUT /v1/stream/s HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
                          f"content-length: 0\r\n\r\n".encode())
    assert mine.startswith(b"HTTP/1.1 201 ")


def test_insecure_no_auth_lets_a_local_proxy_decide(tmp_path: Path) -> None:
    # Behind a reverse proxy on the same machine, Host is the public name.
    with serving(tmp_path / "data", "--insecure-no-auth") as (_, port):
        answer = exchange(port, b"PUT /v1/stream/s HTTP/1.1\r\nhost: chat.example\r\n"
                                b"origin: https://chat.example\r\ncontent-length: 0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 201 "), answer

"""HTTPS and WSS on one port (broker/_server.py with an ``ssl_context``),
with certificates from a throwaway CA (trustme).

Most tests run the server in the test's own Trio run; the last starts a real
``broker serve --tls-cert --tls-key``.  Clients trust the CA explicitly: httpx
for HTTPS, trio-websocket with the broker's msgpack frames for WSS, and raw
Trio sockets where the test is about what the server does with a client that
does not speak TLS, or stops halfway.
"""

from __future__ import annotations

import signal
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket
import trustme

from broker import _frames, client
from broker._handshake import SUBPROTOCOL
from broker._limits import HttpLimits
from broker._server import make_ssl_context
from _serveproc import serving
from conftest import Served, serve_in_process

WAIT = 15           # seconds: a bound on any wait, far above every timeout used here


@dataclass
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path_factory.mktemp("pki")
    pki = Pki(d / "ca.pem", d / "cert.pem", d / "key.pem")
    ca.cert_pem.write_to_path(str(pki.ca_file))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(pki.cert_file), append=i > 0)
    cert.private_key_pem.write_to_path(str(pki.key_file))
    return pki


@pytest.fixture
async def tls(tmp_path: Path, pki: Pki) -> AsyncIterator[Served]:
    context = make_ssl_context(str(pki.cert_file), str(pki.key_file))
    limits = HttpLimits(header_timeout_s=0.5)
    async with serve_in_process(tmp_path / "data", limits=limits, ssl_context=context) as s:
        yield s


async def https_get(pki: Pki, port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}",
                                 verify=pki.client_context(), timeout=WAIT) as http:
        return await http.get(path)


async def read_to_close(stream: trio.abc.Stream) -> bytes:
    out = b""
    with trio.fail_after(WAIT):
        while chunk := await stream.receive_some(65536):
            out += chunk
    return out


# ------------------------------------------------------------ HTTPS and WSS

async def test_https_append_and_read(tls: Served, pki: Pki) -> None:
    async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{tls.port}",
                                 verify=pki.client_context(), timeout=WAIT) as http:
        assert (await http.put("/v1/stream/s", headers={"content-type": "text/plain"})
                ).status_code == 201
        for text in ("hello ", "over TLS"):
            r = await http.post("/v1/stream/s", content=text.encode(),
                                headers={"content-type": "text/plain"})
            assert r.status_code == 204, r.text
        r = await http.get("/v1/stream/s", params={"offset": "-1"})
        assert r.status_code == 200 and r.content == b"hello over TLS"
        assert r.headers["stream-up-to-date"] == "true"


async def _ws_frame(ws: trio_websocket.WebSocketConnection) -> _frames.Frame:
    with trio.fail_after(WAIT):
        message = await ws.get_message()
    assert isinstance(message, bytes)
    return _frames.decode(message)


async def test_wss_publish_and_subscribe(tls: Served, pki: Pki) -> None:
    url = f"wss://127.0.0.1:{tls.port}/v1/ws"
    context = pki.client_context()
    async with trio_websocket.open_websocket_url(url, ssl_context=context,
                                                 subprotocols=[SUBPROTOCOL]) as pub, \
            trio_websocket.open_websocket_url(url, ssl_context=context,
                                              subprotocols=[SUBPROTOCOL]) as sub:
        for ws, name in ((pub, "pub"), (sub, "sub")):
            await ws.send_message(_frames.encode(_frames.Hello(name)))
            assert isinstance(await _ws_frame(ws), _frames.Welcome)
        await pub.send_message(_frames.encode(_frames.Publish(1, "w", (b"one",), create=True)))
        ack = await _ws_frame(pub)
        assert isinstance(ack, _frames.Ack) and ack.offset == 0
        await sub.send_message(_frames.encode(_frames.Attach(1, "w", offset=0)))
        assert isinstance(await _ws_frame(sub), _frames.Attached)
        got = [await _ws_frame(sub), await _ws_frame(sub)]
        assert isinstance(got[0], _frames.Data) and got[0].records[0].payload == b"one"
        assert isinstance(got[1], _frames.UpToDate) and got[1].next == 1
        # A live record fans out to the subscriber over TLS as well.
        await pub.send_message(_frames.encode(_frames.Publish(2, "w", (b"two",))))
        assert isinstance(await _ws_frame(pub), _frames.Ack)
        live = await _ws_frame(sub)
        assert isinstance(live, _frames.Data) and live.records[0].payload == b"two"


async def test_the_python_client_over_wss(tls: Served, pki: Pki) -> None:
    url = f"wss://127.0.0.1:{tls.port}/v1/ws"
    async with client.connect(url, client_id="agent", ssl_context=pki.client_context()) as c:
        s = c.session("py")
        offsets = await s.publish([b"a", b"b"], create=True)
        sub = s.subscribe(0)
        with trio.fail_after(WAIT):
            got = [(await sub.__anext__()).payload for _ in range(2)]
    assert offsets == range(0, 2) and got == [b"a", b"b"]
    # A certificate the client does not trust is refused, not retried.
    with pytest.raises(client.ClientError) as e:
        async with client.connect(url):
            pass                                                    # pragma: no cover
    assert e.value.code == "tls_failed"


# ------------------------------------------------------- clients that fail

async def test_plain_http_to_the_tls_port_gets_400(tls: Served, pki: Pki) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", tls.port)
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        answer = await read_to_close(stream)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b'"tls_required"' in answer and b"connection: close" in answer
    assert (await https_get(pki, tls.port, "/healthz")).status_code == 200


def _client_hello() -> bytes:
    """The first flight of a real TLS client: a ClientHello record."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing,
                                                server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("sent", ["nothing", "half_a_hello", "a_bad_record"])
async def test_a_client_that_never_completes_the_handshake_is_closed(
        tls: Served, pki: Pki, sent: str) -> None:
    hello = _client_hello()
    data = {"nothing": b"", "half_a_hello": hello[: len(hello) // 2],
            "a_bad_record": b"\x16\x03\x01\x00\x05hello"}[sent]
    stream = await trio.open_tcp_stream("127.0.0.1", tls.port)
    async with stream:
        if data:
            await stream.send_all(data)
        # Closed after header_timeout_s (or at once for garbage), quietly:
        # there is no TLS session to carry an answer in.
        answer = await read_to_close(stream)
    assert answer == b"" or answer.startswith(b"\x15"), answer     # at most a TLS alert
    assert (await https_get(pki, tls.port, "/healthz")).status_code == 200


async def test_a_slow_head_over_tls_gets_408(tls: Served, pki: Pki) -> None:
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", tls.port),
                            pki.client_context(), server_hostname="127.0.0.1",
                            https_compatible=True)
    async with stream:
        await stream.send_all(b"GET /heal")
        answer = await read_to_close(stream)
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in answer


async def test_a_tls_connection_beyond_the_limit_gets_503(tmp_path: Path, pki: Pki) -> None:
    context = make_ssl_context(str(pki.cert_file), str(pki.key_file))
    async with serve_in_process(tmp_path / "data", limits=HttpLimits(max_connections=1),
                                ssl_context=context) as s:
        keep = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", s.port),
                              pki.client_context(), server_hostname="127.0.0.1",
                              https_compatible=True)
        async with keep:
            await keep.do_handshake()
            with trio.fail_after(WAIT):
                while s.server.connections < 1:
                    await trio.sleep(0.01)
            over = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", s.port),
                                  pki.client_context(), server_hostname="127.0.0.1",
                                  https_compatible=True)
            async with over:
                answer = await read_to_close(over)
    assert answer.startswith(b"HTTP/1.1 503 ") and b'"too_many_connections"' in answer


# ------------------------------------------------------------ broker serve

@pytest.fixture
def tls_server(tmp_path: Path, pki: Pki) -> Iterator[tuple[subprocess.Popen[str], int]]:
    with serving(tmp_path / "data", "--tls-cert", str(pki.cert_file),
                 "--tls-key", str(pki.key_file)) as started:
        yield started


def test_broker_serve_with_tls(tls_server: tuple[subprocess.Popen[str], int],
                               pki: Pki) -> None:
    proc, port = tls_server
    with httpx.Client(verify=pki.client_context(), timeout=WAIT) as http:
        r = http.get(f"https://127.0.0.1:{port}/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0

"""An open broker (no auth) on loopback answers only this machine's clients:
not other web pages (CORS) and not foreign names resolved to 127.0.0.1 (DNS
rebinding).  ``broker serve`` turns this on whenever auth is off on a
loopback address (docs/security.md, "Defaults")."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from broker._auth import Authenticator
from conftest import Served, serve_in_process


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[Served]:
    async with serve_in_process(tmp_path / "data", local_only=True) as s:
        yield s


async def ask(port: int, method: str, target: str, *headers: str) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers)
    if not any(h.lower().startswith("host:") for h in headers):
        head += f"host: 127.0.0.1:{port}\r\n"
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all((head + "content-length: 0\r\nconnection: close\r\n\r\n").encode())
        out = b""
        with trio.fail_after(15):
            while chunk := await stream.receive_some(65536):
                out += chunk
    return out


FOREIGN = ["origin: https://evil.example", "origin: null", "origin: http://127.0.0.1.evil.example",
           "host: evil.example", "host: localhost.evil.example:4437"]


@pytest.mark.parametrize("header", FOREIGN)
@pytest.mark.parametrize("method", ["PUT", "GET"])
async def test_foreign_pages_and_names_are_refused(local: Served, header: str,
                                                   method: str) -> None:
    answer = await ask(local.port, method, "/v1/stream/s", header)
    assert answer.startswith(b"HTTP/1.1 403 ") and b'"origin_refused"' in answer, answer
    assert not (Path(local.broker.data_dir) / "sessions").exists() or \
        not any((Path(local.broker.data_dir) / "sessions").iterdir())


@pytest.mark.parametrize("header", FOREIGN)
async def test_a_foreign_websocket_upgrade_is_refused(local: Served, header: str) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    answer = await ask(local.port, "GET", "/v1/ws", header, "upgrade: websocket",
                       "connection: Upgrade", f"sec-websocket-key: {key}",
                       "sec-websocket-version: 13", "sec-websocket-protocol: broker.v1")
    assert answer.startswith(b"HTTP/1.1 403 ") and b'"origin_refused"' in answer, answer


@pytest.mark.parametrize("headers", [
    (), ("origin: http://localhost:3000",), ("origin: http://127.0.0.1:8080",),
    ("origin: http://[::1]:5173",), ("host: localhost:4437",), ("host: [::1]",),
])
async def test_this_machine_is_served(local: Served, headers: tuple[str, ...]) -> None:
    answer = await ask(local.port, "PUT", "/v1/stream/s", *headers)
    assert answer.startswith((b"HTTP/1.1 201 ", b"HTTP/1.1 200 ")), answer


async def test_health_is_answered_to_anyone(local: Served) -> None:
    answer = await ask(local.port, "GET", "/healthz", "origin: https://evil.example")
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_a_preflight_is_answered_and_the_request_refused(local: Served) -> None:
    # The preflight carries no data, and the request it prepares is refused.
    pre = await ask(local.port, "OPTIONS", "/v1/stream/s", "origin: https://evil.example",
                    "access-control-request-method: PUT")
    assert pre.startswith(b"HTTP/1.1 204 "), pre
    answer = await ask(local.port, "PUT", "/v1/stream/s", "origin: https://evil.example")
    assert answer.startswith(b"HTTP/1.1 403 "), answer


async def test_with_auth_other_origins_are_served(tmp_path: Path) -> None:
    # With tokens, a browser app on any origin may use the broker (CORS).
    async with serve_in_process(tmp_path / "data", auth=Authenticator("k" * 32)) as s:
        answer = await ask(s.port, "GET", "/v1/stream/s", "origin: https://app.example")
        assert answer.startswith(b"HTTP/1.1 401 "), answer

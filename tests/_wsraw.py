"""A raw WebSocket test client: our handshake helpers and the compiled parser
over a plain Trio TCP stream, so tests can send anything (broken frames,
text, garbage) and see exactly what the server sends back."""

from __future__ import annotations

import os
from typing import Any

import msgpack
import trio

from broker import _core, _frames
from broker._handshake import check_server_response, client_request


class RawWs:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = _core.FrameParser(True, 1 << 26)
        self.pending: list[tuple[int, bytes]] = []

    @classmethod
    async def connect(cls, port: int, hello: bool | _frames.Hello = True, client: str = "raw",
                      path: str = "/v1/ws") -> RawWs:
        """Upgrade on ``path``; then, unless ``hello`` is False, send a hello
        (``hello`` itself, or one naming ``client``) and read the welcome."""
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        request, key = client_request(f"127.0.0.1:{port}", path)
        await stream.send_all(request)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(4096)
            assert chunk, "closed during the handshake"
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        check_server_response(head, key)
        ws = cls(stream)
        if rest:
            ws.pending.extend(ws.parser.feed(rest))
        if hello is not False:
            await ws.send(hello if isinstance(hello, _frames.Hello) else _frames.Hello(client))
            welcome = await ws.frame()
            assert isinstance(welcome, _frames.Welcome), welcome
        return ws

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_message(self, body: bytes, op: int = _core.OP_BINARY) -> None:
        await self.stream.send_all(_core.build_frame(op, body, mask=os.urandom(4)))

    async def send(self, frame: _frames.Frame | dict[str, Any]) -> None:
        body = msgpack.packb(frame) if isinstance(frame, dict) else _frames.encode(frame)
        await self.send_message(body)

    async def message(self) -> tuple[int, bytes]:
        """The next message (opcode, payload); (-1, b"") when the server closed TCP."""
        while not self.pending:
            data = await self.stream.receive_some(65536)
            if not data:
                return -1, b""
            self.pending.extend(self.parser.feed(data))
            assert self.parser.error is None, self.parser.error
        return self.pending.pop(0)

    async def frame(self) -> _frames.Frame:
        """The next msgpack frame; server pings are returned too."""
        op, payload = await self.message()
        assert op == _core.OP_BINARY, (op, payload)
        return _frames.decode(payload)

    async def close_code(self) -> int:
        """Read until the server's close frame; its code."""
        while True:
            op, payload = await self.message()
            if op == _core.OP_CLOSE:
                return _core.parse_close(payload)[0]
            assert op != -1, "TCP closed without a close frame"

    async def aclose(self) -> None:
        await self.stream.aclose()

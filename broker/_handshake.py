"""The WebSocket opening handshake (RFC 6455 section 4), sans-IO, both sides.

Theory of operation
-------------------
The HTTP listener parses the upgrade request like any other and hands its
method and headers (names lower-cased) to ``server_handshake``, which either
returns the whole ``101 Switching Protocols`` response to write, or raises
``HandshakeError`` with the status, stable code and message of the refusal.
After the 101 the socket carries WebSocket frames and this module is done.

The checks are RFC 6455's: a GET, ``Upgrade: websocket``, ``Connection:
upgrade`` (both comma lists, any case, possibly over several header lines),
``Sec-WebSocket-Version: 13`` and a key that is base64 of 16 bytes.  Then the
subprotocol: the client must offer ``broker.v1``, which names the protocol
version, so a later incompatible protocol is a new name the same server can
also accept.  Subprotocol names compare exactly, as browsers compare them.
No extension is ever accepted: an offered ``permessage-deflate`` is ignored,
which RFC 6455 allows.

``client_request`` and ``check_server_response`` are the client's half, for
test and benchmark clients that speak WebSocket over a raw socket.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from typing import Final

SUBPROTOCOL: Final = "broker.v1"
VERSION: Final = "13"
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # RFC 6455 section 1.3


class HandshakeError(Exception):
    """A refused handshake: ``status`` and ``headers`` are the HTTP answer,
    ``code`` (``bad_handshake`` or ``bad_subprotocol``) the stable reason."""

    def __init__(self, status: int, code: str, message: str,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` answering ``Sec-WebSocket-Key`` ``key``."""
    digest = hashlib.sha1(key.encode("ascii") + _GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def _values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [v.decode("latin-1").strip() for k, v in headers if k == name]


def _tokens(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str]:
    """A comma-list header's elements over all its lines (RFC 9110 5.3)."""
    return [t.strip() for v in _values(headers, name) for t in v.split(",") if t.strip()]


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (ValueError, binascii.Error):   # UnicodeEncodeError is a ValueError
        return False


def server_handshake(method: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The 101 response to an upgrade request, or HandshakeError."""
    def bad(message: str) -> HandshakeError:
        return HandshakeError(400, "bad_handshake", message)

    if method != "GET":
        raise bad(f"a WebSocket handshake is a GET, not {method[:20]}")
    if not _values(headers, b"host"):
        raise bad("a WebSocket handshake needs a Host header")
    if "websocket" not in (t.lower() for t in _tokens(headers, b"upgrade")):
        raise bad("a WebSocket handshake needs 'Upgrade: websocket'")
    if "upgrade" not in (t.lower() for t in _tokens(headers, b"connection")):
        raise bad("a WebSocket handshake needs 'Connection: Upgrade'")
    versions = _tokens(headers, b"sec-websocket-version")
    if not versions:
        raise bad("a WebSocket handshake needs 'Sec-WebSocket-Version: 13'")
    if VERSION not in versions:
        # RFC 6455 4.2.2: say which versions this server speaks.
        raise HandshakeError(426, "bad_handshake", "only WebSocket version 13 is supported",
                             (("Sec-WebSocket-Version", VERSION),))
    keys = _values(headers, b"sec-websocket-key")
    if len(keys) != 1 or not _valid_key(keys[0]):
        raise bad("Sec-WebSocket-Key must be one base64-encoded 16-byte value")
    if SUBPROTOCOL not in _tokens(headers, b"sec-websocket-protocol"):
        raise HandshakeError(400, "bad_subprotocol",
                             f"the client must offer the subprotocol {SUBPROTOCOL}")
    return (b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(keys[0]).encode("ascii") + b"\r\n"
            b"Sec-WebSocket-Protocol: " + SUBPROTOCOL.encode("ascii") + b"\r\n"
            b"\r\n")


# ---------------------------------------------------------------- client side

def client_request(host: str, path: str = "/v1/ws", key: str | None = None,
                   extra_headers: Iterable[tuple[str, str]] = ()) -> tuple[bytes, str]:
    """An upgrade request offering ``broker.v1``, and the key it carries
    (``check_server_response`` needs it).  A key is made up if not given."""
    if key is None:
        key = base64.b64encode(os.urandom(16)).decode("ascii")
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
             f"Sec-WebSocket-Version: {VERSION}", f"Sec-WebSocket-Protocol: {SUBPROTOCOL}"]
    lines += [f"{name}: {value}" for name, value in extra_headers]
    # A CR or LF in any part would smuggle a header or a second request.
    if any("\r" in line or "\n" in line for line in lines):
        raise ValueError("a handshake header may not contain CR or LF")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), key


def check_server_response(head: bytes, key: str) -> None:
    """Check the server's answer to ``client_request`` (its head: status line
    and headers, with or without the final blank line).  Raises HandshakeError
    carrying the response's status unless it accepted ``broker.v1``."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise HandshakeError(0, "bad_handshake", f"not an HTTP response: {lines[0][:40]!r}")
    status = int(parts[1])
    if status != 101:
        raise HandshakeError(status, "bad_handshake", f"the server refused the upgrade: "
                                                      f"{lines[0][:80]}")
    headers = []
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise HandshakeError(status, "bad_handshake", f"malformed header {line[:40]!r}")
            headers.append((name.strip().lower().encode("latin-1"),
                            value.strip().encode("latin-1")))
    if "websocket" not in (t.lower() for t in _tokens(headers, b"upgrade")):
        raise HandshakeError(status, "bad_handshake", "the 101 lacks 'Upgrade: websocket'")
    if "upgrade" not in (t.lower() for t in _tokens(headers, b"connection")):
        raise HandshakeError(status, "bad_handshake", "the 101 lacks 'Connection: Upgrade'")
    if _values(headers, b"sec-websocket-accept") != [accept_key(key)]:
        raise HandshakeError(status, "bad_handshake", "wrong Sec-WebSocket-Accept")
    if _values(headers, b"sec-websocket-extensions"):
        # We offered none; RFC 6455 4.1 says to fail on any.
        raise HandshakeError(status, "bad_handshake", "the server chose an extension")
    if _values(headers, b"sec-websocket-protocol") != [SUBPROTOCOL]:
        raise HandshakeError(status, "bad_subprotocol",
                             f"the server did not select {SUBPROTOCOL}")

"""Benchmark 4: compiled WebSocket framing against wsproto's frame layer.

Workloads, 100-byte binary messages:

* parse: one 64 KiB read's worth of masked client frames (618 frames of 106
  bytes, 65,508 bytes: whole frames, so every round starts on a boundary),
  parsed into (opcode, payload) messages.
* build: 100 messages framed (unmasked, server to client) into bytes to send.

* subject: ``broker._core.FrameParser.feed`` and ``build_frames``.
* baseline: ``wsproto.frame_protocol.FrameProtocol``, the frame layer under
  ``wsproto.WSConnection`` (and so under trio-websocket), without the
  connection's event objects and state checks: ``receive_bytes`` plus draining
  ``received_frames()``, and one ``send_data`` per message joined into one bytes.
* floor (build only): ``b"".join(payloads)``, the copy alone, no headers.
"""

from __future__ import annotations

import os

import pytest
from wsproto.frame_protocol import FrameProtocol

from broker import _core
from _benchlib import PAYLOAD_BYTES, make_payloads

READ_BYTES = 64 * 1024
FRAME_BYTES = 2 + 4 + PAYLOAD_BYTES          # header, masking key, payload
FRAMES_PER_READ = READ_BYTES // FRAME_BYTES  # 618
BATCH = 100                                  # messages per build


def _info(benchmark, impl: str, role: str, records: int) -> None:
    benchmark.extra_info.update(impl=impl, role=role, records=records,
                                bytes=records * PAYLOAD_BYTES)


@pytest.mark.benchmark(group="wsframe-parse")
@pytest.mark.parametrize("impl", ["FrameParser", "wsproto"])
def test_wsframe_parse(benchmark, impl: str) -> None:
    payloads = make_payloads(FRAMES_PER_READ)
    data = b"".join(_core.build_frame(_core.OP_BINARY, p, mask=os.urandom(4)) for p in payloads)
    if impl == "FrameParser":
        parser = _core.FrameParser()

        def parse() -> list[bytes]:
            return [p for _, p in parser.feed(data)]
    else:
        fp = FrameProtocol(client=False, extensions=[])

        def parse() -> list[bytes]:
            fp.receive_bytes(data)
            return [f.payload for f in fp.received_frames()]

    assert parse() == payloads
    _info(benchmark, impl, "subject" if impl == "FrameParser" else "baseline", FRAMES_PER_READ)
    benchmark(parse)


@pytest.mark.benchmark(group="wsframe-build")
@pytest.mark.parametrize("impl", ["build_frames", "wsproto", "join"])
def test_wsframe_build(benchmark, impl: str) -> None:
    payloads = make_payloads(BATCH)
    if impl == "build_frames":
        def build() -> bytes:
            return _core.build_frames(_core.OP_BINARY, payloads)
    elif impl == "wsproto":
        fp = FrameProtocol(client=False, extensions=[])

        def build() -> bytes:
            return b"".join([fp.send_data(p) for p in payloads])
    else:
        def build() -> bytes:
            return b"".join(payloads)

    if impl != "join":
        assert [p for _, p in _core.FrameParser(client_side=True).feed(build())] == payloads
    role = {"build_frames": "subject", "wsproto": "baseline", "join": "floor"}[impl]
    _info(benchmark, impl, role, BATCH)
    benchmark(build)

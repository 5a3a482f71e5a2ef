"""Fuzz the WebSocket frame parser against a plain-Python model of RFC 6455.

    python tests/fuzz_wsframe.py --seconds 60 [--seed N]

Each case is a stream of frames, valid or mangled (random bytes, bit flips,
truncations, splices), fed to ``FrameParser`` in random chunks.  The parser
must agree with ``reference``, which reads the whole stream at once: the same
messages, the same close code, the same bytes left buffered.  Along the way it
may raise nothing (a violation is reported through ``error``, and only then do
later feeds raise, that same error), and no data message may exceed
``max_message``.  A case is bounded by its input, so the run cannot hang; as a
backstop, the command-line run dumps every thread and exits if it overruns its
time by a minute.  ``test_wsframe.py`` runs this for about two seconds.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _fuzzmain  # noqa: E402
from broker._core import FrameParser, WsProtocolError, build_frame  # noqa: E402

Message = tuple[int, bytes]


def unmask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def reference(data: bytes, client_side: bool = False,
              max_message: int = 1 << 20) -> tuple[list[Message], int | None, int]:
    """(messages, close code of the first violation or None, bytes left buffered)."""
    out: list[Message] = []
    pos, msg_op, acc = 0, 0, b""
    while True:
        if len(data) - pos < 2:
            return out, None, len(acc) + len(data) - pos
        b0, b1 = data[pos], data[pos + 1]
        op, fin, masked, n = b0 & 15, b0 >> 7, b1 >> 7, b1 & 127
        if (b0 & 0x70 or op in (3, 4, 5, 6, 7, 11, 12, 13, 14, 15)
                or (op >= 8 and (not fin or n > 125))
                or (op == 0 and not msg_op) or (op in (1, 2) and msg_op)
                or masked == client_side):
            return out, 1002, 0
        ext = {126: 2, 127: 8}.get(n, 0)
        hsize = 2 + ext + 4 * masked
        if len(data) - pos < hsize:
            return out, None, len(acc) + len(data) - pos
        if ext:
            n = int.from_bytes(data[pos + 2:pos + 2 + ext], "big")
            if n >> 63 or n < (126 if ext == 2 else 65536):
                return out, 1002, 0
        if op < 8 and len(acc) + n > max_message:
            return out, 1009, 0
        payload = data[pos + hsize:pos + hsize + n]
        if masked:
            payload = unmask(payload, data[pos + hsize - 4:pos + hsize])
        if len(payload) < n:
            return out, None, len(acc) + len(payload)
        pos += hsize + n
        if op >= 8:
            out.append((op, payload))
            continue
        msg_op = op or msg_op
        acc += payload
        if fin:
            out.append((msg_op, acc))
            msg_op, acc = 0, b""


def feed_in_chunks(parser: FrameParser, data: bytes, cuts: list[int]) -> list[Message]:
    """Feed ``data`` cut at ``cuts``; check the error contract; return the messages."""
    got: list[Message] = []
    bounds = [0, *sorted(cuts), len(data)]
    for a, b in zip(bounds, bounds[1:]):
        if parser.error is not None:
            try:
                parser.feed(data[a:b])
            except WsProtocolError as exc:
                assert exc is parser.error
            else:
                raise AssertionError("feed after an error did not raise")
            break
        got += parser.feed(data[a:b])
    return got


def check(data: bytes, cuts: list[int], client_side: bool, max_message: int) -> None:
    parser = FrameParser(client_side, max_message)
    got = feed_in_chunks(parser, data, cuts)
    want, code, buffered = reference(data, client_side, max_message)
    assert got == want, (data, cuts)
    assert (parser.error and parser.error.code) == code, (data, cuts, parser.error)
    if code is None:
        assert parser.buffered == buffered, (data, cuts)
    for op, payload in got:
        assert type(payload) is bytes
        assert len(payload) <= (max_message if op < 8 else 125)


def valid_stream(rng: random.Random, client_side: bool) -> bytes:
    """A few messages, some fragmented, with control frames between fragments."""
    frames = []
    for _ in range(rng.randint(1, 6)):
        size = rng.choice([0, 1, 5, 125, 126, 127, 300, 65535, 65536, 70000])
        if size > 1000 and rng.random() < 0.8:
            size = rng.randint(0, 200)
        payload = rng.randbytes(size)
        cuts = sorted(rng.sample(range(size + 1), min(size + 1, rng.randint(0, 3))))
        parts = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, size])]
        for i, part in enumerate(parts):
            if rng.random() < 0.2:
                frames.append((rng.choice([8, 9, 10]), rng.randbytes(rng.randint(0, 125)), True))
            frames.append((rng.choice([1, 2]) if i == 0 else 0, part, i == len(parts) - 1))
    return b"".join(build_frame(op, p, fin, None if client_side else rng.randbytes(4))
                    for op, p, fin in frames)


def mutate(rng: random.Random, data: bytes) -> bytes:
    return _fuzzmain.mutate(rng, data, steps=4, head_bias=True)


def one_case(rng: random.Random) -> None:
    client_side = rng.random() < 0.3
    max_message = rng.choice([0, 100, 1000, 1 << 20])
    roll = rng.random()
    if roll < 0.1:
        data = rng.randbytes(rng.randint(0, 64))
    else:
        data = valid_stream(rng, client_side)
        if roll < 0.8:
            data = mutate(rng, data)
    ncuts = rng.choice([0, 1, 3, 20, len(data)])
    cuts = [rng.randint(0, len(data)) for _ in range(ncuts)]
    check(data, cuts, client_side, max_message)


def run(seconds: float, seed: int) -> int:
    """Fuzz for about ``seconds``; return the number of cases."""
    return _fuzzmain.repeat(one_case, seconds, seed)


def main() -> int:
    return _fuzzmain.main(__doc__, run)


if __name__ == "__main__":
    sys.exit(main())

"""Fuzz the WebSocket frame codec, ``broker._frames.decode``.

    python tests/fuzz_frames.py --seconds 60 [--seed N]
    python tests/fuzz_frames.py --atheris --seconds 600 [libFuzzer flags] [corpus | crash file]

Each case is one message: a valid frame of any type, or one mangled at the
byte level (bit flips, truncations, splices), at the msgpack level (a field
replaced by a value of another type or range, a field dropped, an unknown key,
another ``t``), or a hostile msgpack header that claims more elements than
the message has bytes.  ``decode`` must:

* return a frame, or raise ``FrameError`` with code ``bad_frame`` or
  ``bad_offset``, a short message, and a ``session``/``request_id`` that are
  None or valid; nothing else;
* return frames that survive ``encode``, and decode from it to the same bytes;
* allocate no more than a small multiple of the message's length (checked
  with tracemalloc on a sample of cases).

A case is bounded by its input, so the run cannot hang; as a backstop, the
command-line run dumps every thread and exits if it overruns its time by a
minute.  ``--atheris`` hands the same one-input check to libFuzzer, seeded with
valid frames; extra arguments go to libFuzzer.  ``test_fuzz.py`` runs the
random mode for about two seconds.
"""

from __future__ import annotations

import random
import struct
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _fuzzmain  # noqa: E402
from broker import _frames as F  # noqa: E402

U64_MAX = (1 << 64) - 1
MAX_MESSAGE_LEN = 300          # what an error message may grow to
# Bytes allocated per byte of message, at most, and a constant for the
# exception and the small objects every decode makes.
ALLOC_PER_BYTE, ALLOC_BASE = 100, 64 * 1024


def _empty_view() -> Any:
    from broker._convo import Conversation     # as the frames: absent from older versions
    return F.View("s", 0, Conversation().to_snapshot())


def _builders() -> list[Callable[[], Any]]:
    P = F.Producer("p", 1, 2)
    return [
        lambda: F.Hello(), lambda: F.Hello("agent", "tok.en.x"),
        lambda: F.Attach(1, "chat/a"), lambda: F.Attach(2, "s", 5, 3, (0, 1), 10, True),
        lambda: F.Detach(3, "s"), lambda: F.Credit("s", 7),
        lambda: F.Publish(4, "s", (b"a", b"", b"c" * 40)),
        lambda: F.Publish(5, "s", (b"a",), 1, ({"m": [1, None]},), P, True),
        lambda: F.Signal(6, "s", b"stop", {"why": "user"}),
        lambda: F.Ping(), lambda: F.Ping(9), lambda: F.Pong(9),
        lambda: F.Welcome(1, "agent", "c1", 25, 1 << 20),
        lambda: F.Attached(7, "s", 3, 0, 12, False),
        lambda: F.Detached(8, "s"), lambda: F.Ack(9, "s", 40, 2), lambda: F.Ack(10, "s", dup=True),
        lambda: F.Data("s", (F.Record(0, 1, 0, b"x"), F.Record(2, 1, 1, b"y", "pub", [1], P))),
        lambda: F.UpToDate("s", 12), lambda: F.Event("s", "epoch_changed", 4),
        lambda: F.Event("s", "closed"), lambda: F.Error("bad_frame", "x", "s", 15),
        lambda: F.Attach(11, "s", F.START), lambda: F.Attach(12, "s", F.NOW),
        # Frames added since; skipped where this version of the codec lacks them.
        lambda: F.Refresh(13, "tok"), lambda: F.Refreshed(13, 60.0), lambda: F.Expiring(5),
        lambda: F.Hello("agent", None, {"role": "agent", "n": 1}),
        lambda: F.Attach(14, "s", presence=True, hidden=True, info={"device": "tv"}),
        lambda: F.Presence(15, "s"),
        lambda: F.Members("s", (F.Member("c1", "ui", "ws", 5, {"k": "v"}),), 15),
        lambda: F.Join("s", F.Member("sse-a-1", "anon", "sse", 0)),
        lambda: F.Leave("s", F.Member("lp-a-2", "bob", "longpoll", 7, {"x": 1.5})),
        lambda: F.Attach(16, "s", view=True),
        _empty_view,
    ]


def valid_frames() -> list[Any]:
    out = []
    for build in _builders():
        try:
            out.append(build())
        except (AttributeError, TypeError, F.FrameError):
            continue
    return out


FRAMES = valid_frames()
WIRES = [msgpack.unpackb(F.encode(f), raw=False) for f in FRAMES]
KEYS = sorted({k for w in WIRES for k in w} | {"x", ""})
TYPES = sorted({w["t"] for w in WIRES})


def random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.randrange(14 if depth < 2 else 11)
    if roll == 0:
        return None
    if roll == 1:
        return rng.random() < 0.5
    if roll == 2:
        return rng.choice([0, 1, -1, 63, 64, 127, 128, 255, 256, U64_MAX, -(1 << 63),
                           (1 << 63) - 1, (1 << 32), -2])
    if roll == 3:
        return rng.randint(-(1 << 63), U64_MAX)
    if roll == 4:
        return rng.choice([0.0, -0.0, 1.5, -1.0, float("inf"), float("-inf"), float("nan"),
                           1e300])
    if roll == 5:
        return rng.choice(["", "s", "now", "-1", "0_7", "0000000000000000_0000000000000042",
                           "\u0660", "x" * 300, "closed", "\x00", "\ud7ff"])
    if roll == 6:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randint(0, 8)))
    if roll == 7:
        return rng.randbytes(rng.randint(0, 12))
    if roll == 8:
        return rng.choice(TYPES)
    if roll == 9:
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randint(0, 4)))
    if roll == 10:
        return rng.randrange(1 << 16)
    if roll == 11:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if roll == 12:
        return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return tuple(rng.randbytes(rng.randint(0, 3)) for _ in range(rng.randint(0, 3)))


def mangle_fields(rng: random.Random, m: dict[str, Any]) -> dict[str, Any]:
    m = dict(m)
    for _ in range(rng.randint(1, 3)):
        roll = rng.randrange(4)
        if roll == 0 and m:
            m[rng.choice(list(m))] = random_value(rng)
        elif roll == 1 and m:
            del m[rng.choice(list(m))]
        elif roll == 2:
            m[rng.choice(KEYS)] = random_value(rng)
        else:
            m["t"] = rng.choice([*TYPES, "", "HELLO", 5, None])
    return m


def mutate(rng: random.Random, data: bytes) -> bytes:
    return _fuzzmain.mutate(rng, data, span=8)


def hostile(rng: random.Random) -> bytes:
    """Headers that claim far more than the message holds, and cheap objects many times."""
    n = rng.randint(1, 3000)
    return rng.choice([
        b"\xdd" + struct.pack(">I", 0xFFFFFFFF),                   # array32 of 4 G
        b"\xdf" + struct.pack(">I", 0xFFFFFFFF),                   # map32 of 4 G
        b"\xdb" + struct.pack(">I", 0xFFFFFFFF) + b"x",            # str32 of 4 GB
        b"\xc6" + struct.pack(">I", 0xFFFFFFFF),                   # bin32 of 4 GB
        b"\xdd" + struct.pack(">I", n) + b"\x80" * n,              # n empty maps
        b"\xdd" + struct.pack(">I", n) + b"\x90" * n,              # n empty arrays
        b"\xdd" + struct.pack(">I", n) + b"\xc4\x00" * n,          # n empty bins
        b"\x91" * n + b"\xc0",                                     # nesting n deep
        b"\x83\xa1t\xa7publish\xa1s\xa1s\xa1r\xdd" + struct.pack(">I", n) + b"\xc4\x00" * n,
        b"\x82\xa1t\xa4data\xa1r\xdd" + struct.pack(">I", n) + b"\x90" * n,
    ])


def check(data: bytes, measure: bool = False) -> None:
    if measure:
        tracemalloc.start()
    try:
        frame = F.decode(data)
    except F.FrameError as exc:
        assert exc.code in ("bad_frame", "bad_offset"), exc.code
        assert isinstance(exc.message, str) and len(exc.message) <= MAX_MESSAGE_LEN, exc.message
        assert exc.session is None or (type(exc.session) is str and exc.session)
        assert exc.request_id is None or (type(exc.request_id) is int
                                          and 0 <= exc.request_id <= U64_MAX)
        frame = None
    finally:
        if measure:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak <= ALLOC_PER_BYTE * len(data) + ALLOC_BASE, (len(data), peak)
    if frame is not None:
        assert type(frame) in F._WIRE, type(frame)
        # Compared as bytes: a meta may hold NaN, which equals nothing.
        again = F.encode(frame)
        assert F.encode(F.decode(again)) == again, (data[:100], frame)


def one_case(rng: random.Random) -> None:
    roll = rng.random()
    if roll < 0.05:
        data = rng.randbytes(rng.randint(0, 40))
    elif roll < 0.15:
        data = hostile(rng)
    else:
        wire = rng.choice(WIRES)
        if roll < 0.3:
            data = msgpack.packb(wire, use_bin_type=True)
        elif roll < 0.7:
            data = msgpack.packb(mangle_fields(rng, wire), use_bin_type=True)
        else:
            data = mutate(rng, msgpack.packb(wire, use_bin_type=True))
    check(data, measure=rng.random() < 0.05)


def one_input(data: bytes) -> None:
    check(data)


def run(seconds: float, seed: int) -> int:
    """Fuzz for about ``seconds``; return the number of cases."""
    return _fuzzmain.repeat(one_case, seconds, seed)


def run_atheris(seconds: float, seed: int, extra: list[str]) -> None:
    _fuzzmain.run_atheris("fuzz_frames", seconds, seed, extra, one_input, [F],
                          lambda rng: (F.encode(frame) for frame in FRAMES))


def main() -> int:
    return _fuzzmain.main(__doc__, run, run_atheris)


if __name__ == "__main__":
    sys.exit(main())

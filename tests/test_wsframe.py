"""WebSocket framing (broker._core FrameParser and builders): bytes in, bytes out, no sockets."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

import fuzz_wsframe
from broker._core import (OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
                          FrameParser, WsProtocolError, build_frame, build_frames,
                          close_payload, frame_header, mask_payload, parse_close)

KEY = b"\x37\xfa\x21\x3d"
SIZES = [0, 1, 125, 126, 65535, 65536, 70000]
Message = tuple[int, bytes]


def frame(op: int, payload: bytes = b"", fin: bool = True, masked: bool = True) -> bytes:
    return build_frame(op, payload, fin, KEY if masked else None)


def raw(b0: int, length: int, form: int = 0, masked: bool = True, payload: bytes = b"") -> bytes:
    """A header written by hand: ``form`` 0 (7-bit), 2 (u16) or 8 (u64) length bytes."""
    b1 = (0x80 if masked else 0) | {0: length, 2: 126, 8: 127}[form]
    ext = length.to_bytes(form, "big") if form else b""
    return bytes([b0, b1]) + ext + (KEY if masked else b"") + payload


def stream(masked: bool) -> tuple[bytes, list[Message]]:
    """Several messages: fragmented ones with control frames between the fragments."""
    frames = [
        frame(OP_TEXT, b"hello", masked=masked),
        frame(OP_BINARY, b"", masked=masked),
        frame(OP_BINARY, b"ab", fin=False, masked=masked),
        frame(OP_PING, b"p1", masked=masked),
        frame(OP_CONTINUATION, bytes(range(200)), fin=False, masked=masked),
        frame(OP_PONG, b"", masked=masked),
        frame(OP_CONTINUATION, b"cd", masked=masked),
        frame(OP_TEXT, b"x" * 126, masked=masked),
        frame(OP_CLOSE, close_payload(1000, "bye"), masked=masked),
    ]
    want = [(OP_TEXT, b"hello"), (OP_BINARY, b""), (OP_PING, b"p1"), (OP_PONG, b""),
            (OP_BINARY, b"ab" + bytes(range(200)) + b"cd"), (OP_TEXT, b"x" * 126),
            (OP_CLOSE, b"\x03\xe8bye")]
    return b"".join(frames), want


# ------------------------------------------------------------------ parsing

@pytest.mark.parametrize("client_side", [False, True])
@pytest.mark.parametrize("op, size", [(op, n) for op in (OP_TEXT, OP_BINARY) for n in SIZES]
                         + [(op, n) for op in (OP_PING, OP_PONG, OP_CLOSE) for n in (0, 125)])
def test_round_trip(op: int, size: int, client_side: bool) -> None:
    payload = bytes(i * 7 % 251 for i in range(size))
    data = frame(op, payload, masked=not client_side)
    header = (2 if size < 126 else 4 if size < 65536 else 10) + (0 if client_side else 4)
    assert len(data) == header + size
    p = FrameParser(client_side)
    assert p.feed(data) == [(op, payload)]
    assert (p.buffered, p.error) == (0, None)


@pytest.mark.parametrize("masked", [True, False])
def test_split_at_every_byte(masked: bool) -> None:
    data, want = stream(masked)
    for cut in range(len(data) + 1):
        p = FrameParser(client_side=not masked)
        assert p.feed(data[:cut]) + p.feed(data[cut:]) == want, cut
        assert p.buffered == 0


@pytest.mark.parametrize("masked", [True, False])
def test_one_byte_at_a_time(masked: bool) -> None:
    data, want = stream(masked)
    p = FrameParser(client_side=not masked)
    got = []
    for i in range(len(data)):
        got += p.feed(data[i:i + 1])
    assert got == want and p.buffered == 0


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_feed_takes_any_buffer(kind: type) -> None:
    data, want = stream(True)
    p = FrameParser()
    assert p.feed(kind(b"")) == []
    assert p.feed(kind(data)) == want


@pytest.mark.parametrize("count", [2, 3, 50])
def test_fragments_with_control_frames_between(count: int) -> None:
    parts = [bytes([i]) * (i % 5 + 3) for i in range(count)]
    frames = [frame(OP_TEXT if i == 0 else OP_CONTINUATION, part, fin=i == count - 1)
              + frame(OP_PING, b"%d" % i) for i, part in enumerate(parts)]
    data = b"".join(frames)
    cut = len(data) - len(frames[-1]) + 8      # two bytes into the last fragment's payload
    p = FrameParser()
    got = p.feed(data[:cut])
    assert p.buffered == sum(map(len, parts)) - len(parts[-1]) + 2
    got += p.feed(data[cut:])
    assert got == [(OP_PING, b"%d" % i) for i in range(count - 1)] + [
        (OP_TEXT, b"".join(parts)), (OP_PING, b"%d" % (count - 1))]


def test_big_frame_in_small_reads() -> None:
    payload = bytes(range(256)) * 4096   # 1 MiB
    data = frame(OP_BINARY, payload)
    cut = len(data) - 1
    p = FrameParser()
    for i in range(0, cut, 1000):
        assert p.feed(data[i:min(i + 1000, cut)]) == []
    assert p.buffered == cut - 14         # the payload so far, already unmasked
    assert p.feed(data[cut:]) == [(OP_BINARY, payload)]
    assert p.buffered == 0


def test_message_of_exactly_max_message() -> None:
    p = FrameParser(max_message=100)
    data = frame(OP_TEXT, b"a" * 60, fin=False) + frame(OP_CONTINUATION, b"b" * 40)
    assert p.feed(data) == [(OP_TEXT, b"a" * 60 + b"b" * 40)]


# --------------------------------------------------------------- violations

TEXT_START = frame(OP_TEXT, b"frag", fin=False)
VIOLATIONS = {
    "rsv1": (b"", raw(0xC2, 0), 1002),
    "rsv2": (b"", raw(0xA2, 0), 1002),
    "rsv3": (b"", raw(0x92, 0), 1002),
    **{f"opcode-{op}": (b"", raw(0x80 | op, 0), 1002) for op in (3, 7, 11, 15)},
    "control-not-fin": (b"", raw(OP_PING, 0), 1002),
    "control-126": (b"", raw(0x80 | OP_PING, 126, form=2, payload=b"x" * 126), 1002),
    "control-in-7-bits-over-125": (b"", bytes([0x80 | OP_CLOSE, 0x80 | 126]), 1002),
    "lone-continuation": (b"", frame(OP_CONTINUATION, b"x"), 1002),
    "text-inside-message": (TEXT_START, frame(OP_TEXT, b"x"), 1002),
    "binary-inside-message": (TEXT_START, frame(OP_BINARY, b"x"), 1002),
    "unmasked-from-client": (b"", frame(OP_BINARY, b"x", masked=False), 1002),
    "u64-top-bit": (b"", raw(0x82, 1 << 63, form=8), 1002),
    "u16-form-for-125": (b"", raw(0x82, 125, form=2), 1002),
    "u64-form-for-0": (b"", raw(0x82, 0, form=8), 1002),
    "u64-form-for-65535": (b"", raw(0x82, 65535, form=8), 1002),
    "frame-over-max": (b"", raw(0x82, (1 << 20) + 1, form=8), 1009),
    "fragments-over-max": (frame(OP_BINARY, b"x" * 1000, fin=False),
                           raw(OP_CONTINUATION, (1 << 20) - 999, form=8), 1009),
}


@pytest.mark.parametrize("prefix, bad, code", VIOLATIONS.values(), ids=VIOLATIONS.keys())
def test_violation(prefix: bytes, bad: bytes, code: int) -> None:
    p = FrameParser()
    good = frame(OP_BINARY, b"before") + frame(OP_PING, b"ping")
    assert p.feed(good + prefix + bad + good) == [(OP_BINARY, b"before"), (OP_PING, b"ping")]
    assert isinstance(p.error, WsProtocolError) and p.error.code == code
    assert str(p.error) == p.error.reason
    for later in (good, b""):
        with pytest.raises(WsProtocolError) as exc:
            p.feed(later)
        assert exc.value is p.error


def test_masked_frame_to_a_client() -> None:
    p = FrameParser(client_side=True)
    assert p.feed(frame(OP_TEXT, b"ok", masked=False) + frame(OP_TEXT, b"no")) == [
        (OP_TEXT, b"ok")]
    assert p.error is not None and p.error.code == 1002


@pytest.mark.parametrize("step", [1, 3, 100])
def test_1009_on_the_header_before_any_payload(step: int) -> None:
    header = raw(0x82, 2 << 30, form=8)      # a 2 GiB frame is announced
    p = FrameParser()
    for i in range(0, len(header), step):
        p.feed(header[i:i + step])
        assert p.buffered < len(header)
    assert p.error is not None and p.error.code == 1009
    assert p.buffered == 0


# ----------------------------------------------------------------- builders

@pytest.mark.parametrize("size", SIZES)
def test_frame_header_and_build_frames(size: int) -> None:
    payloads = [bytes([n % 256]) * n for n in (size, 3, size)]
    assert frame_header(OP_BINARY, size) + payloads[0] == build_frame(OP_BINARY, payloads[0])
    assert build_frames(OP_BINARY, payloads) == b"".join(
        build_frame(OP_BINARY, x) for x in payloads)
    assert build_frames(OP_TEXT, (memoryview(x) for x in payloads)) == build_frames(
        OP_TEXT, payloads)
    assert frame_header(OP_TEXT, size, fin=False)[0] == OP_TEXT


@pytest.mark.parametrize("call", [
    lambda: build_frame(3, b""),
    lambda: build_frame(OP_PING, b"x" * 126),
    lambda: build_frame(OP_PING, b"", fin=False),
    lambda: build_frame(OP_TEXT, b"", mask=b"abc"),
    lambda: build_frames(OP_PONG, [b"x" * 126]),
    lambda: frame_header(OP_BINARY, -1),
    lambda: mask_payload(b"x", b"12345"),
    lambda: close_payload(1005),
])
def test_builders_refuse_misuse(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_mask_payload_matches_the_model(data: bytes, key: bytes) -> None:
    assert mask_payload(data, key) == fuzz_wsframe.unmask(data, key)
    assert mask_payload(mask_payload(data, key), key) == data


# -------------------------------------------------------------- close frames

@pytest.mark.parametrize("code, reason", [(1000, ""), (1001, "going"), (1014, "é"),
                                          (3000, "x" * 123), (4999, "ünï")])
def test_close_round_trip(code: int, reason: str) -> None:
    assert parse_close(close_payload(code, reason)) == (code, reason)


@pytest.mark.parametrize("reason, kept", [("x" * 200, "x" * 123), ("é" * 100, "é" * 61),
                                          ("a" + "€" * 50, "a" + "€" * 40)])
def test_close_reason_cut_at_a_character(reason: str, kept: str) -> None:
    payload = close_payload(1000, reason)
    assert len(payload) <= 125 and parse_close(payload) == (1000, kept)


def test_empty_close() -> None:
    assert parse_close(b"") == (1005, "")


@pytest.mark.parametrize("payload", [
    b"\x03", *(struct.pack("!H", c) for c in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999,
                                              5000, 65535)),
    b"\x03\xe8\xff\xfe",
])
def test_bad_close_payload(payload: bytes) -> None:
    with pytest.raises(WsProtocolError) as exc:
        parse_close(payload)
    assert exc.value.code == 1002


# -------------------------------------------------------------- vs wsproto

def wsproto_messages(data: bytes, client: bool) -> list[tuple[int, object]]:
    """Messages as wsproto reads them; close payloads as (code, reason)."""
    fp = FrameProtocol(client=client, extensions=[])
    fp.receive_bytes(data)
    out: list[tuple[int, object]] = []
    parts: list[bytes] = []
    for f in fp.received_frames():
        if f.opcode is Opcode.CLOSE:
            out.append((OP_CLOSE, tuple(f.payload)))
        elif f.opcode.iscontrol():
            out.append((int(f.opcode), bytes(f.payload)))
        else:
            parts.append(f.payload.encode() if isinstance(f.payload, str) else bytes(f.payload))
            if f.message_finished:
                out.append((int(f.opcode), b"".join(parts)))
                parts = []
    return out


def ours(messages: list[Message]) -> list[tuple[int, object]]:
    return [(op, parse_close(p) if op == OP_CLOSE else p) for op, p in messages]


@pytest.mark.parametrize("size", SIZES)
def test_we_read_what_a_wsproto_client_writes(size: int) -> None:
    client = FrameProtocol(client=True, extensions=[])
    text = "ü" * (size // 2)
    data = b"".join([
        client.send_data(text), client.send_data(b"a" * size, fin=False),
        client.ping(b"between"), client.send_data(b"b", fin=False), client.send_data(b"c" * size),
        client.pong(b""), client.close(1000, "done"),
    ])
    want = [(OP_TEXT, text.encode()), (OP_PING, b"between"),
            (OP_BINARY, b"a" * size + b"b" + b"c" * size), (OP_PONG, b""),
            (OP_CLOSE, (1000, "done"))]
    assert ours(FrameParser().feed(data)) == want == wsproto_messages(data, client=False)


@pytest.mark.parametrize("size", SIZES)
def test_a_wsproto_client_reads_what_we_write(size: int) -> None:
    payloads = [b"x" * size, b"", "é".encode() * (size // 2)]
    data = b"".join([
        build_frames(OP_BINARY, payloads), build_frame(OP_TEXT, payloads[2]),
        build_frame(OP_TEXT, b"frag", fin=False), build_frame(OP_PING, b"hi"),
        frame_header(OP_CONTINUATION, size) + payloads[0],
        build_frame(OP_CLOSE, close_payload(1001, "bye")),
    ])
    want = [*((OP_BINARY, p) for p in payloads), (OP_TEXT, payloads[2]), (OP_PING, b"hi"),
            (OP_TEXT, b"frag" + payloads[0]), (OP_CLOSE, (1001, "bye"))]
    assert wsproto_messages(data, client=True) == want == ours(FrameParser(True).feed(data))


def test_a_wsproto_server_reads_our_masked_frames() -> None:
    data = build_frame(OP_BINARY, b"m" * 300, mask=KEY) + build_frame(OP_PING, b"", mask=b"\0" * 4)
    assert wsproto_messages(data, client=False) == [(OP_BINARY, b"m" * 300), (OP_PING, b"")]


# --------------------------------------------------------- property and fuzz

@st.composite
def messages_stream(draw: st.DrawFn) -> tuple[bytes, list[Message], list[int], bool]:
    """Random messages, randomly fragmented, with random control frames between fragments."""
    client_side = draw(st.booleans())
    frames: list[bytes] = []
    want: list[Message] = []
    for op, payload in draw(st.lists(st.tuples(st.sampled_from([OP_TEXT, OP_BINARY]),
                                               st.binary(max_size=400)), max_size=6)):
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
        parts = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)])]
        for i, part in enumerate(parts):
            if draw(st.booleans()):
                ctl = (draw(st.sampled_from([OP_PING, OP_PONG, OP_CLOSE])),
                       draw(st.binary(max_size=125)))
                frames.append(frame(*ctl, masked=not client_side))
                want.append(ctl)
            frames.append(frame(OP_CONTINUATION if i else op, part, fin=i == len(parts) - 1,
                                masked=not client_side))
        want.append((op, payload))
    data = b"".join(frames)
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=10))
    return data, want, cuts, client_side


@given(messages_stream())
def test_any_stream_any_chunking(case: tuple[bytes, list[Message], list[int], bool]) -> None:
    data, want, cuts, client_side = case
    p = FrameParser(client_side)
    assert fuzz_wsframe.feed_in_chunks(p, data, cuts) == want
    assert (p.error, p.buffered) == (None, 0)


first_byte = st.one_of(st.sampled_from([0x00, 0x01, 0x02, 0x81, 0x82, 0x88, 0x89, 0x8A, 0x09]),
                       st.integers(0, 255))
header_bytes = st.tuples(first_byte, st.integers(0, 255), st.binary(max_size=12),
                         st.binary(max_size=40))


@given(st.lists(header_bytes, max_size=5), st.lists(st.integers(0, 300), max_size=5),
       st.booleans(), st.sampled_from([0, 30, 1 << 20]))
def test_random_headers_match_the_model(
        frames: list[tuple[int, int, bytes, bytes]], cuts: list[int], client_side: bool,
        max_message: int) -> None:
    data = b"".join(bytes([b0, b1]) + ext + payload for b0, b1, ext, payload in frames)
    fuzz_wsframe.check(data, cuts, client_side, max_message)


@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=5))
def test_random_bytes_match_the_model(data: bytes, cuts: list[int]) -> None:
    fuzz_wsframe.check(data, cuts, client_side=False, max_message=64)


def test_fuzz_harness_briefly() -> None:
    assert fuzz_wsframe.run(seconds=2.0, seed=20261122) > 0

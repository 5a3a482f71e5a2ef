"""The WebSocket frame codec and handshake (broker/_frames.py, broker/_handshake.py).

Pure functions only: bytes in, frames out, and back; no sockets.
"""

from __future__ import annotations

import typing
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import _frames as F
from broker._frames import (
    Ack, Attach, Attached, Credit, Data, Detach, Detached, Error, Event, Expiring, FrameError,
    Hello, Ping, Pong, Producer, Publish, Record, Refresh, Refreshed, Signal, UpToDate, Welcome,
    decode, encode, parse_offset,
)
from broker._frames import View
from broker._frames import Join, Leave, Member, Members, Presence
from broker._handshake import (
    SUBPROTOCOL, HandshakeError, accept_key, check_server_response, client_request,
    server_handshake,
)
from broker._session import NOW, START

P = Producer("p-1", 2, 7)
M = Member("c17", "phone", "ws", 1_700_000_000_000_000, {"role": "user", "n": 2, "on": True})

FRAMES = [
    Hello(), Hello("agent-1", "secret"),
    Attach(1, "chat"), Attach(2, "chat", START, epoch=3, kinds=(1,), credit=10, create=True),
    Attach(3, "chat", 42),
    Detach(4, "chat"),
    Publish(5, "chat", (b"a", b"", b"c" * 300)),
    Publish(6, "chat", (b"a", b"b"), kind=2, meta=(None, {"k": [1, "v"]}), producer=P,
            create=True),
    Signal(7, "chat", b"cancel"), Signal(8, "chat", b"ok", meta={"by": "human"}),
    Credit("chat", 100),
    Ping(), Ping(9), Pong(), Pong(9),
    Welcome(1, "agent-1", "c17", 25, 1 << 20), Welcome(1, "a", "c", 0.5, 10),
    Attached(10, "chat", 3, 0, 12, False),
    Detached(11, "chat"),
    Ack(12, "chat", 40, 2), Ack(13, "chat", dup=True), Ack(14, "chat", 40, 2, dup=True),
    Data("chat", (Record(0, 1_700_000_000_000_000, 0, b"x"),)),
    Data("chat", (Record(0, 1, 0, b"x", "pub"), Record(2, 1, 1, b"y", meta=[1]),
                  Record(3, 2, 0, b"z", producer=P),
                  Record(9, 2, 63, b"", "pub", {"m": None}, P))),
    UpToDate("chat", 12),
    Event("chat", "closed"), Event("chat", "deleted"), Event("chat", "epoch_changed", 4),
    Error("session_not_found", "no such session"), Error("bad_frame", "x", "chat", 15),
    Refresh(16, "eyJ.x.y"), Refreshed(16), Refreshed(17, 3599.5), Expiring(60), Expiring(0.25),
    Welcome(1, "u" * 256, "c", 25, 10, ttl=120.0), Welcome(1, "a", "c", 1, 10, ttl=0),
    Error("rate_limited", "slow down", "chat", 18, retry_after=0.5),
    Attach(19, "chat", view=True), Attach(20, "chat", epoch=3, kinds=(0, 1, 2, 3, 4, 5, 6, 7),
                                         view=True),
    View("chat", 0, {"v": 1, "json": False, "next": 0, "items": [], "signals": [],
                     "states": [], "anomalies": []}),
    View("chat", 12, {"v": 1, "json": True, "next": 12, "start": 4, "items": [
        ["m", "m1", "assistant", "agent", 5, b"Hel\xc3\xa9", None, None, None, None, None]],
        "signals": [], "states": [[6, "agent", "writing", "m1", b""]],
        "anomalies": [["unknown_id", 1]]}),
    Hello("agent-1", None, {"role": "agent", "x": None, "f": 1.5}),
    Attach(21, "chat", presence=True), Attach(22, "chat", hidden=True, info={"device": "tv"}),
    Presence(23, "chat"),
    Members("chat", ()), Members("chat", (M, Member("sse-a-1", "anon-sse-a-1", "sse", 0)), 23),
    Join("chat", M), Leave("chat", Member("lp-a-2", "bob", "longpoll", 5)),
]


def wire(frame: Any) -> dict[str, Any]:
    return msgpack.unpackb(encode(frame))  # type: ignore[no-any-return]


def pack(m: Any) -> bytes:
    return msgpack.packb(m, use_bin_type=True)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("frame", FRAMES, ids=repr)
def test_round_trip(frame: Any) -> None:
    assert decode(encode(frame)) == frame


def test_every_frame_type_is_covered() -> None:
    classes = set(typing.get_args(F.Frame))
    assert {type(f) for f in FRAMES} == classes == set(F._WIRE)
    assert set(typing.get_args(F.ClientFrame)) | set(typing.get_args(F.ServerFrame)) == classes


@pytest.mark.parametrize("frame, expected", [
    (Hello(), {"t": "hello"}),
    (Attach(1, "s"), {"t": "attach", "id": 1, "s": "s"}),
    (Attach(1, "s", START), {"t": "attach", "id": 1, "s": "s", "offset": -1}),
    (Publish(1, "s", (b"a",)), {"t": "publish", "id": 1, "s": "s", "r": [b"a"]}),
    (Publish(1, "s", (b"a",), producer=P), {"t": "publish", "id": 1, "s": "s", "r": [b"a"],
                                            "producer": {"id": "p-1", "epoch": 2, "seq": 7}}),
    (Signal(1, "s", b"x"), {"t": "signal", "id": 1, "s": "s", "r": b"x"}),
    (Welcome(1, "c", "k", 25, 9), {"t": "welcome", "v": 1, "client": "c", "conn": "k",
                                   "heartbeat": 25, "max_message": 9}),
    (Ack(1, "s", dup=True), {"t": "ack", "id": 1, "s": "s", "dup": True}),
    (Welcome(1, "c", "k", 25, 9, 30.5), {"t": "welcome", "v": 1, "client": "c", "conn": "k",
                                         "heartbeat": 25, "max_message": 9, "ttl": 30.5}),
    (Refresh(3, "tok"), {"t": "refresh", "id": 3, "token": "tok"}),
    (Refreshed(3, 10), {"t": "refreshed", "id": 3, "ttl": 10}),
    (Refreshed(3), {"t": "refreshed", "id": 3}),
    (Expiring(59.5), {"t": "expiring", "ttl": 59.5}),
    (Error("rate_limited", "m", "s", 4, 1.5), {"t": "error", "code": "rate_limited",
                                               "message": "m", "s": "s", "id": 4,
                                               "retry_after": 1.5}),
    (Event("s", "epoch_changed", 2), {"t": "event", "s": "s", "e": "epoch_changed", "epoch": 2}),
    (Attach(1, "s", view=True), {"t": "attach", "id": 1, "s": "s", "view": True}),
    (Attach(1, "s", presence=True, hidden=True, info={"a": 1}),
     {"t": "attach", "id": 1, "s": "s", "presence": True, "hidden": True, "info": {"a": 1}}),
    (Attach(1, "s", info={}), {"t": "attach", "id": 1, "s": "s"}),
    (Hello(info={"role": "agent"}), {"t": "hello", "info": {"role": "agent"}}),
    (Presence(2, "s"), {"t": "presence", "id": 2, "s": "s"}),
    (Members("s", (), 2), {"t": "members", "s": "s", "members": [], "id": 2}),
    (Join("s", M), {"t": "join", "s": "s", "member": {
        "id": "c17", "client": "phone", "transport": "ws", "since": 1_700_000_000_000_000,
        "info": {"role": "user", "n": 2, "on": True}}}),
    (Leave("s", Member("x", "y", "sse", 3)),
     {"t": "leave", "s": "s", "member": {"id": "x", "client": "y", "transport": "sse",
                                          "since": 3}}),
    (View("s", 3, {"next": 3, "x": b"y"}), {"t": "view", "s": "s", "next": 3,
                                            "v": {"next": 3, "x": b"y"}}),
    (Data("s", (Record(0, 5, 1, b"p"), Record(1, 5, 0, b"q", "me"),
                Record(2, 5, 0, b"r", None, None, P))),
     {"t": "data", "s": "s", "r": [[0, 5, 1, None, b"p"], [1, 5, 0, ["me"], b"q"],
                                   [2, 5, 0, [None, None, ["p-1", 2, 7]], b"r"]]}),
])
def test_wire_shape(frame: Any, expected: dict[str, Any]) -> None:
    assert wire(frame) == expected


@pytest.mark.parametrize("m, frame", [
    # nil means "not given", unknown keys are ignored, a header may be shortened
    ({"t": "attach", "id": 1, "s": "s", "offset": None, "credit": None, "new": 1},
     Attach(1, "s")),
    ({"t": "attach", "id": 1, "s": "s", "offset": "now"}, Attach(1, "s", NOW)),
    ({"t": "attach", "id": 1, "s": "s", "offset": "-1"}, Attach(1, "s", START)),
    ({"t": "attach", "id": 1, "s": "s", "offset": "0000000000000000_0000000000000042"},
     Attach(1, "s", 42)),
    ({"t": "attach", "id": 1, "s": "s", "kinds": [1, 0]}, Attach(1, "s", kinds=(1, 0))),
    ({"t": "data", "s": "s", "r": [[0, 1, 0, [], b""], [1, 1, 0, [None, 5], b""]]},
     Data("s", (Record(0, 1, 0, b""), Record(1, 1, 0, b"", meta=5)))),
    ({"t": "publish", "id": 1, "s": "s", "r": [b"a"], "producer": {"id": "p", "epoch": 0,
                                                                   "seq": 0, "x": 1}},
     Publish(1, "s", (b"a",), producer=Producer("p", 0, 0))),
])
def test_decode_forms(m: dict[str, Any], frame: Any) -> None:
    assert decode(pack(m)) == frame


def test_server_data_frames_decode_as_the_codec_says() -> None:
    """The server's data frames come from the compiled pack_data, not from
    encode(): they must still decode to the frame the records describe."""
    from broker import _core
    from broker._ws import _Fanout

    header = msgpack.packb(["agent", {"k": 1}, ["p", 0, 3]])
    data = _core.encode(7, 99, [b"a", b"bb"], {1: 1 << _core.KIND_SHIFT}, metas={0: header})
    batch, _, _ = _core.decode(data, 0, 7)
    frame, _, _ = _core.pack_data(_Fanout("chat").prefix, batch)
    assert frame is not None
    ((op, body),) = _core.FrameParser(True).feed(frame)
    assert op == _core.OP_BINARY
    assert decode(body) == Data("chat", (
        Record(7, 99, 0, b"a", "agent", {"k": 1}, Producer("p", 0, 3)),
        Record(8, 99, 1, b"bb")))


def test_a_view_frame_carries_a_conversation_snapshot() -> None:
    from broker._convo import Conversation, Encoder

    enc, conv = Encoder(), Conversation()
    for offset, d in enumerate([enc.message("u1", "user", "hi"), enc.start("m1", text="Hel"),
                                enc.delta("m1", "l\u00f6"), enc.tool_call("c1", "t", {"a": 1})]):
        conv.apply(offset, d.kind, "agent", d.meta, d.payload)
    frame = decode(encode(View("chat", conv.next, conv.to_snapshot())))
    assert isinstance(frame, View) and frame.next == 4
    assert Conversation.from_snapshot(frame.view).view() == conv.view()


def test_lists_are_frozen_into_tuples() -> None:
    p = Publish(1, "s", [b"a"], meta=[None])  # type: ignore[arg-type]
    assert p.records == (b"a",) and p.meta == (None,)
    assert Attach(1, "s", kinds=[1]).kinds == (1,)  # type: ignore[arg-type]


# ---------------------------------------------------------------- malformed input

PUB = {"t": "publish", "id": 7, "s": "chat", "r": [b"a"]}
ATT = {"t": "attach", "id": 7, "s": "chat"}


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not ...}


BAD_BYTES = [
    (b"", "empty"), (b"\xc1", "reserved byte"), (b"\x92\x01", "truncated array"),
    (pack({"t": "ping"}) + b"\x00", "trailing bytes"), (pack([1, 2]), "array"),
    (pack("hello"), "string"), (b"\x81\xa1t\xa2\xff\xfe", "invalid utf-8"),
    (b"\x81\x91\x01\x01", "unhashable key"),
]


@pytest.mark.parametrize("data", [d for d, _ in BAD_BYTES], ids=[i for _, i in BAD_BYTES])
def test_not_a_frame(data: bytes) -> None:
    with pytest.raises(FrameError) as e:
        decode(data)
    assert (e.value.code, e.value.session, e.value.request_id) == ("bad_frame", None, None)


BAD_MAPS: list[tuple[dict[str, Any], str]] = [
    ({"s": "chat", "id": 7}, "bad_frame"),
    ({"t": "subscribe", "s": "chat", "id": 7}, "bad_frame"),
    ({"t": 1, "s": "chat", "id": 7}, "bad_frame"),
    (with_(PUB, id=...), "bad_frame"),
    (with_(PUB, r=...), "bad_frame"),
    (with_(PUB, r=[]), "bad_frame"),
    (with_(PUB, r=b"a"), "bad_frame"),
    (with_(PUB, r=["a"]), "bad_frame"),
    (with_(PUB, r=[b"a", 1]), "bad_frame"),
    (with_(PUB, kind=64), "bad_frame"),
    (with_(PUB, kind=-1), "bad_frame"),
    (with_(PUB, kind=True), "bad_frame"),
    (with_(PUB, kind=1.0), "bad_frame"),
    (with_(PUB, meta=[1, 2]), "bad_frame"),
    (with_(PUB, meta={"a": 1}), "bad_frame"),
    (with_(PUB, producer=["p", 0, 0]), "bad_frame"),
    (with_(PUB, producer={"id": "p", "epoch": 0}), "bad_frame"),
    (with_(PUB, producer={"id": "", "epoch": 0, "seq": 0}), "bad_frame"),
    (with_(PUB, producer={"id": "p", "epoch": -1, "seq": 0}), "bad_frame"),
    (with_(PUB, create="yes"), "bad_frame"),
    (with_(ATT, epoch="1"), "bad_frame"),
    (with_(ATT, kinds=[]), "bad_frame"),
    (with_(ATT, kinds=[64]), "bad_frame"),
    (with_(ATT, kinds=1), "bad_frame"),
    (with_(ATT, credit=0), "bad_frame"),
    (with_(ATT, credit=-5), "bad_frame"),
    (with_(ATT, offset="42"), "bad_offset"),
    (with_(ATT, offset=-2), "bad_offset"),
    (with_(ATT, offset=True), "bad_offset"),
    (with_(ATT, offset=1.5), "bad_offset"),
    (with_(ATT, offset="0000000000000001_0000000000000000"), "bad_offset"),
    (with_(ATT, view=1), "bad_frame"),
    (with_(ATT, view="yes"), "bad_frame"),
    (with_(ATT, presence=1), "bad_frame"),
    (with_(ATT, hidden="yes"), "bad_frame"),
    (with_(ATT, info=[1]), "bad_frame"),
    (with_(ATT, info={"": 1}), "bad_frame"),
    (with_(ATT, info={"k" * 65: 1}), "bad_frame"),
    (with_(ATT, info={str(i): i for i in range(17)}), "bad_frame"),
    (with_(ATT, info={"k": "v" * 257}), "bad_frame"),
    (with_(ATT, info={"k": {"nested": 1}}), "bad_frame"),
    (with_(ATT, info={"k": [1]}), "bad_frame"),
    (with_(ATT, info={"k": b"bytes"}), "bad_frame"),
    (with_(ATT, info={"k": 1 << 53}), "bad_frame"),
    (with_(ATT, info={"k": float("nan")}), "bad_frame"),
    (with_(ATT, info={1: "v"}), "bad_frame"),
    ({"t": "presence", "id": 7, "s": "chat", "x": 1}, "ok"),
    ({"t": "presence", "id": 7, "s": "chat", "since": "now"}, "ok"),
    ({"t": "presence", "s": "chat", "id": 7, "kinds": None}, "ok"),
    ({"t": "detach", "id": 7, "s": "chat", "x": 1, "extra": [1]}, "ok"),
    ({"t": "signal", "id": 7, "s": "chat", "r": [b"a"]}, "bad_frame"),
    ({"t": "credit", "s": "chat", "n": 0}, "bad_frame"),
    ({"t": "credit", "s": "chat", "n": "5"}, "bad_frame"),
    ({"t": "refresh", "id": 7, "s": "chat"}, "bad_frame"),
    ({"t": "refresh", "id": 7, "s": "chat", "token": ""}, "bad_frame"),
    ({"t": "refresh", "id": 7, "s": "chat", "token": b"tok"}, "bad_frame"),
]
BAD_ANONYMOUS: list[tuple[dict[str, Any], str]] = [
    ({"t": "publish", "id": "7", "s": "", "r": [b"a"]}, "bad_frame"),
    ({"t": "ping", "id": "x"}, "bad_frame"),
    ({"t": "ping", "id": -1}, "bad_frame"),
    ({"t": "hello", "client": ""}, "bad_frame"),
    ({"t": "hello", "client": "x" * 257}, "bad_frame"),
    ({"t": "hello", "client": 5}, "bad_frame"),
    ({"t": "hello", "token": b"tok"}, "bad_frame"),
    ({"t": "hello", "info": {"k": {"deep": [1]}}}, "bad_frame"),
    ({"t": "hello", "info": "role=agent"}, "bad_frame"),
    ({"t": "presence"}, "bad_frame"),
    ({"t": "presence", "s": 5, "id": "1"}, "bad_frame"),
    ({"t": "welcome", "v": 0, "client": "c", "conn": "k", "heartbeat": 1, "max_message": 1},
     "bad_frame"),
    ({"t": "welcome", "v": 1, "client": "c", "conn": "k", "heartbeat": 0, "max_message": 1},
     "bad_frame"),
    ({"t": "welcome", "v": 1, "client": "c", "heartbeat": 1, "max_message": 1}, "bad_frame"),
    ({"t": "error", "code": "", "message": "m"}, "bad_frame"),
    ({"t": "error", "code": "c", "message": "m", "retry_after": -1}, "bad_frame"),
    ({"t": "error", "code": "c", "message": "m", "retry_after": float("inf")}, "bad_frame"),
    ({"t": "refresh", "token": "tok"}, "bad_frame"),
    ({"t": "refresh", "id": "1", "token": "tok"}, "bad_frame"),
    ({"t": "refreshed", "ttl": 5}, "bad_frame"),
    ({"t": "expiring"}, "bad_frame"),
    ({"t": "expiring", "ttl": -0.5}, "bad_frame"),
    ({"t": "expiring", "ttl": float("nan")}, "bad_frame"),
    ({"t": "expiring", "ttl": "60"}, "bad_frame"),
    ({"t": "welcome", "v": 1, "client": "c", "conn": "k", "heartbeat": 1, "max_message": 1,
      "ttl": -1}, "bad_frame"),
]


@pytest.mark.parametrize("m, code", BAD_MAPS, ids=repr)
def test_bad_frame_names_its_request(m: dict[str, Any], code: str) -> None:
    if code == "ok":
        decode(pack(m))
        return
    with pytest.raises(FrameError) as e:
        decode(pack(m))
    assert e.value.code == code
    assert (e.value.session, e.value.request_id) == ("chat", 7 if "id" in m else None)


@pytest.mark.parametrize("m, code", BAD_ANONYMOUS, ids=repr)
def test_bad_frame_without_a_request(m: dict[str, Any], code: str) -> None:
    with pytest.raises(FrameError) as e:
        decode(pack(m))
    assert (e.value.code, e.value.session, e.value.request_id) == (code, None, None)


@pytest.mark.parametrize("m", [
    {"t": "ack", "id": 1, "s": "chat", "count": 1},
    {"t": "ack", "id": 1, "s": "chat", "offset": 0, "dup": True},
    {"t": "attached", "id": 1, "s": "chat", "epoch": 0, "offset": -1, "next": 0, "closed": False},
    {"t": "data", "s": "chat", "r": []},
    {"t": "data", "s": "chat", "r": [[0, 0, 0, None]]},
    {"t": "data", "s": "chat", "r": [[0, 0, 0, [None, None, None, None], b""]]},
    {"t": "data", "s": "chat", "r": [[0, 0, 0, [None, None, ["p", 0]], b""]]},
    {"t": "data", "s": "chat", "r": [[0, 0, 0, ["pub"], "text"]]},
    {"t": "data", "s": "chat", "r": [[1, 0, 0, None, b""], [1, 0, 0, None, b""]]},
    {"t": "event", "s": "chat", "e": "renamed"},
    {"t": "event", "s": "chat", "e": [1]},
    {"t": "event", "s": "chat", "e": "epoch_changed"},
    {"t": "event", "s": "chat", "e": "closed", "epoch": 1},
    {"t": "up_to_date", "s": "chat", "next": -1},
    {"t": "view", "s": "chat", "next": 3},
    {"t": "view", "s": "chat", "next": 3, "v": [1]},
    {"t": "view", "s": "chat", "next": 3, "v": {"next": 4}},
    {"t": "view", "s": "chat", "next": -1, "v": {"next": -1}},
    {"t": "members", "s": "chat"},
    {"t": "members", "s": "chat", "members": {"id": "x"}},
    {"t": "members", "s": "chat", "members": [["x", "y", "ws", 0]]},
    {"t": "members", "s": "chat", "members": [{"id": "x", "client": "y", "transport": "ws"}]},
    {"t": "join", "s": "chat"},
    {"t": "join", "s": "chat", "member": {"id": "", "client": "y", "transport": "ws",
                                          "since": 0}},
    {"t": "join", "s": "chat", "member": {"id": "x", "client": "y", "transport": "udp",
                                          "since": 0}},
    {"t": "leave", "s": "chat", "member": {"id": "x", "client": "y", "transport": "ws",
                                           "since": -1}},
    {"t": "leave", "s": "chat", "member": {"id": "x", "client": "y", "transport": "ws",
                                           "since": 0, "info": {"a": [1]}}},
])
def test_bad_server_frame(m: dict[str, Any]) -> None:
    with pytest.raises(FrameError) as e:
        decode(pack(m))
    assert (e.value.code, e.value.session) == ("bad_frame", "chat")


@pytest.mark.parametrize("make", [
    lambda: Attach(1 << 64, "s"),
    lambda: Attach(True, "s"),
    lambda: Attach(1, "s", -3),
    lambda: Publish(1, "s", (bytearray(b"x"),)),  # type: ignore[arg-type]
    lambda: Record(0, 0, 0, memoryview(b"x")),  # type: ignore[arg-type]
    lambda: Data("s", ((0, 0, 0, None, b"x"),)),  # type: ignore[arg-type]
    lambda: Ack(1, "s", 0),
])
def test_construction_validates(make: Any) -> None:
    with pytest.raises(FrameError):
        make()


def test_error_messages_stay_short() -> None:
    with pytest.raises(FrameError) as e:
        decode(pack({"t": "credit", "s": "chat", "n": "x" * 100_000}))
    assert len(str(e.value)) < 200 and "'n'" in str(e.value)


# ---------------------------------------------------------------- offsets

@pytest.mark.parametrize("value, expected", [
    (0, 0), (42, 42), (-1, START), ((1 << 64) - 1, (1 << 64) - 1),
    ("-1", START), ("now", NOW),
    ("0000000000000000_0000000000000000", 0), ("0000000000000000_0000000000000042", 42),
    ("0_7", 7), ("00000000000000000000_00000000000000000009", 9),
])
def test_parse_offset(value: object, expected: int) -> None:
    assert parse_offset(value) == expected


@pytest.mark.parametrize("value", [
    -2, -100, 1 << 64, True, False, 1.0, None, b"now", [0], "", "42", "NOW", "-2", " now",
    "0000000000000001_0000000000000042", "0000000000000000_", "_42", "0_0_0",
    "000000000000000000000_0", "0_" + "9" * 20, "\u0660_\u0661",
])
def test_parse_offset_refuses(value: object) -> None:
    with pytest.raises(FrameError) as e:
        parse_offset(value)
    assert e.value.code == "bad_offset"


# ---------------------------------------------------------------- properties

u64 = st.integers(0, (1 << 64) - 1)
names = st.text(min_size=1, max_size=40)
ints = st.integers(-(1 << 63), (1 << 64) - 1)     # what msgpack can carry
metas = st.none() | ints | st.text() | st.binary() | st.lists(ints, max_size=3) | \
    st.dictionaries(st.text(), st.booleans(), max_size=3)
producers = st.builds(Producer, names, u64, u64)


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    records = draw(st.lists(st.binary(max_size=20), min_size=1, max_size=30))
    meta = draw(st.none() | st.lists(metas, min_size=len(records), max_size=len(records)))
    return Publish(draw(u64), draw(names), tuple(records), draw(st.integers(0, 63)),
                   None if meta is None else tuple(meta), draw(st.none() | producers),
                   draw(st.booleans()))


@st.composite
def datas(draw: st.DrawFn) -> Data:
    offsets = sorted(draw(st.sets(u64, min_size=1, max_size=20)))
    records = [Record(o, draw(u64), draw(st.integers(0, 63)), draw(st.binary(max_size=20)),
                      draw(st.none() | st.text(min_size=1, max_size=128)), draw(metas),
                      draw(st.none() | producers)) for o in offsets]
    return Data(draw(names), tuple(records))


attaches = st.builds(Attach, u64, names, st.integers(NOW, 1 << 40), st.none() | u64,
                     st.none() | st.lists(st.integers(0, 63), min_size=1).map(tuple),
                     st.none() | st.integers(1, (1 << 64) - 1), st.booleans())


@given(publishes() | datas() | attaches)
def test_round_trip_property(frame: Any) -> None:
    assert decode(encode(frame)) == frame


KEYS = sorted({"t", "id", "s", "r", "offset", "epoch", "kinds", "credit", "create", "kind",
               "view", "meta", "producer", "n", "client", "token", "v", "conn", "heartbeat",
               "presence", "hidden", "info", "members", "member", "transport", "since",
               "max_message", "next", "closed", "count", "dup", "e", "code", "message"})
values = st.recursive(st.none() | st.booleans() | ints | st.floats() | st.text(max_size=5)
                      | st.binary(max_size=5) | st.sampled_from([t for t, _ in F._WIRE.values()]),
                      lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4), max_leaves=12)


@given(st.binary(max_size=64)
       | st.dictionaries(st.sampled_from(KEYS), values, max_size=8).map(pack))
def test_decode_garbage_raises_only_frame_error(data: bytes) -> None:
    try:
        decode(data)
    except FrameError:
        pass


@given(st.sampled_from(FRAMES), st.sampled_from(KEYS), values)
def test_a_mangled_field_raises_only_frame_error(frame: Any, key: str, value: Any) -> None:
    try:
        decode(pack({**wire(frame), key: value}))
    except FrameError:
        pass


# ---------------------------------------------------------------- handshake

def request_headers(**changes: str | None) -> list[tuple[bytes, bytes]]:
    base: dict[str, str | None] = {
        "host": "localhost:1", "upgrade": "websocket", "connection": "Upgrade",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==", "sec-websocket-version": "13",
        "sec-websocket-protocol": SUBPROTOCOL}
    base.update({k.replace("_", "-"): v for k, v in changes.items()})
    return [(k.encode(), v.encode()) for k, v in base.items() if v is not None]


def test_accept_key_rfc_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("changes", [
    {}, {"upgrade": "WebSocket"}, {"connection": "keep-alive, Upgrade"},
    {"sec_websocket_protocol": "chat, broker.v1"}, {"sec_websocket_version": "13, 8"},
    {"sec_websocket_extensions": "permessage-deflate"},
])
def test_server_handshake_accepts(changes: dict[str, str]) -> None:
    response = server_handshake("GET", request_headers(**changes))
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert b"Sec-WebSocket-Protocol: broker.v1\r\n" in response
    assert b"Extensions" not in response and response.endswith(b"\r\n\r\n")


def test_subprotocol_over_several_header_lines() -> None:
    headers = request_headers(sec_websocket_protocol="chat")
    headers.append((b"sec-websocket-protocol", b"broker.v1"))
    server_handshake("GET", headers)


@pytest.mark.parametrize("method, changes, status, code", [
    ("POST", {}, 400, "bad_handshake"),
    ("GET", {"host": None}, 400, "bad_handshake"),
    ("GET", {"upgrade": None}, 400, "bad_handshake"),
    ("GET", {"upgrade": "h2c"}, 400, "bad_handshake"),
    ("GET", {"connection": "keep-alive"}, 400, "bad_handshake"),
    ("GET", {"sec_websocket_version": None}, 400, "bad_handshake"),
    ("GET", {"sec_websocket_version": "8"}, 426, "bad_handshake"),
    ("GET", {"sec_websocket_key": None}, 400, "bad_handshake"),
    ("GET", {"sec_websocket_key": "not base64!"}, 400, "bad_handshake"),
    ("GET", {"sec_websocket_key": "AAAA"}, 400, "bad_handshake"),
    ("GET", {"sec_websocket_protocol": None}, 400, "bad_subprotocol"),
    ("GET", {"sec_websocket_protocol": "broker.v2, chat"}, 400, "bad_subprotocol"),
    ("GET", {"sec_websocket_protocol": "Broker.V1"}, 400, "bad_subprotocol"),
])
def test_server_handshake_refuses(method: str, changes: dict[str, str | None], status: int,
                                  code: str) -> None:
    with pytest.raises(HandshakeError) as e:
        server_handshake(method, request_headers(**changes))
    assert (e.value.status, e.value.code) == (status, code)
    if status == 426:
        assert e.value.headers == (("Sec-WebSocket-Version", "13"),)


def parse_request(raw: bytes) -> tuple[str, str, list[tuple[bytes, bytes]]]:
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert rest == b""
    first, *lines = head.split(b"\r\n")
    method, path, version = first.decode().split(" ")
    assert version == "HTTP/1.1"
    headers = [(k.strip().lower(), v.strip()) for k, _, v in (ln.partition(b":") for ln in lines)]
    return method, path, headers


def test_client_and_server_agree() -> None:
    raw, key = client_request("example.com:8080", extra_headers=[("Authorization", "Bearer t")])
    method, path, headers = parse_request(raw)
    assert path == "/v1/ws" and (b"authorization", b"Bearer t") in headers
    response = server_handshake(method, headers)
    check_server_response(response, key)
    check_server_response(response.rstrip(b"\r\n"), key)


def test_client_request_keeps_a_given_key_and_refuses_crlf() -> None:
    raw, key = client_request("h", "/x", key="dGhlIHNhbXBsZSBub25jZQ==")
    assert key == "dGhlIHNhbXBsZSBub25jZQ==" and raw.startswith(b"GET /x HTTP/1.1\r\n")
    with pytest.raises(ValueError):
        client_request("h\r\nX-Evil: 1")


GOOD_101 = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
            b"Sec-WebSocket-Protocol: broker.v1\r\n\r\n")


@pytest.mark.parametrize("head, status, code", [
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", 400, "bad_handshake"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", 0, "bad_handshake"),
    (GOOD_101.replace(b"s3pP", b"AAAA"), 101, "bad_handshake"),
    (GOOD_101.replace(b"Upgrade: websocket\r\n", b""), 101, "bad_handshake"),
    (GOOD_101.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"),
     101, "bad_handshake"),
    (GOOD_101.replace(b"Sec-WebSocket-Protocol: broker.v1\r\n", b""), 101, "bad_subprotocol"),
    (GOOD_101.replace(b"broker.v1", b"broker.v2"), 101, "bad_subprotocol"),
])
def test_check_server_response_refuses(head: bytes, status: int, code: str) -> None:
    check_server_response(GOOD_101, "dGhlIHNhbXBsZSBub25jZQ==")
    with pytest.raises(HandshakeError) as e:
        check_server_response(head, "dGhlIHNhbXBsZSBub25jZQ==")
    assert (e.value.status, e.value.code) == (status, code)

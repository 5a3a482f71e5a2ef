"""broker/_convo.py: the AI message model's fold, snapshots, encoders, batching.

Most tests drive the fold with records made by ``Encoder`` (or by hand, for
malformed ones) and need no server, as codec tests need no sockets.  The last
two publish a conversation through a real server over the WebSocket and the
HTTP API, in a binary and a JSON session, and check that every way of
reading it back folds to the same view, and that ``kinds: [1]`` still gives
an agent the signals alone.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import msgpack
import pytest
import trio

from broker._convo import (
    CANCELLED,
    COMPLETE,
    ERROR,
    Batch,
    Coalescer,
    Conversation,
    Draft,
    Encoder,
    Kind,
    Message,
    ToolCall,
    View,
    coalesce,
    frames_saved,
)
from broker.client import connect
from conftest import Served

WAIT = 20            # seconds: a bound on waits that should take milliseconds


def fold(drafts: list[Draft], *, json_session: bool = False,
         publisher: str | None = "agent") -> Conversation:
    conv = Conversation(json=json_session)
    for offset, d in enumerate(drafts):
        assert conv.apply(offset, d.kind, publisher, d.meta, d.payload) is None, d
    return conv


def scripted(enc: Encoder) -> list[Draft]:
    """A turn: a user message, an answer with a tool call that needs
    approval, a run cancel, and the answer ending as cancelled."""
    return [
        enc.message("u1", "user", "What is the weather?"),
        enc.state("thinking"),
        enc.start("m1", "assistant", "Let me ", reply_to="u1"),
        enc.delta("m1", "check. "),
        enc.tool_call("c1", "weather", {"city": "Oslo"}, approval=True, message="m1"),
        enc.state("awaiting_approval", "may I?", ref="c1"),
        enc.approve("c1", id="s1"),
        enc.tool_result("c1", {"temp": -3}),
        enc.delta("m1", "It is \u22123 \u00b0C"),
        enc.cancel(reason="enough", id="s2"),
        enc.end("m1", ".", outcome=CANCELLED),
        enc.state("idle"),
    ]


# ---------------------------------------------------------------- folding

@pytest.mark.parametrize("json_session", [False, True])
def test_a_turn_folds_to_whole_items(json_session: bool) -> None:
    v = fold(scripted(Encoder(json=json_session)), json_session=json_session).view()
    u1, m1 = v.messages
    assert (u1.role, u1.text, u1.outcome, u1.end, u1.open) == ("user", "What is the weather?",
                                                               COMPLETE, 0, False)
    assert m1 == Message("m1", "assistant", "agent", 2,
                         "Let me check. It is \u22123 \u00b0C.".encode(), CANCELLED, None, 10,
                         "u1", 9)
    (c1,) = v.tool_calls
    assert c1 == ToolCall("c1", "weather", "agent", 4, b'{"city":"Oslo"}', "m1", True, True, 6,
                          COMPLETE, b'{"temp":-3}', None, 7, "agent", None)
    assert [i.id for i in v.items] == ["u1", "m1", "c1"]
    assert v.open_tool_calls == () and v.pending_approvals == ()
    assert [(s.type, s.ref, s.target, s.approved, s.text) for s in v.signals] == [
        ("approve", "c1", "tool_call", True, ""), ("cancel", None, "run", None, "enough")]
    assert v.state is not None and (v.state.state, v.state.offset) == ("idle", 11)
    assert v.next == 12 and v.anomalies == ()
    assert v.item("c1") == c1 and v.item("nope") is None


def test_a_view_mid_turn_shows_what_is_open() -> None:
    v = fold(scripted(Encoder())[:6]).view()
    (m1,) = [m for m in v.messages if m.open]
    assert m1.text == "Let me check. " and m1.end is None
    assert [c.id for c in v.open_tool_calls] == ["c1"] == [c.id for c in v.pending_approvals]
    assert v.state is not None and (v.state.state, v.state.ref, v.state.detail) == (
        "awaiting_approval", "c1", b"may I?")


def test_kind_zero_is_left_alone_and_gaps_are_fine() -> None:
    conv = Conversation()
    assert conv.apply(0, 0, "x", {"id": "m1"}, b"anything") is None
    assert conv.apply(5, Kind.START, "a", {"id": "m1", "role": "user"}, b"hi") is None
    conv.advance(9)
    assert conv.view().next == 9 and conv.view().anomalies == ()
    assert conv.view().messages[0].offset == 5


@pytest.mark.parametrize("offset,kind,publisher,error", [
    (2, 2, None, ValueError),         # below what is folded
    (9, 64, None, ValueError),        # not a kind
    (9, -1, None, ValueError),
    (9, 2, 7, TypeError),             # a publisher is a str
])
def test_the_callers_mistakes_raise(offset: int, kind: int, publisher: Any,
                                    error: type[Exception]) -> None:
    conv = Conversation()
    conv.apply(2, 0, None, None, b"")
    with pytest.raises(error):
        conv.apply(offset, kind, publisher, {}, b"")
    with pytest.raises(ValueError):
        conv.advance(1)


# ---------------------------------------------------------------- malformed records

E = Encoder()
SETUP = [E.start("m1", "assistant", "a"), E.start("m2", "assistant", "b"), E.end("m2"),
         E.tool_call("c1", "t", approval=True), E.tool_call("c2", "t"), E.tool_result("c2"),
         E.cancel("m1", id="s1")]
LONG = "x" * 257

# (kind, publisher, meta, payload, code); every one leaves the view as it was.
MALFORMED: list[tuple[int, str | None, Any, bytes, str]] = [
    *[(k, "agent", meta, b"", "bad_meta") for k in range(1, 8)
      for meta in (None, 3, "id", [1, 2], b"m1")],
    (2, "agent", {"id": 5, "role": "user"}, b"", "bad_meta"),
    (2, "agent", {"id": "m9"}, b"", "bad_meta"),                       # no role
    (2, "agent", {"id": LONG, "role": "user"}, b"", "bad_meta"),
    (2, "agent", {"id": "", "role": "user"}, b"", "bad_meta"),
    (2, "agent", {"id": "m9", "role": "user", "outcome": "done"}, b"", "bad_meta"),
    (2, "agent", {"id": "m9", "role": "user", "reply_to": 4}, b"", "bad_meta"),
    (3, "agent", {"id": ["m1"]}, b"x", "bad_meta"),
    (4, "agent", {"id": "m1", "outcome": ["complete"]}, b"", "bad_meta"),
    (4, "agent", {"id": "m1", "error": 500}, b"", "bad_meta"),
    (5, "agent", {"id": "c9"}, b"", "bad_meta"),                         # no name
    (5, "agent", {"id": "c9", "name": "t", "approval": 1}, b"", "bad_meta"),
    (6, "agent", {"id": "c1", "outcome": "ok"}, b"", "bad_meta"),
    (7, "agent", {"state": None}, b"", "bad_meta"),
    (7, "agent", {"state": "tool", "ref": {"id": "c1"}}, b"", "bad_meta"),
    (1, "agent", {"id": "s9"}, b"", "bad_meta"),                         # no signal type
    (1, "agent", {"signal": "approve", "approved": True}, b"", "bad_meta"),   # no ref
    (1, "agent", {"signal": "approve", "ref": "c1"}, b"", "bad_meta"),        # no answer
    (1, "agent", {"signal": "approve", "ref": "c1", "approved": 1}, b"", "bad_meta"),
    (1, "agent", {"signal": "reject"}, b"", "bad_meta"),
    (2, "agent", {"id": "m1", "role": "user"}, b"", "duplicate_id"),
    (2, "agent", {"id": "c1", "role": "user"}, b"", "duplicate_id"),
    (5, "agent", {"id": "m2", "name": "t"}, b"", "duplicate_id"),
    (3, "agent", {"id": "nope"}, b"x", "unknown_id"),
    (3, "agent", {"id": "c1"}, b"x", "unknown_id"),                      # a tool call
    (4, "agent", {"id": "nope"}, b"", "unknown_id"),
    (6, "agent", {"id": "m1"}, b"", "unknown_id"),                       # a message
    (3, "mallory", {"id": "m1"}, b"x", "wrong_publisher"),
    (3, None, {"id": "m1"}, b"x", "wrong_publisher"),
    (4, "mallory", {"id": "m1", "outcome": ERROR}, b"", "wrong_publisher"),
    (3, "agent", {"id": "m2"}, b"x", "after_end"),
    (4, "agent", {"id": "m2"}, b"", "after_end"),
    (6, "agent", {"id": "c2"}, b"1", "after_end"),
    (1, "agent", {"signal": "cancel", "id": "s1", "ref": "c1"}, b"", "duplicate_signal"),
    (8, "agent", {"id": "m1"}, b"", "reserved_kind"),
    (63, None, None, b"", "reserved_kind"),
]


@pytest.mark.parametrize("kind,publisher,meta,payload,code", MALFORMED)
def test_a_malformed_record_is_skipped_and_counted(kind: int, publisher: str | None, meta: Any,
                                                   payload: bytes, code: str) -> None:
    conv = fold(SETUP)
    before = conv.view()
    assert conv.apply(len(SETUP), kind, publisher, meta, payload) == code
    assert conv.view() == _moved(before, len(SETUP) + 1, {code: 1})


@pytest.mark.parametrize("kind,meta", [(3, {"id": "m1"}), (4, {"id": "m1"}),
                                       (7, {"state": "x"}), (2, {"id": "m9", "role": "u"}),
                                       (1, {"signal": "input"})])
@pytest.mark.parametrize("payload", [b"42", b'{"a":"b"}', b"[]", b"\xff\xfe", b'"open',
                                     b"", b"null"])
def test_json_sessions_take_only_json_strings_as_text(kind: int, meta: dict[str, Any],
                                                      payload: bytes) -> None:
    conv = fold([Encoder(json=True).start("m1", "assistant", "a")], json_session=True)
    before = conv.view()
    assert conv.apply(1, kind, "agent", meta, payload) == "bad_payload"
    assert conv.view() == _moved(before, 2, {"bad_payload": 1})
    # The same payloads are text in a binary session: bytes are bytes.
    binary = fold([E.start("m1", "assistant", "a")])
    assert binary.apply(1, 3, "agent", {"id": "m1"}, payload) is None
    assert binary.view().messages[0].data == b"a" + payload


def test_unknown_keys_are_ignored() -> None:
    conv = Conversation()
    assert conv.apply(0, 2, "a", {"id": "m1", "role": "user", "colour": [1], 7: None},
                      b"hi") is None
    assert conv.view().messages[0].text == "hi"


def _moved(view: View, next_: int, counted: dict[str, int]) -> View:
    counts = dict(view.anomalies)
    for code, n in counted.items():
        counts[code] = counts.get(code, 0) + n
    return View(next_, view.items, view.signals, view.states, tuple(sorted(counts.items())))


# ---------------------------------------------------------------- signals

def test_a_run_cancel_reaches_what_is_open_then_and_nothing_else() -> None:
    drafts = [E.message("u1", "user", "go"), E.start("m1", "assistant"), E.tool_call("c1", "t"),
              E.start("m2", "assistant"), E.end("m2"), E.cancel("c1", id="s1"),
              E.cancel(id="s2"), E.cancel(id="s3"), E.start("m3", "assistant")]
    v = fold(drafts).view()
    cancels = {i.id: i.cancel for i in v.items}
    # c1 keeps the first cancel that reached it; m2 had ended, m3 came later.
    assert cancels == {"u1": None, "m1": 6, "c1": 5, "m2": None, "m3": None}
    # A cancel is a request: only the agent's end record ends a message.
    m1 = v.item("m1")
    assert isinstance(m1, Message) and m1.open
    assert [s.target for s in v.signals] == ["tool_call", "run", "run"]


def test_the_first_decision_wins_until_the_result() -> None:
    drafts = [E.tool_call("c1", "send", approval=True), E.tool_call("c2", "t", approval=True),
              E.tool_call("c3", "t"),
              E.signal("reject", ref="c1", id="s1"), E.approve("c1", id="s2"),
              E.tool_result("c2", outcome=CANCELLED, error="timed out"),
              E.approve("c2", id="s3"), E.approve("c3", False, "no", id="s4")]
    v = fold(drafts).view()
    c1, c2, c3 = v.tool_calls
    assert (c1.approved, c1.decided, c1.pending_approval) == (False, 3, False)
    assert (c2.approved, c2.outcome, c2.error) == (None, CANCELLED, "timed out")
    assert (c3.approved, c3.decided, c3.approval) == (False, 7, False)
    assert [s.approved for s in v.signals] == [False, True, True, False]


def test_a_pending_approval_is_listed_until_decided() -> None:
    conv = fold([E.tool_call("c1", "send", approval=True)])
    assert [c.id for c in conv.view().pending_approvals] == ["c1"]
    d = E.approve("c1", id="s1")
    conv.apply(1, d.kind, "phone", d.meta, d.payload)
    assert conv.view().pending_approvals == ()


def test_a_signal_naming_nothing_is_kept_and_counted() -> None:
    conv = Conversation()
    for offset, d in enumerate([E.cancel("ghost", id="s1"), E.input("hello", id="s2"),
                                E.signal("custom", "x", ref="ghost", id="s3")]):
        conv.apply(offset, d.kind, "user", d.meta, d.payload)
    v = conv.view()
    assert [(s.type, s.target, s.text) for s in v.signals] == [
        ("cancel", None, ""), ("input", None, "hello"), ("custom", None, "x")]
    assert v.anomalies == (("unknown_ref", 2),)


def test_states_are_kept_per_publisher() -> None:
    conv = Conversation()
    for offset, (pub, state) in enumerate([("a", "thinking"), ("b", "tool"), ("a", "idle"),
                                           (None, "thinking")]):
        d = E.state(state)
        conv.apply(offset, d.kind, pub, d.meta, d.payload)
    v = conv.view()
    assert [(s.publisher, s.state) for s in v.states] == [("b", "tool"), ("a", "idle"),
                                                          (None, "thinking")]
    assert v.state is not None and v.state.publisher is None


def test_tool_results_may_come_from_anyone() -> None:
    conv = fold([E.tool_call("c1", "locate")])
    d = E.tool_result("c1", {"lat": 1})
    assert conv.apply(1, d.kind, "phone", d.meta, d.payload) is None
    assert conv.view().tool_calls[0].result_publisher == "phone"


# ---------------------------------------------------------------- snapshots

def test_snapshots_round_trip_in_both_forms() -> None:
    records: list[tuple[int, int, str | None, Any, bytes]] = [
        (o, d.kind, "agent", d.meta, d.payload) for o, d in enumerate(scripted(Encoder())[:9])]
    records += [(9, 3, "agent", {"id": "m1"}, b"\xe2\x88"),   # half a character: not UTF-8
                (10, 3, "x", {"id": "m1"}, b""),               # counted
                (11, 3, "agent", {"id": "m1"}, b"\x92")]       # the other half
    conv, full = Conversation(), Conversation()
    for r in records[:-1]:
        conv.apply(*r)
    for r in records:
        full.apply(*r)
    binary = msgpack.unpackb(msgpack.packb(conv.to_snapshot()), raw=False)
    text = json.loads(json.dumps(conv.to_snapshot(text=True)))
    assert text["items"][0][5] == "What is the weather?"
    # Not UTF-8: base64 in the text form.
    assert base64.b64decode(text["items"][1][5][0]) == conv.view().messages[1].data
    for snap in (binary, text):
        again = Conversation.from_snapshot(snap)
        assert again.view() == conv.view()
        assert again.to_snapshot() == conv.to_snapshot()
        again.apply(*records[-1])
        assert again.view() == full.view()
    assert full.view().messages[1].text.endswith("\u2212")


def _snap(**change: Any) -> dict[str, Any]:
    snap = fold(scripted(Encoder())).to_snapshot()
    snap.update(change)
    return snap


@pytest.mark.parametrize("snap", [
    None, [], {}, {"v": 2}, _snap(v=2), _snap(v="1"), _snap(json=1), _snap(next=-1),
    _snap(items=[["x", "m1"]]), _snap(items=[["m", "m1"]]),
    _snap(items=[["m", "m1", "user", None, 0, "text not bytes", None, None, None, None, None]]),
    _snap(items=[["m", "m1", "user", None, 0, b"", "done", None, None, None, None]]),
    _snap(items=_snap()["items"] * 2),
    _snap(signals=[[0, None, "cancel", None, None, "everything", None, b""]]),
    _snap(states=[[0, None, "idle", None]]),
    _snap(anomalies=[["bad_meta", True]]),
    _snap(text=True),                         # bytes where the text form has strings
    {**fold(scripted(Encoder())).to_snapshot(text=True),
     "items": [["m", "m1", "user", None, 0, ["not base64!"], None, None, None, None, None]]},
])
def test_a_bad_snapshot_is_refused(snap: Any) -> None:
    with pytest.raises(ValueError):
        Conversation.from_snapshot(snap)


# ---------------------------------------------------------------- encoders

@pytest.mark.parametrize("make", [
    lambda e: e.start(""), lambda e: e.start("x" * 257), lambda e: e.start(7),
    lambda e: e.start("m", role=""), lambda e: e.start("m", outcome="done"),
    lambda e: e.end("m", outcome="ok"), lambda e: e.end("m", error=3),
    lambda e: e.tool_call("c", ""), lambda e: e.tool_result("c", float("nan")),
    lambda e: e.tool_call("c", "t", {1, 2}), lambda e: e.state(""),
    lambda e: e.signal("approve", ref="c"), lambda e: e.signal("reject"),
    lambda e: e.cancel(id=""), lambda e: e.delta("m", "\ud800"),
])
@pytest.mark.parametrize("json_session", [False, True])
def test_encoders_refuse_what_the_fold_would_skip(make: Any, json_session: bool) -> None:
    with pytest.raises(ValueError):
        make(Encoder(json=json_session))


def test_json_session_text_must_be_utf8() -> None:
    with pytest.raises(ValueError):
        Encoder(json=True).delta("m", b"\xff")
    assert Encoder().delta("m", b"\xff").payload == b"\xff"
    assert Encoder(json=True).delta("m", "\u00e9\"").payload == '"\u00e9\\""'.encode()


def test_signals_get_fresh_ids_and_follow_the_client_convention() -> None:
    a, b = E.cancel(), E.cancel()
    assert a.kind == 1 == Kind.SIGNAL.value and a.meta["signal"] == "cancel"
    assert a.meta["id"] != b.meta["id"] and "ref" not in a.meta
    assert E.approve("c1", False, "no").meta | {"id": "x"} == {
        "signal": "approve", "ref": "c1", "approved": False, "id": "x"}
    assert E.tool_call("c", "t", b'{"raw":1}').payload == b'{"raw":1}'
    assert E.tool_call("c", "t").payload == b"null"


# ---------------------------------------------------------------- batching

@pytest.mark.parametrize("rate,window_ms,records", [
    (20, 30, 1000), (50, 30, 500), (100, 30, 334), (300, 30, 112), (100, 20, 500),
    (100, 40, 250),
])
def test_frames_saved_by_rate(rate: int, window_ms: int, records: int) -> None:
    """The table in docs/ai.md ("Batching deltas"): 1,000 evenly spaced tokens.
    Times are microseconds, so the window edges are exact."""
    batches = coalesce([(i * 1_000_000 // rate, "tok") for i in range(1000)],
                       window=window_ms * 1000)
    assert len(batches) == records
    assert frames_saved(batches) == 1000 - records
    assert b"".join(b.data for b in batches) == b"tok" * 1000


def test_a_coalescer_sends_on_its_deadline_when_full_and_on_flush() -> None:
    c = Coalescer(window=30, max_bytes=8)
    assert c.deadline() is None and c.push(0, "ab") == [] and c.deadline() == 30
    assert c.poll(9) is None
    assert c.push(10, "cd") == [] and c.poll(29) is None
    assert c.push(30, "ef") == [Batch(0, 30, b"abcd", 2)]          # fell due first
    assert c.push(31, b"ghijkl") == [Batch(30, 31, b"efghijkl", 2)]  # full
    assert c.push(40, "m") == [] and c.flush(41) == Batch(40, 41, b"m", 1)
    assert c.flush(42) is None and c.poll(100) is None
    with pytest.raises(ValueError):
        c.push(5, "late")


def test_a_zero_window_sends_every_delta_alone() -> None:
    batches = coalesce([(0, "a"), (0, "b"), (1, "c")], window=0)
    assert [(b.sent, b.data) for b in batches] == [(0, b"a"), (0, b"b"), (1, b"c")]


@pytest.mark.parametrize("window,max_bytes", [(-1, 10), (float("nan"), 10),
                                              (float("inf"), 10), (0.03, 0)])
def test_a_coalescer_refuses_bad_settings(window: float, max_bytes: int) -> None:
    with pytest.raises(ValueError):
        Coalescer(window, max_bytes)


# ---------------------------------------------------------------- over a real server

async def _publish(session: Any, drafts: list[Draft]) -> None:
    for d in drafts:
        await session.publish([d.payload], kind=d.kind, meta=[d.meta])


async def _read_ws(served: Served, name: str, count: int,
                   kinds: list[int] | None = None) -> list[Any]:
    async with connect(served.ws_url, client_id="reader") as c, \
            c.session(name).subscribe("-1", kinds=kinds) as sub:
        with trio.fail_after(WAIT):
            return [await sub.__anext__() for _ in range(count)]


async def _read_http(served: Served, name: str, **query: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=served.http_url, timeout=WAIT) as h:
        r = await h.get(f"/v1/stream/{name}",
                        params={"offset": "-1", "view": "records", **query})
        assert r.status_code == 200, r.text
        records: list[dict[str, Any]] = r.json()
        return records


async def test_a_binary_session_over_the_websocket(served: Served) -> None:
    drafts = scripted(Encoder())
    async with connect(served.ws_url, client_id="agent") as agent:
        await agent.session("ai/bin").publish([b"not ai"], create=True)      # kind 0
        await _publish(agent.session("ai/bin"), drafts)
    expected = Conversation()
    expected.apply(0, 0, "agent", None, b"not ai")
    for offset, d in enumerate(drafts, 1):
        expected.apply(offset, d.kind, "agent", d.meta, d.payload)

    ws = Conversation()
    for record in await _read_ws(served, "ai/bin", len(drafts) + 1):
        assert ws.apply_record(record) is None
    http = Conversation()
    for obj in await _read_http(served, "ai/bin"):
        assert obj.get("b64") and http.apply_view_record(obj) is None
    assert ws.view() == http.view() == expected.view()
    assert ws.view().messages[1].text == "Let me check. It is \u22123 \u00b0C."

    # An agent still hears the humans alone: signals keep kind 1.
    signals = await _read_ws(served, "ai/bin", 2, kinds=[1])
    assert [(r.kind, r.meta["signal"]) for r in signals] == [(1, "approve"), (1, "cancel")]
    assert [r["k"] for r in await _read_http(served, "ai/bin", kinds="1")] == [1, 1]


async def test_a_json_session_over_http_and_the_websocket(served: Served) -> None:
    enc = Encoder(json=True)
    drafts = scripted(enc)
    # Each request carries one kind; two deltas of one message go in one POST.
    groups: list[list[Draft]] = [[d] for d in drafts[:3]] + [
        [drafts[3], enc.delta("m1", "")]] + [[d] for d in drafts[4:]]
    async with httpx.AsyncClient(base_url=served.http_url, timeout=WAIT) as h:
        r = await h.put("/v1/stream/ai/json", headers={"content-type": "application/json"})
        assert r.status_code == 201
        for group in groups:
            body = b"[" + b",".join(d.payload for d in group) + b"]"
            r = await h.post("/v1/stream/ai/json", content=body, headers={
                "content-type": "application/json", "broker-kind": str(group[0].kind),
                "broker-meta": json.dumps([d.meta for d in group])})
            assert r.status_code == 204, r.text
    # ... and the agent goes on over the WebSocket, in the same session.
    tail = [enc.start("m2", "assistant", "Anything else?"), enc.end("m2")]
    async with connect(served.ws_url, client_id="agent") as agent:
        await _publish(agent.session("ai/json"), tail)

    count = len(drafts) + 1 + len(tail)
    ws = Conversation(json=True)
    for record in await _read_ws(served, "ai/json", count):
        assert ws.apply_record(record) is None
    http = Conversation(json=True)
    for obj in await _read_http(served, "ai/json"):
        assert http.apply_view_record(obj) is None
    assert ws.view() == http.view()
    texts = [(m.id, m.text, m.outcome) for m in ws.view().messages]
    assert texts == [("u1", "What is the weather?", COMPLETE),
                     ("m1", "Let me check. It is \u22123 \u00b0C.", CANCELLED),
                     ("m2", "Anything else?", COMPLETE)]
    # HTTP appends carry no publisher with auth off; the agent's WebSocket
    # records carry its client id, each message's records from one publisher.
    assert [m.publisher for m in ws.view().messages] == [None, None, "agent"]
    assert [r["k"] for r in await _read_http(served, "ai/json", kinds="1")] == [1, 1]

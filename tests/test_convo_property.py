"""Property tests for broker/_convo.py: the fold is exact, snapshots resume it,
batching keeps the text.

Conversations are drawn as lists of operations (start, delta, end, tool
call, result, state, cancel, approve, input, garbage, offset gaps) and turned
into records by ``Script``, which also keeps the expected outcome in plain
dicts: the text of every message, every call's decision and result, the
first cancel that reached each item, the anomaly counts.  Garbage is built
to be wrong in one known way, so the script knows its code.  A second
strategy draws records with arbitrary meta (any msgpack-like value, keys from
the model) to find inputs that crash the fold.

Properties:
- the fold's view is the script's expectation;
- folding one record at a time equals folding each prefix from scratch;
- a snapshot at any cut (msgpack or the JSON text form), restored and fed the
  rest, equals the full fold;
- batching deltas never reorders them and keeps their text, and a log
  written with batches folds to the same message as one written without.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker._convo import (
    CANCELLED,
    COMPLETE,
    ERROR,
    Conversation,
    Draft,
    Encoder,
    coalesce,
    frames_saved,
)

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
PUBS = ("agent", "helper", None)
OUTCOMES = (COMPLETE, CANCELLED, ERROR)
STATES = ("idle", "thinking", "writing", "tool", "awaiting_approval")
Rec = tuple[int, int, "str | None", Any, bytes]
T = TypeVar("T")


# ---------------------------------------------------------------- the script

@dataclass
class Script:
    """Records for a drawn conversation, and what folding them must give."""

    json: bool
    records: list[Rec] = field(default_factory=list)
    offset: int = 0
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)        # item ids, opening order
    signals: list[Rec] = field(default_factory=list)      # kept ones with an id
    kept_signals: int = 0
    states: dict[str | None, str] = field(default_factory=dict)
    anomalies: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.enc = Encoder(json=self.json)

    def add(self, d: Draft | tuple[int, Any, bytes], publisher: str | None,
            code: str | None = None) -> int:
        kind, meta, payload = (d.kind, d.meta, d.payload) if isinstance(d, Draft) else d
        self.records.append((self.offset, kind, publisher, meta, payload))
        if code is not None:
            self.anomalies[code] += 1
        self.offset += 1
        return self.offset - 1

    def pick(self, pool: dict[str, dict[str, Any]], i: int) -> str | None:
        return list(pool)[i % len(pool)] if pool else None

    def open_ids(self) -> list[str]:
        return [i for i in self.order
                if (self.messages.get(i) or self.calls[i])["outcome"] is None]

    def run(self, ops: list[tuple[Any, ...]]) -> None:
        for op in ops:
            getattr(self, "op_" + op[0])(*op[1:])

    # ------------------------------------------------------------ valid-ish ops

    def op_start(self, pub: int, text: str, whole: bool) -> None:
        mid = f"m{len(self.messages)}"
        publisher = PUBS[pub]
        d = self.enc.start(mid, "assistant", text, outcome=COMPLETE if whole else None)
        self.add(d, publisher)
        self.messages[mid] = {"publisher": publisher, "data": text.encode(),
                              "outcome": COMPLETE if whole else None, "cancel": None}
        self.order.append(mid)

    def _continue(self, i: int, other: int, make: Any) -> dict[str, Any] | None:
        """A delta or end for a picked message; what it should change, or None."""
        mid = self.pick(self.messages, i)
        if mid is None:
            self.add(make("zz-none"), "agent", "unknown_id")
            return None
        m = self.messages[mid]
        publisher = m["publisher"] if other == 0 else \
            next(p for p in PUBS[other:] + PUBS if p != m["publisher"])
        code = ("wrong_publisher" if publisher != m["publisher"]
                else "after_end" if m["outcome"] is not None else None)
        self.add(make(mid), publisher, code)
        return m if code is None else None

    def op_delta(self, i: int, text: str, other: int) -> None:
        m = self._continue(i, other, lambda mid: self.enc.delta(mid, text))
        if m is not None:
            m["data"] += text.encode()

    def op_end(self, i: int, text: str, other: int, outcome: int) -> None:
        m = self._continue(i, other, lambda mid: self.enc.end(mid, text,
                                                              outcome=OUTCOMES[outcome]))
        if m is not None:
            m["data"] += text.encode()
            m["outcome"] = OUTCOMES[outcome]

    def op_call(self, pub: int, approval: bool) -> None:
        cid = f"c{len(self.calls)}"
        self.add(self.enc.tool_call(cid, "search", {"q": cid}, approval=approval), PUBS[pub])
        self.calls[cid] = {"outcome": None, "approved": None, "cancel": None}
        self.order.append(cid)

    def op_result(self, i: int, pub: int, outcome: int) -> None:
        cid = self.pick(self.calls, i) or "zz-none"
        c = self.calls.get(cid)
        code = "unknown_id" if c is None else "after_end" if c["outcome"] is not None else None
        self.add(self.enc.tool_result(cid, [i], outcome=OUTCOMES[outcome]), PUBS[pub], code)
        if c is not None and code is None:
            c["outcome"] = OUTCOMES[outcome]

    def op_state(self, pub: int, state: str) -> None:
        self.add(self.enc.state(state), PUBS[pub])
        self.states[PUBS[pub]] = state

    def _signal(self, d: Draft, known: bool) -> int:
        offset = self.add(d, "user", None if known else "unknown_ref")
        self.signals.append(self.records[-1])
        self.kept_signals += 1
        return offset

    def op_cancel(self, i: int) -> None:
        sid = f"s{self.offset}"
        if i < 0:
            victims = self.open_ids()
            offset = self._signal(self.enc.cancel(id=sid), True)
        elif not self.order:
            self._signal(self.enc.cancel("ghost", id=sid), False)
            return
        else:
            ref = self.order[i % len(self.order)]
            victims = [ref] if ref in self.open_ids() else []
            offset = self._signal(self.enc.cancel(ref, id=sid), True)
        for v in victims:
            item = self.messages.get(v) or self.calls[v]
            if item["cancel"] is None:
                item["cancel"] = offset

    def op_approve(self, i: int, answer: bool | str) -> None:
        sid = f"s{self.offset}"
        cid = self.pick(self.calls, i)
        ref = cid or "ghost"
        d = (self.enc.signal("reject", ref=ref, id=sid) if answer == "reject"
             else self.enc.approve(ref, bool(answer), id=sid))
        self._signal(d, cid is not None)
        c = self.calls.get(ref)
        if c is not None and c["approved"] is None and c["outcome"] is None:
            c["approved"] = answer is True

    def op_input(self, text: str) -> None:
        self._signal(self.enc.input(text, id=f"s{self.offset}"), True)

    def op_gap(self, n: int) -> None:
        self.offset += n           # records of other kinds, filtered out

    # ------------------------------------------------------------ garbage

    def op_garbage(self, what: str, i: int) -> None:
        mid = self.pick(self.messages, i) or "m0"
        if what == "meta_not_map":
            self.add((1 + i % 7, [None, 3, "x", [1], b"m"][i % 5], b""), "agent", "bad_meta")
        elif what == "id_not_text":
            self.add((2 + i % 5, {"id": i, "role": "user", "name": "t"}, b""), "agent",
                     "bad_meta")
        elif what == "bad_outcome":
            self.add((4, {"id": mid, "outcome": ["done", 1, None][i % 3]}, self.enc.text("")),
                     "agent", "bad_meta" if i % 3 != 2 else self._end_code(mid))
        elif what == "bad_signal":
            meta = [{"signal": "approve", "approved": True},
                    {"signal": "approve", "ref": "c0", "approved": 1},
                    {"signal": 7}, {"ref": "m0"}][i % 4]
            self.add((1, meta, self.enc.text("")), "user", "bad_meta")
        elif what == "long_id":
            self.add((2, {"id": "x" * 257, "role": "user"}, self.enc.text("")), "agent",
                     "bad_meta")
        elif what == "bad_payload" and self.json:
            self.add((3, {"id": mid}, [b"42", b"{}", b"\xff", b'"cut'][i % 4]), "agent",
                     "bad_payload")
        elif what == "duplicate_id" and self.order:
            self.add(self.enc.start(self.order[i % len(self.order)], "user"), "agent",
                     "duplicate_id")
        elif what == "duplicate_signal" and self.signals:
            _, kind, publisher, meta, payload = self.signals[i % len(self.signals)]
            self.add((kind, meta, payload), publisher, "duplicate_signal")
        elif what == "plain":
            self.add((0, {"id": mid}, b"kind 0 is not folded"), "agent")
        else:
            self.add((8 + i % 56, {"id": mid}, b""), "agent", "reserved_kind")

    def _end_code(self, mid: str) -> str | None:
        """An end with ``outcome: None`` is a plain end (complete)."""
        m = self.messages.get(mid)
        if m is None:
            return "unknown_id"
        if m["publisher"] != "agent":
            return "wrong_publisher"
        if m["outcome"] is not None:
            return "after_end"
        m["outcome"] = COMPLETE
        return None


TEXT = st.text(max_size=6)
IDX = st.integers(0, 40)
OPS = st.lists(st.one_of(
    st.tuples(st.just("start"), st.integers(0, 2), TEXT, st.booleans()),
    st.tuples(st.just("delta"), IDX, TEXT, st.sampled_from([0, 0, 0, 1, 2])),
    st.tuples(st.just("end"), IDX, TEXT, st.sampled_from([0, 0, 1]), st.integers(0, 2)),
    st.tuples(st.just("call"), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("result"), IDX, st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("state"), st.integers(0, 2), st.sampled_from(STATES)),
    st.tuples(st.just("cancel"), st.integers(-3, 40)),
    st.tuples(st.just("approve"), IDX, st.sampled_from([True, False, "reject"])),
    st.tuples(st.just("input"), TEXT),
    st.tuples(st.just("garbage"), st.sampled_from(
        ["meta_not_map", "id_not_text", "bad_outcome", "bad_signal", "long_id",
         "bad_payload", "duplicate_id", "duplicate_signal", "plain", "reserved"]), IDX),
    st.tuples(st.just("gap"), st.integers(1, 3)),
), max_size=45)


def script(ops: list[tuple[Any, ...]], json_session: bool) -> Script:
    s = Script(json_session)
    s.run(ops)
    return s


def fold(records: list[Rec], json_session: bool, next_: int | None = None) -> Conversation:
    conv = Conversation(json=json_session)
    for r in records:
        conv.apply(*r)
    if next_ is not None:
        conv.advance(next_)
    return conv


# ---------------------------------------------------------------- the fold

@SETTINGS
@given(OPS, st.booleans())
@example([("garbage", "bad_outcome", 2)], True)      # an end without outcome, in JSON
def test_the_fold_gives_what_the_script_expects(ops: list[tuple[Any, ...]],
                                                json_session: bool) -> None:
    s = script(ops, json_session)
    v = fold(s.records, json_session, s.offset).view()
    assert v.next == s.offset
    assert [i.id for i in v.items] == s.order
    assert {m.id: (m.publisher, m.data, m.outcome, m.cancel) for m in v.messages} == {
        k: (m["publisher"], m["data"], m["outcome"], m["cancel"]) for k, m in s.messages.items()}
    assert {c.id: (c.outcome, c.approved, c.cancel) for c in v.tool_calls} == {
        k: (c["outcome"], c["approved"], c["cancel"]) for k, c in s.calls.items()}
    assert len(v.signals) == s.kept_signals
    assert {st.publisher: st.state for st in v.states} == s.states
    assert dict(v.anomalies) == dict(s.anomalies)


@SETTINGS
@given(OPS, st.booleans())
def test_one_at_a_time_equals_every_prefix_from_scratch(ops: list[tuple[Any, ...]],
                                                        json_session: bool) -> None:
    records = script(ops, json_session).records
    live = Conversation(json=json_session)
    for n, r in enumerate(records):
        live.apply(*r)
        scratch = fold(records[:n + 1], json_session)
        assert live.view() == scratch.view()
        assert live.to_snapshot() == scratch.to_snapshot()


@SETTINGS
@given(OPS, st.booleans(), st.integers(0, 100), st.booleans())
def test_a_snapshot_at_any_cut_then_the_rest_equals_the_full_fold(
        ops: list[tuple[Any, ...]], json_session: bool, cut: int, text_form: bool) -> None:
    records = script(ops, json_session).records
    cut = cut % (len(records) + 1)
    snap = fold(records[:cut], json_session).to_snapshot(text=text_form)
    wire = (json.loads(json.dumps(snap)) if text_form
            else msgpack.unpackb(msgpack.packb(snap), raw=False))
    resumed = Conversation.from_snapshot(wire)
    for r in records[cut:]:
        resumed.apply(*r)
    full = fold(records, json_session)
    assert resumed.view() == full.view()
    assert resumed.to_snapshot() == full.to_snapshot()


# ---------------------------------------------------------------- arbitrary records

KEYS = st.sampled_from(["id", "role", "outcome", "error", "name", "approval", "message",
                        "state", "ref", "signal", "approved", "reply_to"])
WORDS = st.sampled_from(["m0", "m1", "c0", "s0", "complete", "cancelled", "cancel",
                         "approve", "reject", "input", "user", ""])
VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2, 2), WORDS, st.text(max_size=3),
              st.binary(max_size=3), st.floats(allow_nan=True)),
    lambda inner: st.one_of(st.lists(inner, max_size=2),
                            st.dictionaries(st.one_of(KEYS, st.integers(0, 2)), inner,
                                            max_size=2)),
    max_leaves=4)
META = st.one_of(VALUES, st.dictionaries(KEYS, st.one_of(WORDS, VALUES), max_size=5))
PAYLOAD = st.one_of(st.binary(max_size=6),
                    st.sampled_from([b'"x"', b'""', b'"\\ud800"', b"null", b"[1]", b'"']))
RECORDS = st.lists(st.tuples(st.one_of(st.integers(1, 8), st.integers(0, 63)),
                             st.sampled_from(PUBS), META, PAYLOAD), max_size=40)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(RECORDS, st.booleans(), st.integers(0, 100))
def test_arbitrary_records_never_break_the_fold(raw: list[tuple[int, str | None, Any, bytes]],
                                                json_session: bool, cut: int) -> None:
    records: list[Rec] = [(o, k, p, m, d) for o, (k, p, m, d) in enumerate(raw)]
    full = fold(records, json_session)
    assert sum(n for _, n in full.view().anomalies) <= len(records)
    cut = cut % (len(records) + 1)
    for text_form in (False, True):
        snap = fold(records[:cut], json_session).to_snapshot(text=text_form)
        wire = (json.loads(json.dumps(snap)) if text_form
                else msgpack.unpackb(msgpack.packb(snap), raw=False))
        resumed = Conversation.from_snapshot(wire)
        for r in records[cut:]:
            resumed.apply(*r)
        assert resumed.view() == full.view()


# ---------------------------------------------------------------- batching

DELTAS = st.lists(st.tuples(st.integers(0, 40_000),
                            st.one_of(st.text(max_size=4), st.binary(max_size=4))),
                  max_size=60)


def timed(gaps: Sequence[tuple[int, T]]) -> list[tuple[int, T]]:
    """Gaps between deltas (microseconds) to times since the first."""
    t, out = 0, []
    for gap, delta in gaps:
        t += gap
        out.append((t, delta))
    return out


@SETTINGS
@given(DELTAS, st.integers(0, 60_000), st.integers(1, 40))
def test_batching_keeps_every_delta_in_order_within_the_window(
        gaps: list[tuple[int, str | bytes]], window: int, max_bytes: int) -> None:
    deltas = timed(gaps)
    data = [d.encode() if isinstance(d, str) else d for _, d in deltas]
    batches = coalesce(deltas, window=window, max_bytes=max_bytes)
    assert b"".join(b.data for b in batches) == b"".join(data)
    assert frames_saved(batches) == len(deltas) - len(batches)
    i = 0
    for b in batches:
        run = deltas[i:i + b.count]
        # A batch is the next run of deltas, joined, and none waited past the window.
        assert b.count >= 1 and b.data == b"".join(data[i:i + b.count])
        assert b.first == run[0][0] and all(t <= b.sent <= t + window for t, _ in run)
        i += b.count
    assert i == len(deltas)
    assert [b.sent for b in batches] == sorted(b.sent for b in batches)
    if window == 0:
        assert all(b.count == 1 for b in batches)


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 40_000), st.text(max_size=4)), max_size=40),
       st.integers(0, 60_000), st.booleans())
def test_a_batched_log_folds_to_the_same_message(gaps: list[tuple[int, str]], window: int,
                                                 json_session: bool) -> None:
    deltas = timed(gaps)
    enc = Encoder(json=json_session)

    def log(parts: list[str | bytes]) -> list[Rec]:
        drafts = [enc.start("m1", "assistant"), *(enc.delta("m1", p) for p in parts),
                  enc.end("m1")]
        return [(o, d.kind, "agent", d.meta, d.payload) for o, d in enumerate(drafts)]

    one_by_one = fold(log([d for _, d in deltas]), json_session).view().messages[0]
    batched = fold(log([b.data for b in coalesce(deltas, window=window)]),
                   json_session).view().messages[0]
    assert batched.data == one_by_one.data == "".join(d for _, d in deltas).encode()
    assert batched.outcome == one_by_one.outcome == COMPLETE

"""AI conversations as records: the message model's fold, snapshot and encoders.

Theory of operation
-------------------
An AI conversation lives in a session log as ordinary records (docs/ai.md
has the model).  The record's kind says what it is (2 ``start``, 3
``delta``, 4 ``end``, 5 ``tool_call``, 6 ``tool_result``, 7 ``state``, and
the existing 1 ``signal``), its meta which item it belongs to (``id``) or
answers (``ref``), and its payload the content.  Nothing here does I/O: the
caller feeds records and reads views, as h11's Connection is fed bytes.

The fold.  ``Conversation.apply`` takes one record at a time, in offset
order, and updates a small state: the items (messages and tool calls, in
the order they were opened, keyed by their shared id namespace), the
signals with the target each was linked to when it arrived, the latest
state of each publisher, and counts of skipped records.  Every record is
folded from its own header and payload, once, so the state after offset N
depends only on the records below N: a view taken at N and then fed the
records after N ends where a fold from scratch ends.  That is the whole
correctness argument, and the property tests check it over random
conversations.

Untrusted input.  Any client with ``append`` writes this log, so a record
that does not fit (wrong meta types, unknown ids, deltas after the end, a
delta from someone other than the message's author) is skipped and counted
under a stable code.  Skipping is decided before anything changes, so a bad
record has no effect but its count.  A caller's mistakes (offsets going
backwards, a kind outside 0..63, a publisher that is not a string) raise
ValueError or TypeError instead: those are bugs in the process feeding the
fold, not in the log.

Snapshots.  ``to_snapshot`` writes the fold's whole state as plain msgpack-
able values (versioned; text as one ``bin`` per message, however many deltas
made it), and ``from_snapshot`` reads it back, validating every field, so a
server can persist it, restore it and keep folding, and a late joiner can
receive it as the view.  The text form replaces bytes with strings (or
base64 for bytes that are not UTF-8) for JSON transports.

Batching.  ``Coalescer`` gathers one message's deltas for a window from the
first of a batch, then sends them as one record; ``coalesce`` replays it over
a timed list.  It only ever joins neighbours, so the text and its order are
the same, and no delta waits longer than the window.

Encoders.  ``Encoder`` builds the (kind, meta, payload) of each event for a
JSON or a binary session, checking its arguments against the same rules the
fold applies, so what it builds is never skipped as malformed.
"""

from __future__ import annotations

import base64
import json as _json
import math
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal, Protocol

__all__ = [
    "ANOMALIES", "CANCELLED", "COMPLETE", "ERROR", "MAX_ID", "OUTCOMES", "SNAPSHOT_VERSION",
    "AgentState", "Batch", "Coalescer", "Conversation", "Draft", "Encoder", "Kind", "Message",
    "RecordLike", "Signal", "ToolCall", "View", "coalesce", "frames_saved", "new_id",
]


class Kind(IntEnum):
    """Record kinds of the model (docs/ai.md, "Kinds"); 0 is left to applications."""

    SIGNAL = 1
    START = 2
    DELTA = 3
    END = 4
    TOOL_CALL = 5
    TOOL_RESULT = 6
    STATE = 7


_MAX_KIND = 63              # the record header's kind field

COMPLETE = "complete"
CANCELLED = "cancelled"
ERROR = "error"
OUTCOMES = frozenset({COMPLETE, CANCELLED, ERROR})

MAX_ID = 256                # characters of an id, ref, role, tool name, state or signal type

# Why a record was skipped (``unknown_ref`` alone counts a record that is kept).
ANOMALIES = ("bad_meta", "bad_payload", "duplicate_id", "unknown_id", "wrong_publisher",
             "after_end", "duplicate_signal", "unknown_ref", "reserved_kind")

SNAPSHOT_VERSION = 1

Target = Literal["message", "tool_call", "run"]


# ------------------------------------------------------------------ the view

@dataclass(frozen=True, slots=True)
class Message:
    """A message as far as the log has it."""

    id: str
    role: str
    publisher: str | None
    offset: int                 # of its start record
    data: bytes                 # its text so far: the concatenated payloads, UTF-8
    outcome: str | None = None  # None while open
    error: str | None = None
    end: int | None = None      # offset of the record that ended it
    reply_to: str | None = None
    cancel: int | None = None   # offset of the first cancel that reached it while open

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    @property
    def open(self) -> bool:
        return self.outcome is None


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call, with its decision and result once they arrive."""

    id: str
    name: str
    publisher: str | None
    offset: int                      # of its tool_call record
    args: bytes                      # JSON text, as published (never parsed here)
    message: str | None = None       # the message it was made in, as the caller said
    approval: bool = False           # it waits for approve/reject
    approved: bool | None = None     # the decision, once made
    decided: int | None = None       # offset of the deciding signal
    outcome: str | None = None       # None until its result arrives
    result: bytes | None = None      # JSON text, as published
    error: str | None = None
    end: int | None = None           # offset of its result
    result_publisher: str | None = None
    cancel: int | None = None        # offset of the first cancel that reached it while open

    @property
    def open(self) -> bool:
        return self.outcome is None

    @property
    def pending_approval(self) -> bool:
        return self.approval and self.approved is None and self.outcome is None


@dataclass(frozen=True, slots=True)
class Signal:
    """A signal kept in the view, linked to what it answers."""

    offset: int
    publisher: str | None
    type: str
    id: str | None
    ref: str | None
    target: Target | None           # what ``ref`` named when it arrived; "run": a cancel of all
    approved: bool | None
    data: bytes                     # its text, UTF-8

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class AgentState:
    """The latest ``state`` record of one publisher."""

    offset: int
    publisher: str | None
    state: str
    ref: str | None
    detail: bytes                   # text, UTF-8


@dataclass(frozen=True, slots=True)
class View:
    """The conversation as of ``next``: what a late joiner renders.  It folds
    the records from ``start`` (0 unless retention deleted the log's start
    before the server folded it) up to ``next``."""

    next: int
    items: tuple[Message | ToolCall, ...]
    signals: tuple[Signal, ...]
    states: tuple[AgentState, ...]                 # oldest first
    anomalies: tuple[tuple[str, int], ...]         # (code, count), sorted by code
    start: int = 0

    @property
    def messages(self) -> tuple[Message, ...]:
        return tuple(i for i in self.items if isinstance(i, Message))

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return tuple(i for i in self.items if isinstance(i, ToolCall))

    @property
    def open_tool_calls(self) -> tuple[ToolCall, ...]:
        return tuple(c for c in self.tool_calls if c.open)

    @property
    def pending_approvals(self) -> tuple[ToolCall, ...]:
        return tuple(c for c in self.tool_calls if c.pending_approval)

    @property
    def state(self) -> AgentState | None:
        return self.states[-1] if self.states else None

    def item(self, id: str) -> Message | ToolCall | None:
        return next((i for i in self.items if i.id == id), None)


# ------------------------------------------------------------------ the fold

@dataclass(slots=True)
class _Msg:
    # Field order is the snapshot's ("m" entries), and Message's.
    id: str
    role: str
    publisher: str | None
    offset: int
    data: bytearray
    outcome: str | None = None
    error: str | None = None
    end: int | None = None
    reply_to: str | None = None
    cancel: int | None = None


@dataclass(slots=True)
class _Call:
    # Field order is the snapshot's ("t" entries), and ToolCall's.
    id: str
    name: str
    publisher: str | None
    offset: int
    args: bytes
    message: str | None = None
    approval: bool = False
    approved: bool | None = None
    decided: int | None = None
    outcome: str | None = None
    result: bytes | None = None
    error: str | None = None
    end: int | None = None
    result_publisher: str | None = None
    cancel: int | None = None


class _Skip(Exception):
    """A record that does not fit the model; ``args[0]`` is its code."""


class RecordLike(Protocol):
    """What ``apply_record`` reads: a client ``Record`` or ``_frames.Record``."""

    @property
    def offset(self) -> int: ...
    @property
    def kind(self) -> int: ...
    @property
    def publisher(self) -> str | None: ...
    @property
    def meta(self) -> Any: ...
    @property
    def payload(self) -> bytes: ...


class Conversation:
    """The fold of a session's AI records: apply records, read the view."""

    def __init__(self, *, json: bool = False, start: int = 0) -> None:
        if start < 0:
            raise ValueError(f"start must be an offset, not {start}")
        self.json = json            # a JSON session: text payloads are JSON strings
        self.start = start          # the fold began here: records below it are not in it
        self.next = start           # every record from start below this offset is folded
        self._items: dict[str, _Msg | _Call] = {}   # insertion order is opening order
        self._open: dict[str, None] = {}            # ids of open items, for a run's cancel
        self._signals: list[Signal] = []
        self._signal_ids: set[str] = set()
        self._states: dict[str | None, AgentState] = {}
        self._anomalies: dict[str, int] = {}

    def __repr__(self) -> str:
        return (f"<Conversation next={self.next} items={len(self._items)} "
                f"signals={len(self._signals)}>")

    # ---------------------------------------------------------- applying

    def apply(self, offset: int, kind: int, publisher: str | None, meta: Any,
              payload: bytes) -> str | None:
        """Fold one record.  Returns None, or the code it was counted under
        (docs/ai.md, "The fold"): every code but ``unknown_ref`` means the
        record was skipped.  Records must come in offset order; gaps are
        fine (records of other kinds left out by a filter)."""
        if offset < self.next:
            raise ValueError(f"record {offset} is below {self.next}: already folded")
        if not 0 <= kind <= _MAX_KIND:
            raise ValueError(f"record kind must be 0..{_MAX_KIND}, not {kind}")
        if publisher is not None and not isinstance(publisher, str):
            raise TypeError(f"publisher must be a str or None, not {type(publisher).__name__}")
        self.next = offset + 1
        if kind == 0:
            return None
        try:
            if kind > Kind.STATE:
                raise _Skip("reserved_kind")
            if not isinstance(meta, dict):
                raise _Skip("bad_meta")
            code = _APPLY[kind](self, offset, publisher, meta, bytes(payload))
        except _Skip as skip:
            code = skip.args[0]
        if code is not None:
            self._anomalies[code] = self._anomalies.get(code, 0) + 1
        return code

    def apply_record(self, record: RecordLike) -> str | None:
        """``apply`` for a record read from the WebSocket (client or frames)."""
        return self.apply(record.offset, record.kind, record.publisher, record.meta,
                          record.payload)

    def apply_view_record(self, record: Mapping[str, Any]) -> str | None:
        """``apply`` for one object of an HTTP ``view=records`` answer: ``d``
        is the JSON value in a JSON session, the text in a ``text/*`` one,
        and base64 (with ``b64``) in any other."""
        d = record.get("d")
        if self.json:
            payload = _json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode()
        elif record.get("b64"):
            payload = base64.b64decode(d if isinstance(d, str) else "")
        else:
            payload = d.encode("utf-8", "surrogatepass") if isinstance(d, str) else b""
        publisher = record.get("p")
        return self.apply(int(record["o"]), int(record["k"]),
                          publisher if isinstance(publisher, str) else None,
                          record.get("m"), payload)

    def advance(self, next: int) -> None:
        """Say that no AI record lies below ``next`` beyond those applied (an
        ``up_to_date`` past records a kinds filter left out)."""
        if next < self.next:
            raise ValueError(f"cannot advance back from {self.next} to {next}")
        self.next = next

    # Each returns None, or "unknown_ref" for a signal kept without a target;
    # it raises _Skip before changing anything.

    def _start(self, offset: int, publisher: str | None, meta: dict[Any, Any],
               payload: bytes) -> str | None:
        mid = _id(meta, "id")
        role = _label(meta, "role")
        reply_to = _opt_id(meta, "reply_to")
        outcome = _opt_outcome(meta)
        error = _opt_str(meta, "error")
        text = self._text(payload)
        if mid in self._items:
            raise _Skip("duplicate_id")
        msg = _Msg(mid, role, publisher, offset, bytearray(text), reply_to=reply_to)
        self._items[mid] = msg
        if outcome is None:
            self._open[mid] = None
        else:
            msg.outcome, msg.error, msg.end = outcome, error, offset
        return None

    def _delta(self, offset: int, publisher: str | None, meta: dict[Any, Any],
               payload: bytes) -> str | None:
        mid = _id(meta, "id")
        text = self._text(payload)
        self._continued(publisher, mid).data += text
        return None

    def _end(self, offset: int, publisher: str | None, meta: dict[Any, Any],
             payload: bytes) -> str | None:
        mid = _id(meta, "id")
        outcome = _opt_outcome(meta) or COMPLETE
        error = _opt_str(meta, "error")
        text = self._text(payload)
        msg = self._continued(publisher, mid)
        msg.data += text
        msg.outcome, msg.error, msg.end = outcome, error, offset
        del self._open[mid]
        return None

    def _continued(self, publisher: str | None, mid: str) -> _Msg:
        msg = self._items.get(mid)
        if not isinstance(msg, _Msg):
            raise _Skip("unknown_id")
        if publisher != msg.publisher:
            raise _Skip("wrong_publisher")
        if msg.outcome is not None:
            raise _Skip("after_end")
        return msg

    def _tool_call(self, offset: int, publisher: str | None, meta: dict[Any, Any],
                   payload: bytes) -> str | None:
        cid = _id(meta, "id")
        name = _label(meta, "name")
        approval = _opt_bool(meta, "approval") or False
        message = _opt_id(meta, "message")
        if cid in self._items:
            raise _Skip("duplicate_id")
        self._items[cid] = _Call(cid, name, publisher, offset, payload, message, approval)
        self._open[cid] = None
        return None

    def _tool_result(self, offset: int, publisher: str | None, meta: dict[Any, Any],
                     payload: bytes) -> str | None:
        cid = _id(meta, "id")
        outcome = _opt_outcome(meta) or COMPLETE
        error = _opt_str(meta, "error")
        call = self._items.get(cid)
        if not isinstance(call, _Call):
            raise _Skip("unknown_id")
        if call.outcome is not None:
            raise _Skip("after_end")
        call.outcome, call.result, call.error = outcome, payload, error
        call.end, call.result_publisher = offset, publisher
        del self._open[cid]
        return None

    def _state(self, offset: int, publisher: str | None, meta: dict[Any, Any],
               payload: bytes) -> str | None:
        state = _label(meta, "state")
        ref = _opt_id(meta, "ref")
        self._states[publisher] = AgentState(offset, publisher, state, ref, self._text(payload))
        return None

    def _signal(self, offset: int, publisher: str | None, meta: dict[Any, Any],
                payload: bytes) -> str | None:
        kind = _label(meta, "signal")
        sid = _opt_id(meta, "id")
        ref = _opt_id(meta, "ref")
        approved = _opt_bool(meta, "approved")
        if kind in ("approve", "reject") and ref is None:
            raise _Skip("bad_meta")
        if kind == "approve" and approved is None:
            raise _Skip("bad_meta")
        if kind == "reject":
            approved = False
        text = self._text(payload)
        if sid is not None and sid in self._signal_ids:
            raise _Skip("duplicate_signal")

        item = None if ref is None else self._items.get(ref)
        target: Target | None
        if ref is None:
            target = "run" if kind == "cancel" else None
        elif item is None:
            target = None
        else:
            target = "message" if isinstance(item, _Msg) else "tool_call"
        if kind == "cancel":
            # A run's cancel reaches what is open now, not what opens later.
            victims = list(self._open) if ref is None else [ref] if ref in self._open else []
            for victim in victims:
                open_item = self._items[victim]
                if open_item.cancel is None:
                    open_item.cancel = offset
        elif kind in ("approve", "reject") and isinstance(item, _Call) \
                and item.approved is None and item.outcome is None:
            item.approved, item.decided = approved, offset
        if sid is not None:
            self._signal_ids.add(sid)
        self._signals.append(Signal(offset, publisher, kind, sid, ref, target, approved, text))
        return "unknown_ref" if ref is not None and item is None else None

    def _text(self, payload: bytes) -> bytes:
        """A text payload's UTF-8 bytes, by the session's payload rule."""
        if not self.json:
            return payload
        # Anything but a JSON string is refused before parsing: an object or
        # array could be large or deep, and is wrong whatever it holds.
        if payload.lstrip(b" \t\r\n")[:1] != b'"':
            raise _Skip("bad_payload")
        try:
            value = _json.loads(payload)
        except ValueError:
            raise _Skip("bad_payload") from None
        if not isinstance(value, str):
            raise _Skip("bad_payload")
        # A JSON session refuses lone surrogates; keep them if one got in anyway.
        return value.encode("utf-8", "surrogatepass")

    # ---------------------------------------------------------- reading

    @property
    def anomalies(self) -> dict[str, int]:
        return dict(self._anomalies)

    def view(self) -> View:
        """The conversation as of ``next``, as immutable values."""
        items: list[Message | ToolCall] = []
        for item in self._items.values():
            if isinstance(item, _Msg):
                items.append(Message(item.id, item.role, item.publisher, item.offset,
                                     bytes(item.data), item.outcome, item.error, item.end,
                                     item.reply_to, item.cancel))
            else:
                items.append(ToolCall(item.id, item.name, item.publisher, item.offset,
                                      item.args, item.message, item.approval, item.approved,
                                      item.decided, item.outcome, item.result, item.error,
                                      item.end, item.result_publisher, item.cancel))
        return View(self.next, tuple(items), tuple(self._signals), self._ordered_states(),
                    tuple(sorted(self._anomalies.items())), self.start)

    def _ordered_states(self) -> tuple[AgentState, ...]:
        return tuple(sorted(self._states.values(), key=lambda s: s.offset))

    # ---------------------------------------------------------- snapshots

    def to_snapshot(self, *, text: bool = False) -> dict[str, Any]:
        """The fold's whole state as msgpack-able values (docs/ai.md,
        "Snapshot").  ``text=True``: JSON-safe, byte fields as strings (or a
        one-item list of base64 where the bytes are not UTF-8)."""
        b = _text_field if text else bytes
        items: list[list[Any]] = []
        for item in self._items.values():
            if isinstance(item, _Msg):
                items.append(["m", item.id, item.role, item.publisher, item.offset,
                              b(item.data), item.outcome, item.error, item.end,
                              item.reply_to, item.cancel])
            else:
                items.append(["t", item.id, item.name, item.publisher, item.offset,
                              b(item.args), item.message, item.approval, item.approved,
                              item.decided, item.outcome,
                              None if item.result is None else b(item.result),
                              item.error, item.end, item.result_publisher, item.cancel])
        snap: dict[str, Any] = {
            "v": SNAPSHOT_VERSION, "json": self.json, "next": self.next, "items": items,
            "signals": [[s.offset, s.publisher, s.type, s.id, s.ref, s.target, s.approved,
                         b(s.data)] for s in self._signals],
            "states": [[s.offset, s.publisher, s.state, s.ref, b(s.detail)]
                       for s in self._ordered_states()],
            "anomalies": [[k, n] for k, n in sorted(self._anomalies.items())],
        }
        if self.start:
            snap["start"] = self.start
        if text:
            snap["text"] = True
        return snap

    @classmethod
    def from_snapshot(cls, snap: Any) -> Conversation:
        """A fold restored from ``to_snapshot`` (either form).  Raises
        ValueError for anything else, including another version: fold the
        log again then."""
        try:
            return cls._restore(snap)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"not a conversation snapshot: {exc}") from None

    @classmethod
    def _restore(cls, snap: Any) -> Conversation:
        if not isinstance(snap, dict) or snap.get("v") != SNAPSHOT_VERSION:
            raise ValueError(f"version {snap.get('v') if isinstance(snap, dict) else None!r}, "
                             f"not {SNAPSHOT_VERSION}")
        r = _Reader(text=snap.get("text") is True)
        conv = cls(json=r.flag(snap["json"]), start=r.offset(snap.get("start", 0)))
        conv.next = r.offset(snap["next"])
        if conv.next < conv.start:
            raise ValueError(f"next {conv.next} is below start {conv.start}")
        for entry in r.items(snap["items"]):
            entry = r.items(entry)
            if entry[:1] == ["m"] and len(entry) == 11:
                item: _Msg | _Call = _Msg(
                    r.string(entry[1]), r.string(entry[2]), r.opt(r.string, entry[3]),
                    r.offset(entry[4]), bytearray(r.blob(entry[5])),
                    r.opt(r.outcome, entry[6]), r.opt(r.string, entry[7]),
                    r.opt(r.offset, entry[8]), r.opt(r.string, entry[9]),
                    r.opt(r.offset, entry[10]))
            elif entry[:1] == ["t"] and len(entry) == 16:
                item = _Call(
                    r.string(entry[1]), r.string(entry[2]), r.opt(r.string, entry[3]),
                    r.offset(entry[4]), r.blob(entry[5]), r.opt(r.string, entry[6]),
                    r.flag(entry[7]), r.opt(r.flag, entry[8]), r.opt(r.offset, entry[9]),
                    r.opt(r.outcome, entry[10]), r.opt(r.blob, entry[11]),
                    r.opt(r.string, entry[12]), r.opt(r.offset, entry[13]),
                    r.opt(r.string, entry[14]), r.opt(r.offset, entry[15]))
            else:
                raise ValueError("an item is neither a message nor a tool call")
            if item.id in conv._items:
                raise ValueError(f"item {item.id!r} twice")
            conv._items[item.id] = item
            if item.outcome is None:
                conv._open[item.id] = None
        for entry in r.items(snap["signals"]):
            offset, publisher, kind, sid, ref, target, approved, data = r.items(entry)
            if target not in (None, "message", "tool_call", "run"):
                raise ValueError(f"signal target {target!r}")
            signal = Signal(r.offset(offset), r.opt(r.string, publisher), r.string(kind),
                            r.opt(r.string, sid), r.opt(r.string, ref), target,
                            r.opt(r.flag, approved), r.blob(data))
            conv._signals.append(signal)
            if signal.id is not None:
                conv._signal_ids.add(signal.id)
        for entry in r.items(snap["states"]):
            offset, publisher, state, ref, detail = r.items(entry)
            st = AgentState(r.offset(offset), r.opt(r.string, publisher), r.string(state),
                            r.opt(r.string, ref), r.blob(detail))
            conv._states[st.publisher] = st
        for entry in r.items(snap["anomalies"]):
            code, count = r.items(entry)
            conv._anomalies[r.string(code)] = r.offset(count)
        return conv


_Apply = Callable[[Conversation, int, str | None, dict[Any, Any], bytes], str | None]

_APPLY: dict[int, _Apply] = {
    Kind.SIGNAL: Conversation._signal,
    Kind.START: Conversation._start,
    Kind.DELTA: Conversation._delta,
    Kind.END: Conversation._end,
    Kind.TOOL_CALL: Conversation._tool_call,
    Kind.TOOL_RESULT: Conversation._tool_result,
    Kind.STATE: Conversation._state,
}


# ------------------------------------------------------------------ meta fields

def _id(meta: dict[Any, Any], key: str) -> str:
    value = meta.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID:
        raise _Skip("bad_meta")
    return value


_label = _id        # roles, names, states and signal types follow the id rule


def _opt_id(meta: dict[Any, Any], key: str) -> str | None:
    return None if meta.get(key) is None else _id(meta, key)


def _opt_str(meta: dict[Any, Any], key: str) -> str | None:
    value = meta.get(key)
    if value is not None and not isinstance(value, str):
        raise _Skip("bad_meta")
    return value


def _opt_bool(meta: dict[Any, Any], key: str) -> bool | None:
    value = meta.get(key)
    if value is not None and not isinstance(value, bool):   # 0 and 1 are not booleans
        raise _Skip("bad_meta")
    return value


def _opt_outcome(meta: dict[Any, Any]) -> str | None:
    value = meta.get("outcome")
    if value is not None and not (isinstance(value, str) and value in OUTCOMES):
        raise _Skip("bad_meta")
    return value


# ------------------------------------------------------------------ snapshot fields

def _text_field(data: bytes | bytearray) -> str | list[str]:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return [base64.b64encode(data).decode("ascii")]


class _Reader:
    """Type-checked reads of snapshot fields; anything off raises ValueError."""

    def __init__(self, *, text: bool) -> None:
        self.text = text

    def string(self, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, not {type(value).__name__}")
        return value

    def flag(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected a boolean, not {type(value).__name__}")
        return value

    def offset(self, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"expected an offset, not {value!r}")
        return value

    def outcome(self, value: Any) -> str:
        if not isinstance(value, str) or value not in OUTCOMES:
            raise ValueError(f"unknown outcome {value!r}")
        return self.string(value)

    def items(self, value: Any) -> list[Any]:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, not {type(value).__name__}")
        return list(value)

    def blob(self, value: Any) -> bytes:
        if self.text:
            if isinstance(value, str):
                return value.encode("utf-8")
            if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
                return base64.b64decode(value[0], validate=True)
        elif isinstance(value, bytes):
            return value
        raise ValueError(f"expected bytes, not {type(value).__name__}")

    def opt(self, read: Any, value: Any) -> Any:
        return None if value is None else read(value)


# ------------------------------------------------------------------ encoders

@dataclass(frozen=True, slots=True)
class Draft:
    """A record to publish: ``kind``, ``meta`` (a map) and ``payload``."""

    kind: int
    meta: dict[str, Any]
    payload: bytes


def new_id(prefix: str = "m") -> str:
    """A fresh item or signal id, ``<prefix>_<16 hex>``."""
    return f"{prefix}_{secrets.token_hex(8)}"


class Encoder:
    """Builds the records of the model for a JSON (``json=True``) or a binary
    session.  Arguments are checked against the fold's rules, and a bad one
    raises ValueError: what it builds is never skipped as malformed (though
    a delta to an ended message is still skipped: order is the caller's)."""

    def __init__(self, *, json: bool = False) -> None:
        self.json = json

    def start(self, id: str, role: str = "assistant", text: str | bytes = "", *,
              reply_to: str | None = None, outcome: str | None = None,
              error: str | None = None) -> Draft:
        """A message's start; with ``outcome``, the whole message."""
        meta = {"id": _arg_id(id), "role": _arg_id(role, "role")}
        if reply_to is not None:
            meta["reply_to"] = _arg_id(reply_to, "reply_to")
        if outcome is not None:
            meta["outcome"] = _arg_outcome(outcome)
        if error is not None:
            meta["error"] = _arg_str(error, "error")
        return Draft(Kind.START.value, meta, self.text(text))

    def message(self, id: str, role: str, text: str | bytes, *,
                reply_to: str | None = None) -> Draft:
        """A whole message in one record (a user's, typically)."""
        return self.start(id, role, text, reply_to=reply_to, outcome=COMPLETE)

    def delta(self, id: str, text: str | bytes) -> Draft:
        return Draft(Kind.DELTA.value, {"id": _arg_id(id)}, self.text(text))

    def end(self, id: str, text: str | bytes = "", *, outcome: str = COMPLETE,
            error: str | None = None) -> Draft:
        meta = {"id": _arg_id(id), "outcome": _arg_outcome(outcome)}
        if error is not None:
            meta["error"] = _arg_str(error, "error")
        return Draft(Kind.END.value, meta, self.text(text))

    def tool_call(self, id: str, name: str, args: Any = None, *, approval: bool = False,
                  message: str | None = None) -> Draft:
        """``args`` is any JSON value, or bytes already holding JSON text."""
        meta: dict[str, Any] = {"id": _arg_id(id), "name": _arg_id(name, "name")}
        if approval:
            meta["approval"] = True
        if message is not None:
            meta["message"] = _arg_id(message, "message")
        return Draft(Kind.TOOL_CALL.value, meta, _json_payload(args))

    def tool_result(self, id: str, result: Any = None, *, outcome: str = COMPLETE,
                    error: str | None = None) -> Draft:
        meta = {"id": _arg_id(id), "outcome": _arg_outcome(outcome)}
        if error is not None:
            meta["error"] = _arg_str(error, "error")
        return Draft(Kind.TOOL_RESULT.value, meta, _json_payload(result))

    def state(self, state: str, detail: str | bytes = "", *, ref: str | None = None) -> Draft:
        meta = {"state": _arg_id(state, "state")}
        if ref is not None:
            meta["ref"] = _arg_id(ref, "ref")
        return Draft(Kind.STATE.value, meta, self.text(detail))

    def signal(self, type: str, text: str | bytes = "", *, ref: str | None = None,
               approved: bool | None = None, id: str | None = None) -> Draft:
        """Any signal: meta ``signal``, ``id`` (new unless given), ``ref``, ``approved``."""
        meta: dict[str, Any] = {"signal": _arg_id(type, "signal"),
                                "id": _arg_id(new_id("s") if id is None else id)}
        if ref is not None:
            meta["ref"] = _arg_id(ref, "ref")
        if approved is not None:
            meta["approved"] = bool(approved)
        if type in ("approve", "reject") and ref is None:
            raise ValueError(f"{type} needs the ref of a tool call")
        if type == "approve" and approved is None:
            raise ValueError("approve needs approved=True or False")
        return Draft(Kind.SIGNAL.value, meta, self.text(text))

    def cancel(self, ref: str | None = None, reason: str | bytes = "", *,
               id: str | None = None) -> Draft:
        """Cancel one item, or (``ref`` None) the whole run."""
        return self.signal("cancel", reason, ref=ref, id=id)

    def approve(self, ref: str, approved: bool = True, note: str | bytes = "", *,
                id: str | None = None) -> Draft:
        return self.signal("approve", note, ref=ref, approved=approved, id=id)

    def input(self, text: str | bytes, *, ref: str | None = None,
              id: str | None = None) -> Draft:
        return self.signal("input", text, ref=ref, id=id)

    def text(self, text: str | bytes) -> bytes:
        """A text payload by the session's rule: a JSON string, or UTF-8."""
        if self.json:
            value = text if isinstance(text, str) else bytes(text).decode("utf-8")
            return _json.dumps(value, ensure_ascii=False).encode("utf-8")
        return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def _arg_id(value: Any, what: str = "id") -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID:
        raise ValueError(f"{what} must be a string of 1..{MAX_ID} characters, not {value!r}")
    return value


def _arg_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {value!r}")
    return value


def _arg_outcome(value: Any) -> str:
    if not isinstance(value, str) or value not in OUTCOMES:
        raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, not {value!r}")
    return str(value)


def _json_payload(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    try:
        return _json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=False).encode("utf-8")
    except TypeError as exc:            # not a JSON value: the caller's mistake, as NaN is
        raise ValueError(str(exc)) from None


# ------------------------------------------------------------------ batching

@dataclass(frozen=True, slots=True)
class Batch:
    """Deltas sent as one record."""

    first: float        # time of its first delta
    sent: float         # when it went out: its window's end, the time it filled, or a flush
    data: bytes         # the deltas, concatenated in order
    count: int          # how many deltas


class Coalescer:
    """Batches one message's deltas, sans-IO.  A batch opens with a delta
    and goes out ``window`` later (the caller's timer calls ``poll`` at
    ``deadline()``), or as soon as it holds ``max_bytes``, or on ``flush``
    (the message ends: put the batch in the ``end`` record).  A window of 0
    sends every delta alone.  Times are the caller's clock, in any unit the
    window uses, and must not go backwards."""

    def __init__(self, window: float = 0.030, max_bytes: int = 16 << 10) -> None:
        if not window >= 0 or math.isinf(window):
            raise ValueError(f"window must be a finite number >= 0, not {window!r}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        self.window = window
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._count = 0
        self._first = 0.0
        self._now = -math.inf       # the latest time seen

    def deadline(self) -> float | None:
        """When the open batch is due, or None if there is none."""
        return self._first + self.window if self._count else None

    def push(self, t: float, delta: str | bytes) -> list[Batch]:
        """Add a delta at time ``t``; returns what goes out at or before
        ``t``: a batch that fell due before it arrived, then its own batch
        if it filled one."""
        self._tick(t)
        out = [] if (due := self.poll(t)) is None else [due]
        if not self._count:
            self._first = t
        self._buf += delta.encode("utf-8") if isinstance(delta, str) else delta
        self._count += 1
        if len(self._buf) >= self.max_bytes or self.window == 0:
            out.append(self._take(t))
        return out

    def poll(self, now: float) -> Batch | None:
        """The open batch if its window has passed by ``now``; it counts as
        sent at its deadline, the time a punctual timer would send it."""
        self._tick(now)
        deadline = self.deadline()
        return None if deadline is None or now < deadline else self._take(deadline)

    def flush(self, now: float) -> Batch | None:
        """The open batch, sent now whatever its window says (or None)."""
        self._tick(now)
        due = self.poll(now)
        return due if due is not None or not self._count else self._take(now)

    def _tick(self, t: float) -> None:
        if t < self._now:
            raise ValueError(f"time went backwards: {t} after {self._now}")
        self._now = t

    def _take(self, sent: float) -> Batch:
        batch = Batch(self._first, sent, bytes(self._buf), self._count)
        self._buf = bytearray()
        self._count = 0
        return batch


def coalesce(deltas: Iterable[tuple[float, str | bytes]], window: float = 0.030,
             max_bytes: int = 16 << 10) -> list[Batch]:
    """Batches for timed deltas ``(t, text)`` (t not decreasing), as a
    Coalescer with a punctual timer would send them; the last goes out at
    its deadline."""
    c = Coalescer(window, max_bytes)
    out: list[Batch] = []
    for t, delta in deltas:
        out += c.push(t, delta)
    deadline = c.deadline()
    if deadline is not None:
        last = c.poll(deadline)
        assert last is not None
        out.append(last)
    return out


def frames_saved(batches: Iterable[Batch]) -> int:
    """Records not sent thanks to batching: deltas minus batches."""
    deltas = frames = 0
    for batch in batches:
        deltas += batch.count
        frames += 1
    return deltas - frames

"""The frames of the WebSocket protocol (docs/protocol.md, "WebSocket protocol").

Theory of operation
-------------------
Every WebSocket message is one msgpack map, a *frame*, whose ``"t"`` names its
type.  Here each frame type is a frozen, slotted dataclass that validates
itself when built, so a ``Publish`` or an ``Ack`` that exists is well formed,
whichever side made it.  ``encode`` turns a frame into bytes and ``decode``
bytes into a frame; both are pure, and ``decode`` knows every type in both
directions, so the server, clients and tests share one codec.

One table, ``_WIRE``, maps each class to its ``"t"`` and each attribute to its
wire key where the two differ (``session`` travels as ``"s"``).  A field with a
default is optional on the wire: ``encode`` leaves it out while it holds its
default, and ``decode`` fills the default in when the key is missing or nil
(clients written in JavaScript send null for "not given").  A field without a
default is required.  A few fields do not travel as they are held, and
``_LOAD``/``_DUMP`` convert them: an attach's ``offset`` (the wire also takes
the strings ``"-1"``, ``"now"`` and HTTP offsets), a publish's ``producer`` (a
map on the wire), a data frame's records (arrays on the wire) and presence
members (maps on the wire).

A peer's bad frame raises ``FrameError`` with a stable code (``bad_frame`` or
``bad_offset``) and, when the map had them, the session and request id it
named, so the server can answer with an ``error`` frame about that request and
keep the connection.  Building a bad frame locally raises the same error: the
checks are one set of code.

Decoding a publish of a thousand small payloads must stay cheap, so the only
per-record work beyond msgpack's own (in C) is one type check over the payload
list, also in C.  A hostile message cannot make the decoder allocate much more
than it is long: no string, array or map msgpack reads may claim more
elements than the message has bytes, so a five-byte header cannot reserve a
gigabyte, and what gets built is at most one object per byte of a message
the transport has already capped at ``max_message``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any, Final

import msgpack

from ._errors import BrokerError
from ._offsets import parse_offset_text
from ._session import MAX_KIND, NOW, START

U64_MAX: Final = (1 << 64) - 1
MAX_CLIENT_ID: Final = 256         # characters; a token's sub (256 bytes at most) must fit
EVENTS: Final = frozenset({"closed", "deleted", "epoch_changed"})
# Presence (docs/protocol.md, "Presence"): how a member is attached, and the
# bounds of the info map a client shows with it.
TRANSPORTS: Final = frozenset({"ws", "sse", "longpoll"})
MAX_INFO_ENTRIES: Final = 16
MAX_INFO_KEY: Final = 64           # characters
MAX_INFO_TEXT: Final = 256         # characters of a string value
MAX_INFO_INT: Final = (1 << 53) - 1  # JavaScript's exact integers, so JSON readers agree

# An HTTP offset, "<reserved>_<record>".  [0-9], not \d: \d also matches other
# scripts' digits, which int() would happily read.


class FrameError(BrokerError, ValueError):
    """A frame that is not one: bad msgpack, unknown ``t``, a field of the
    wrong type or range (``bad_frame``), or a malformed offset (``bad_offset``).

    ``session`` and ``request_id`` are what the offending map named under
    ``"s"`` and ``"id"``, when it named them validly, so that the answer can be
    an ``error`` frame about that session or request.
    """

    def __init__(self, code: str, message: str, session: str | None = None,
                 request_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.session = session
        self.request_id = request_id


# ---------------------------------------------------------------- checks
# Each reads one attribute of a frame under construction and raises
# FrameError naming the attribute's wire key, which is what a remote peer
# can act on.  Ints are exact ints (a bool is not a number here).

def _fail(obj: object, attr: str, want: str, code: str = "bad_frame") -> FrameError:
    cls = type(obj)
    wire = _WIRE.get(cls)
    key = wire[1].get(attr, attr) if wire else attr
    where = wire[0] if wire else cls.__name__.lower()
    value = getattr(obj, attr)
    if isinstance(value, (list, tuple, dict)):    # "not a list" would confuse more than help
        return FrameError(code, f"{where} {key!r} must be {want}")
    return FrameError(code, f"{where} {key!r} must be {want}, not {_short(value)}")


def _short(value: object) -> str:
    """A value for an error message: a hostile one may be a megabyte long."""
    if isinstance(value, (bytes, str, int, float, bool)) or value is None:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return f"a {type(value).__name__}"


def _int(obj: object, attr: str, lo: int = 0, hi: int = U64_MAX, optional: bool = False,
         code: str = "bad_frame") -> None:
    v = getattr(obj, attr)
    if v is None and optional:
        return
    if type(v) is not int or not lo <= v <= hi:
        want = f"an integer >= {lo}" if hi == U64_MAX else f"an integer in {lo}..{hi}"
        raise _fail(obj, attr, want, code)


def _str(obj: object, attr: str, min_len: int = 0, max_len: int | None = None,
         optional: bool = False) -> None:
    v = getattr(obj, attr)
    if v is None and optional:
        return
    if type(v) is not str or len(v) < min_len or (max_len is not None and len(v) > max_len):
        if max_len is not None:
            want = f"a string of {min_len}-{max_len} characters"
        else:
            want = "a non-empty string" if min_len else "a string"
        raise _fail(obj, attr, want)


def _seconds(obj: object, attr: str, optional: bool = False, zero: bool = False) -> None:
    """A finite number of seconds, positive (or, with ``zero``, not negative)."""
    v = getattr(obj, attr)
    if v is None and optional:
        return
    if type(v) not in (int, float) or not (0 <= v if zero else 0 < v) or v == float("inf"):
        raise _fail(obj, attr, "a number of seconds >= 0" if zero
                    else "a positive number of seconds")


def _bool(obj: object, attr: str) -> None:
    if type(getattr(obj, attr)) is not bool:
        raise _fail(obj, attr, "true or false")


def _tuple(obj: object, attr: str, optional: bool = False) -> tuple[Any, ...] | None:
    """The attribute as a tuple: a list is accepted and frozen in place."""
    v = getattr(obj, attr)
    if v is None and optional:
        return None
    if type(v) is list:
        v = tuple(v)
        object.__setattr__(obj, attr, v)
    elif type(v) is not tuple:
        raise _fail(obj, attr, "a list")
    return v


def _session(obj: object) -> None:
    _str(obj, "session", min_len=1)


# ---------------------------------------------------------------- parts

@dataclass(frozen=True, slots=True)
class Producer:
    """An idempotent producer's stamp, as in the HTTP Producer-* headers."""

    id: str
    epoch: int
    seq: int

    def __post_init__(self) -> None:
        _str(self, "id", min_len=1)
        _int(self, "epoch")
        _int(self, "seq")


@dataclass(frozen=True, slots=True)
class Record:
    """One record of a ``data`` frame: its header fields beside its payload.

    ``publisher``, ``meta`` and ``producer`` are None when absent (a record
    appended over HTTP has none of them).
    """

    offset: int
    ts: int                       # server time at append, microseconds since the epoch
    kind: int
    payload: bytes
    publisher: str | None = None
    meta: Any = None              # any msgpack value, as the publisher gave it
    producer: Producer | None = None

    def __post_init__(self) -> None:
        _int(self, "offset")
        _int(self, "ts")
        _int(self, "kind", 0, MAX_KIND)
        if type(self.payload) is not bytes:
            raise _fail(self, "payload", "bytes")
        _str(self, "publisher", 1, MAX_CLIENT_ID, optional=True)
        if self.producer is not None and type(self.producer) is not Producer:
            raise _fail(self, "producer", "a Producer")


def info_problem(info: object) -> str | None:
    """Why ``info`` cannot be a member's info map, or None if it can: a map
    of at most MAX_INFO_ENTRIES entries, keys of 1..MAX_INFO_KEY characters,
    values that mean the same in msgpack and JSON (strings up to
    MAX_INFO_TEXT characters, integers within +-MAX_INFO_INT, finite
    numbers, booleans, nil).  Flat, so checking it is one short loop."""
    if type(info) is not dict:
        return "must be a map"
    if len(info) > MAX_INFO_ENTRIES:
        return f"may have at most {MAX_INFO_ENTRIES} entries, not {len(info)}"
    for key, value in info.items():
        if type(key) is not str or not 1 <= len(key) <= MAX_INFO_KEY:
            return f"keys must be strings of 1-{MAX_INFO_KEY} characters, not {_short(key)}"
        kind = type(value)
        if value is None or kind is bool:
            continue
        if kind is int:
            if -MAX_INFO_INT <= value <= MAX_INFO_INT:
                continue
            return f"value of {key!r} is an integer beyond 2^53"
        if kind is float:
            if value == value and abs(value) != float("inf"):
                continue
            return f"value of {key!r} is not a finite number"
        if kind is str:
            if len(value) <= MAX_INFO_TEXT:
                continue
            return f"value of {key!r} is longer than {MAX_INFO_TEXT} characters"
        return f"value of {key!r} must be a string, number, boolean or nil, not {_short(value)}"
    return None


def _info(obj: object, attr: str) -> None:
    """An optional info map, copied (so the frame's is its own) and None when empty."""
    v = getattr(obj, attr)
    if v is None:
        return
    problem = info_problem(v)
    if problem is not None:
        wire = _WIRE.get(type(obj))
        where = wire[0] if wire else type(obj).__name__.lower()
        raise FrameError("bad_frame", f"{where} {attr!r} {problem}")
    object.__setattr__(obj, attr, dict(v) if v else None)


@dataclass(frozen=True, slots=True)
class Member:
    """One member of a session's presence (docs/protocol.md, "Presence"): a
    WebSocket connection attached to it, an SSE response, or a long-poll
    reader."""

    id: str                  # unique among the session's members while it is one
    client: str              # the client id: hello's, the token's sub, or Broker-Client
    transport: str           # ws, sse or longpoll
    since: int               # when it joined, microseconds since the Unix epoch (as a record's ts)
    info: dict[str, Any] | None = None   # what the client shows with it; see info_problem

    def __post_init__(self) -> None:
        _str(self, "id", 1, MAX_CLIENT_ID)
        _str(self, "client", 1, MAX_CLIENT_ID)
        if type(self.transport) is not str or self.transport not in TRANSPORTS:
            raise _fail(self, "transport", "ws, sse or longpoll")
        _int(self, "since")
        _info(self, "info")

    def as_map(self) -> dict[str, Any]:
        """The member as it travels, in msgpack and in JSON alike."""
        out: dict[str, Any] = {"id": self.id, "client": self.client,
                               "transport": self.transport, "since": self.since}
        if self.info is not None:
            out["info"] = self.info
        return out


# ---------------------------------------------------------------- client frames

@dataclass(frozen=True, slots=True)
class Hello:
    """The first frame of a connection; ``client`` None lets the server name it."""

    client: str | None = None
    token: str | None = None
    info: dict[str, Any] | None = None    # presence info shown with this connection's attaches

    def __post_init__(self) -> None:
        _str(self, "client", 1, MAX_CLIENT_ID, optional=True)
        _str(self, "token", optional=True)
        _info(self, "info")


@dataclass(frozen=True, slots=True)
class Attach:
    """Start a subscription.  ``offset`` is a record offset, START or NOW."""

    id: int
    session: str
    offset: int = NOW
    epoch: int | None = None              # the epoch ``offset`` belongs to
    kinds: tuple[int, ...] | None = None  # None: every kind
    credit: int | None = None             # None: unlimited
    create: bool = False
    view: bool = False                    # a ``view`` frame first, then data from its ``next``
    presence: bool = False                # receive the session's members, then join and leave
    hidden: bool = False                  # attach without being shown in its presence
    info: dict[str, Any] | None = None    # presence info for this session (else hello's)

    def __post_init__(self) -> None:
        _int(self, "id")
        _session(self)
        _int(self, "offset", NOW, U64_MAX, code="bad_offset")
        _int(self, "epoch", optional=True)
        kinds = _tuple(self, "kinds", optional=True)
        # An empty filter would receive nothing, which no client means to ask.
        if kinds is not None and (not kinds or not all(
                type(k) is int and 0 <= k <= MAX_KIND for k in kinds)):
            raise _fail(self, "kinds", f"a non-empty list of integers in 0..{MAX_KIND}")
        _int(self, "credit", 1, U64_MAX, optional=True)
        _bool(self, "create")
        _bool(self, "view")
        _bool(self, "presence")
        _bool(self, "hidden")
        _info(self, "info")


@dataclass(frozen=True, slots=True)
class Detach:
    id: int
    session: str

    def __post_init__(self) -> None:
        _int(self, "id")
        _session(self)


@dataclass(frozen=True, slots=True)
class Publish:
    """Append ``records`` (payloads) atomically; ``meta`` has one value or None
    per record."""

    id: int
    session: str
    records: tuple[bytes, ...]
    kind: int = 0
    meta: tuple[Any, ...] | None = None
    producer: Producer | None = None
    create: bool = False

    def __post_init__(self) -> None:
        _int(self, "id")
        _session(self)
        records = _tuple(self, "records")
        # The one per-record step of decoding a publish: map(type) runs in C.
        if not records or set(map(type, records)) != {bytes}:
            raise _fail(self, "records", "a non-empty list of bytes")
        _int(self, "kind", 0, MAX_KIND)
        meta = _tuple(self, "meta", optional=True)
        if meta is not None and len(meta) != len(records):
            raise _fail(self, "meta", f"a list of {len(records)} values, one per record")
        if self.producer is not None and type(self.producer) is not Producer:
            raise _fail(self, "producer", "a Producer")
        _bool(self, "create")


@dataclass(frozen=True, slots=True)
class Signal:
    """A publish of one record of kind 1 (``signal``)."""

    id: int
    session: str
    payload: bytes
    meta: Any = None

    def __post_init__(self) -> None:
        _int(self, "id")
        _session(self)
        if type(self.payload) is not bytes:
            raise _fail(self, "payload", "bytes")


@dataclass(frozen=True, slots=True)
class Credit:
    """Let the server send ``n`` more records on a subscription."""

    session: str
    n: int

    def __post_init__(self) -> None:
        _session(self)
        _int(self, "n", 1, U64_MAX)


@dataclass(frozen=True, slots=True)
class Presence:
    """Ask who is attached to a session now: answered with ``members``."""

    id: int
    session: str

    def __post_init__(self) -> None:
        _int(self, "id")
        _session(self)


@dataclass(frozen=True, slots=True)
class Refresh:
    """A fresh token for the same ``sub``, sent before the current one expires."""

    id: int
    token: str

    def __post_init__(self) -> None:
        _int(self, "id")
        _str(self, "token", min_len=1)


@dataclass(frozen=True, slots=True)
class Ping:
    """Sent both ways: the server's carry an ``id``, a client's may."""

    id: int | None = None

    def __post_init__(self) -> None:
        _int(self, "id", optional=True)


@dataclass(frozen=True, slots=True)
class Pong:
    id: int | None = None

    def __post_init__(self) -> None:
        _int(self, "id", optional=True)


# ---------------------------------------------------------------- server frames

@dataclass(frozen=True, slots=True)
class Welcome:
    version: int
    client: str
    connection: str          # an opaque id the server gives the connection
    heartbeat: float         # seconds between the server's pings
    max_message: int         # bytes
    ttl: float | None = None # seconds until the token expires; None: no token, or no expiry

    def __post_init__(self) -> None:
        _int(self, "version", 1, U64_MAX)
        _str(self, "client", 1, MAX_CLIENT_ID)
        _str(self, "connection", min_len=1)
        _seconds(self, "heartbeat")
        _int(self, "max_message", 1, U64_MAX)
        _seconds(self, "ttl", optional=True, zero=True)


@dataclass(frozen=True, slots=True)
class Refreshed:
    """The refresh's token is now the connection's; ``ttl`` as in ``welcome``."""

    id: int
    ttl: float | None = None

    def __post_init__(self) -> None:
        _int(self, "id")
        _seconds(self, "ttl", optional=True, zero=True)


@dataclass(frozen=True, slots=True)
class Expiring:
    """The token expires in ``ttl`` seconds: send ``refresh`` before then."""

    ttl: float

    def __post_init__(self) -> None:
        _seconds(self, "ttl", zero=True)


@dataclass(frozen=True, slots=True)
class Attached:
    id: int
    session: str
    epoch: int
    offset: int              # where reading starts, START and NOW resolved
    next: int                # the session's current end
    closed: bool

    def __post_init__(self) -> None:
        _int(self, "id")
        _session(self)
        _int(self, "epoch")
        _int(self, "offset")
        _int(self, "next")
        _bool(self, "closed")


@dataclass(frozen=True, slots=True)
class Detached:
    id: int
    session: str

    def __post_init__(self) -> None:
        _int(self, "id")
        _session(self)


@dataclass(frozen=True, slots=True)
class Ack:
    """Records ``offset``..``offset + count - 1`` are durable.  With ``dup``, a
    producer's retry that appended nothing: ``offset`` and ``count`` are then
    where the original landed, or both absent if the broker no longer knows."""

    id: int
    session: str
    offset: int | None = None
    count: int | None = None
    dup: bool = False

    def __post_init__(self) -> None:
        _int(self, "id")
        _session(self)
        _bool(self, "dup")
        _int(self, "offset", optional=self.dup)
        _int(self, "count", optional=self.dup)
        if self.dup and (self.offset is None) != (self.count is None):
            raise _fail(self, "offset", "with 'dup', offset and count come together or not at all")


@dataclass(frozen=True, slots=True)
class Data:
    """Records of an attached session, in offset order."""

    session: str
    records: tuple[Record, ...]

    def __post_init__(self) -> None:
        _session(self)
        records = _tuple(self, "records")
        if not records or set(map(type, records)) != {Record}:
            raise _fail(self, "records", "a non-empty list of records")
        last = -1
        for r in records:
            if r.offset <= last:
                raise _fail(self, "records", "in increasing offset order")
            last = r.offset


@dataclass(frozen=True, slots=True)
class View:
    """The conversation so far (docs/ai.md, "Views"), sent after ``attached``
    when the attach asked for it: ``view`` is a Conversation snapshot exact
    at ``next``, and the subscription's records go on from ``next``."""

    session: str
    next: int
    view: dict[str, Any]     # Conversation.to_snapshot(); Conversation.from_snapshot reads it

    def __post_init__(self) -> None:
        _session(self)
        _int(self, "next")
        if type(self.view) is not dict or self.view.get("next") != self.next:
            raise _fail(self, "view", "a conversation snapshot (a map) whose next is 'next'")


@dataclass(frozen=True, slots=True)
class UpToDate:
    session: str
    next: int                # where the subscription goes on from

    def __post_init__(self) -> None:
        _session(self)
        _int(self, "next")


@dataclass(frozen=True, slots=True)
class Event:
    """The session changed and the subscription has ended."""

    session: str
    event: str               # closed, deleted or epoch_changed
    epoch: int | None = None # the new epoch, for epoch_changed only

    def __post_init__(self) -> None:
        _session(self)
        if type(self.event) is not str or self.event not in EVENTS:
            raise _fail(self, "event", "closed, deleted or epoch_changed")
        _int(self, "epoch", optional=self.event != "epoch_changed")
        if self.event != "epoch_changed" and self.epoch is not None:
            raise _fail(self, "epoch", "absent unless the event is epoch_changed")


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    message: str
    session: str | None = None   # set when the error concerns one session
    id: int | None = None        # set when it answers one request
    retry_after: float | None = None  # seconds, when the same request would pass later

    def __post_init__(self) -> None:
        _str(self, "code", min_len=1)
        _str(self, "message")
        _str(self, "session", min_len=1, optional=True)
        _int(self, "id", optional=True)
        _seconds(self, "retry_after", optional=True, zero=True)


@dataclass(frozen=True, slots=True)
class Members:
    """A session's members, in the order they joined: the answer to
    ``presence`` (with its ``id``), or, on a subscription that asked for
    presence, the whole set (after ``attached``, and again in place of
    join and leave events that were dropped for a slow reader)."""

    session: str
    members: tuple[Member, ...]
    id: int | None = None

    def __post_init__(self) -> None:
        _session(self)
        members = _tuple(self, "members")
        if members and set(map(type, members)) != {Member}:
            raise _fail(self, "members", "a list of members")
        _int(self, "id", optional=True)


@dataclass(frozen=True, slots=True)
class Join:
    """``member`` joined the session (one with an id the client holds replaces it)."""

    session: str
    member: Member

    def __post_init__(self) -> None:
        _session(self)
        if type(self.member) is not Member:
            raise _fail(self, "member", "a member")


@dataclass(frozen=True, slots=True)
class Leave:
    """``member`` left the session."""

    session: str
    member: Member

    def __post_init__(self) -> None:
        _session(self)
        if type(self.member) is not Member:
            raise _fail(self, "member", "a member")


Frame = (Hello | Attach | Detach | Publish | Signal | Credit | Refresh | Ping | Pong
         | Welcome | Attached | Detached | Ack | Data | UpToDate | Event | Refreshed | Expiring
         | Error | View | Presence | Members | Join | Leave)
# What each side may send (Ping and Pong go both ways); usable with isinstance.
ClientFrame = (Hello | Attach | Detach | Publish | Signal | Credit | Refresh | Ping | Pong
               | Presence)
ServerFrame = (Welcome | Attached | Detached | Ack | Data | UpToDate | Event | Refreshed
               | Expiring | Error | Ping | Pong | View | Members | Join | Leave)


# ---------------------------------------------------------------- the wire table

# class -> ("t", {attribute: wire key, for the attributes whose key differs}).
_WIRE: Final[dict[type, tuple[str, dict[str, str]]]] = {
    Hello:    ("hello",      {}),
    Attach:   ("attach",     {"session": "s"}),
    Detach:   ("detach",     {"session": "s"}),
    Publish:  ("publish",    {"session": "s", "records": "r"}),
    Signal:   ("signal",     {"session": "s", "payload": "r"}),
    Credit:   ("credit",     {"session": "s"}),
    Refresh:  ("refresh",    {}),
    Ping:     ("ping",       {}),
    Pong:     ("pong",       {}),
    Welcome:  ("welcome",    {"version": "v", "connection": "conn"}),
    Attached: ("attached",   {"session": "s"}),
    Detached: ("detached",   {"session": "s"}),
    Ack:      ("ack",        {"session": "s"}),
    Data:     ("data",       {"session": "s", "records": "r"}),
    UpToDate: ("up_to_date", {"session": "s"}),
    View:     ("view",       {"session": "s", "view": "v"}),
    Event:    ("event",      {"session": "s", "event": "e"}),
    Refreshed: ("refreshed", {}),
    Expiring: ("expiring",   {}),
    Error:    ("error",      {"session": "s"}),
    Presence: ("presence",   {"session": "s"}),
    Members:  ("members",    {"session": "s"}),
    Join:     ("join",       {"session": "s"}),
    Leave:    ("leave",      {"session": "s"}),
}


def parse_offset(value: object) -> int:
    """A wire offset to read from -> a record offset, START or NOW.

    Takes an integer >= -1, ``"-1"``, ``"now"``, or an HTTP offset
    ``"0000000000000000_0000000000000042"`` (the same as 42).
    """
    if type(value) is int:
        if START <= value <= U64_MAX:
            return value
    elif type(value) is str:
        offset = parse_offset_text(value)
        if offset is not None and offset <= U64_MAX:
            return offset
    raise FrameError("bad_offset", f"malformed offset {_short(value)}: use an integer, "
                                   f"\"-1\", \"now\" or an HTTP offset")


def _load_producer(value: Any) -> Producer:
    if type(value) is not dict:
        raise FrameError("bad_frame", "publish 'producer' must be a map {id, epoch, seq}")
    get: Callable[[str], Any] = value.get   # a missing key fails Producer's checks
    return Producer(get("id"), get("epoch"), get("seq"))


def _dump_producer(p: Producer) -> dict[str, Any]:
    return {"id": p.id, "epoch": p.epoch, "seq": p.seq}


def _load_records(rows: Any) -> tuple[Record, ...]:
    if type(rows) is not list:
        raise FrameError("bad_frame", "data 'r' must be a list of records")
    out = []
    for row in rows:
        if type(row) is not list or len(row) != 5:
            raise FrameError("bad_frame",
                             "a data record must be [offset, ts, kind, header, payload]")
        offset, ts, kind, header, payload = row
        if header is None:
            out.append(Record(offset, ts, kind, payload))
            continue
        if type(header) is not list or len(header) > 3:
            raise FrameError("bad_frame",
                             "a record header must be nil or [publisher, meta, producer]")
        publisher, meta, producer = header + [None] * (3 - len(header))
        if producer is not None:
            if type(producer) is not list or len(producer) != 3:
                raise FrameError("bad_frame", "a record's producer must be [id, epoch, seq]")
            producer = Producer(*producer)
        out.append(Record(offset, ts, kind, payload, publisher, meta, producer))
    return tuple(out)


def _dump_record(r: Record) -> list[Any]:
    header: list[Any] | None = None
    if r.publisher is not None or r.meta is not None or r.producer is not None:
        p = r.producer
        header = [r.publisher, r.meta, None if p is None else [p.id, p.epoch, p.seq]]
        while header[-1] is None:
            header.pop()
    return [r.offset, r.ts, r.kind, header, r.payload]


def _dump_records(records: tuple[Record, ...]) -> list[list[Any]]:
    return [_dump_record(r) for r in records]


def _load_member(value: Any) -> Member:
    if type(value) is not dict:
        raise FrameError("bad_frame", "a member must be a map {id, client, transport, since}")
    get: Callable[[str], Any] = value.get   # a missing key fails Member's checks
    return Member(get("id"), get("client"), get("transport"), get("since"), get("info"))


def _load_members(values: Any) -> tuple[Member, ...]:
    if type(values) is not list:
        raise FrameError("bad_frame", "members 'members' must be a list of members")
    return tuple(map(_load_member, values))


def _dump_members(members: tuple[Member, ...]) -> list[dict[str, Any]]:
    return [m.as_map() for m in members]


# (class, attribute) -> converter, for the fields not held as they travel.
_LOAD: Final[dict[tuple[type, str], Callable[[Any], Any]]] = {
    (Attach, "offset"): parse_offset,
    (Publish, "producer"): _load_producer,
    (Data, "records"): _load_records,
    (Members, "members"): _load_members,
    (Join, "member"): _load_member,
    (Leave, "member"): _load_member,
}
_DUMP: Final[dict[tuple[type, str], Callable[[Any], Any]]] = {
    (Publish, "producer"): _dump_producer,
    (Data, "records"): _dump_records,
    (Members, "members"): _dump_members,
    (Join, "member"): Member.as_map,
    (Leave, "member"): Member.as_map,
}

_REQUIRED: Final = object()


@dataclass(frozen=True, slots=True)
class _Field:
    attr: str
    key: str
    default: Any                              # _REQUIRED for a required field
    load: Callable[[Any], Any] | None
    dump: Callable[[Any], Any] | None


def _compile() -> tuple[dict[type, tuple[str, tuple[_Field, ...]]],
                        dict[str, tuple[Callable[..., Any], tuple[_Field, ...]]]]:
    by_class: dict[type, tuple[str, tuple[_Field, ...]]] = {}
    by_type: dict[str, tuple[Callable[..., Any], tuple[_Field, ...]]] = {}
    for cls, (t, keys) in _WIRE.items():
        attrs = [f.name for f in fields(cls)]
        assert set(keys) <= set(attrs), cls
        specs = tuple(
            _Field(f.name, keys.get(f.name, f.name),
                   _REQUIRED if f.default is MISSING else f.default,
                   _LOAD.get((cls, f.name)), _DUMP.get((cls, f.name)))
            for f in fields(cls))
        by_class[cls] = (t, specs)
        by_type[t] = (cls, specs)
    return by_class, by_type


_BY_CLASS, _BY_TYPE = _compile()


# ---------------------------------------------------------------- codec

def encode(frame: Frame) -> bytes:
    """The frame as one msgpack map, optional fields at their default left out."""
    t, specs = _BY_CLASS[type(frame)]
    out: dict[str, Any] = {"t": t}
    for f in specs:
        v = getattr(frame, f.attr)
        if v is None or (f.default is not _REQUIRED and v == f.default):
            continue
        out[f.key] = v if f.dump is None else f.dump(v)
    return msgpack.packb(out, use_bin_type=True)  # type: ignore[no-any-return]


def decode(data: bytes) -> Frame:
    """One message -> its frame, of either direction.  Raises FrameError."""
    n = len(data)
    try:
        m = msgpack.unpackb(data, raw=False, strict_map_key=False,
                            max_str_len=n, max_bin_len=n, max_array_len=n,
                            max_map_len=n // 2, max_ext_len=n)
    except Exception:  # msgpack raises many types for garbage; all mean one thing
        raise FrameError("bad_frame", "not a msgpack message") from None
    if type(m) is not dict:
        raise FrameError("bad_frame", "a frame must be a msgpack map")
    session = m.get("s")
    if type(session) is not str or not session:
        session = None
    request_id = m.get("id")
    if type(request_id) is not int or not 0 <= request_id <= U64_MAX:
        request_id = None
    t = m.get("t")
    entry = _BY_TYPE.get(t) if type(t) is str else None
    if entry is None:
        what = "no frame type 't'" if t is None else f"unknown frame type {_short(t)}"
        raise FrameError("bad_frame", what, session, request_id)
    cls, specs = entry
    kwargs: dict[str, Any] = {}
    try:
        for f in specs:
            v = m.get(f.key)
            if v is None:
                if f.default is _REQUIRED:
                    raise FrameError("bad_frame", f"{t} needs {f.key!r}")
                continue
            kwargs[f.attr] = v if f.load is None else f.load(v)
        frame: Frame = cls(**kwargs)
    except FrameError as e:
        e.session, e.request_id = session, request_id
        raise
    return frame

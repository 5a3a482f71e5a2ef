"""The Durable Streams HTTP API at /v1/stream/<path>, on top of the session core.

Theory of operation
-------------------
A Durable Streams *stream* is a broker *session* named by the URL path after
``/v1/stream/``.  Each request is a handful of broker calls:

* ``PUT`` creates (idempotently; 409 when the settings differ), optionally with
  initial data and already closed.
* ``POST`` appends.  In byte mode the body is one record.  In JSON mode
  (``application/json``) the body is parsed; an array is flattened one level
  and each element becomes its own record, stored as compact JSON text.  A
  ``Stream-Closed: true`` header closes the stream, after the data if any.
* ``GET`` reads from ``offset``: catch-up (one batch), ``live=long-poll``
  (waits up to the long-poll timeout at the tail, then 204) or ``live=sse``
  (a chunked ``text/event-stream`` of data and control events, closed after
  ``sse_max_s`` so clients reconnect and caches turn over).
* ``HEAD`` and ``DELETE`` map to info and delete.

Offsets on the wire are ``0000000000000000_<record offset, 16 digits>``: the
offset of the next record to read, zero-padded so strings sort like numbers.
The part before ``_`` is reserved (always 0 today).  They are the broker's own
record offsets, so they survive restarts and mean the same thing on every
transport.  ``-1`` means the oldest retained record and ``now`` the tail.

With token auth on (_auth.py), every request but a CORS preflight carries a
token, as ``Authorization: Bearer`` or, for EventSource, ``?token=``.  A
missing or bad token is a 401; a good one is checked for every operation the
request needs (``_operations``) before the stream is looked up, so a 403 never
tells whether the stream exists.  The token's ``sub`` is stamped as the
publisher of the records the request appends, and a live read (long-poll,
SSE) ends by the token's expiry: the client comes back with a fresh token and
the offset it got.

Broker extensions (docs/protocol.md, "Broker extensions") reach what the
Durable Streams protocol has no words for, and change nothing when unused:

* ``Broker-Kind`` on a POST gives the appended records a kind (``signal``
  needs the ``signal`` capability, as on the WebSocket);
* ``view=records`` on a GET answers JSON record objects (offset, kind,
  publisher, time, meta and payload) instead of bare payloads, and
  ``kinds=`` keeps only some kinds.  The cursor still moves past the records
  left out, so offsets, headers and control events are those of a plain read;
* ``view=conversation`` on a GET answers the AI conversation so far (the
  session actor's fold, docs/ai.md "Views") as JSON, exact at its
  ``Stream-Next-Offset``, from which the client reads on;
* a POST body of type ``application/vnd.broker.records+msgpack`` (a msgpack
  array of byte strings) appends several binary records atomically, as a
  WebSocket publish does;
* ``Broker-Epoch`` on every answer about a stream's records (HEAD, GET, SSE,
  POST, PUT) names the session's incarnation, so an HTTP client sees a
  re-created session instead of reading its offsets as the old one's;
* ``Broker-Client`` names the client when auth is off (with auth on the
  token's ``sub`` does): it becomes the records' publisher, so an idempotent
  producer is keyed alike over HTTP and over the WebSocket;
* a producer's duplicate (204) carries ``Stream-Next-Offset`` and
  ``Broker-First-Offset`` where the original landed, while the session
  still knows (its producers' last 64 appends, restarts included);
* presence (_presence.py): an open SSE response and a long-poll reader
  are members of the session's presence (``Broker-Presence`` gives their
  info, or hides them), and ``view=presence`` answers the members now.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import math
import random
import re
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from . import _core
from ._auth import (
    APPEND,
    CREATE,
    DELETE,
    OPEN,
    READ,
    SIGNAL as SIGNAL_OP,
    AuthError,
    Authenticator,
    Forbidden,
    Principal,
)
from ._broker import Broker, Subscription
from ._errors import (
    BrokerError,
    EpochChanged,
    InvalidSessionName,
    OffsetOutOfRange,
    OffsetTooOld,
    RecordTooLarge,
    SequenceConflict,
    SessionClosed,
    SessionDeleted,
    SessionExists,
    SessionNotFound,
)
from ._frames import MAX_CLIENT_ID, Member, info_problem
from ._http import Headers, Request, Responder, error, response
from ._meta import media_type, reject_json_constant
from ._offsets import HTTP_OFFSET_RE, format_offset, parse_offset_text
from ._session import (
    MAX_KIND,
    MESSAGE,
    NOW,
    SIGNAL,
    START,
    ProduceResult,
    SessionInfo,
    header_parts,
)

STREAM_PREFIX = "/v1/stream/"

_TTL_RE = re.compile(r"0|[1-9]\d{0,15}")
_CURSOR_EPOCH = datetime.datetime(2024, 10, 9, tzinfo=datetime.UTC).timestamp()
_CURSOR_INTERVAL_S = 20
_DEFAULT_CT = "application/octet-stream"
_CT_RE = re.compile(r"[\w.+-]+/[\w.+-]+")


class _Fail(Exception):
    """An HTTP error answer, raised from deep in a handler."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Headers | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers or []


# ---------------------------------------------------------------- offsets

def parse_offset(text: str) -> int:
    """A wire offset, ``-1`` or ``now`` -> a record offset, START or NOW."""
    offset = parse_offset_text(text)
    if offset is None:
        raise _Fail(400, "bad_offset", f"malformed offset {text!r}")
    return offset


def _cursor(client: str | None) -> str:
    """Stream-Cursor: the current 20 s interval, always past the client's own
    (with jitter), so CDN-collapsed long-polls never loop on one cached answer."""
    now = int((time.time() - _CURSOR_EPOCH) // _CURSOR_INTERVAL_S)
    try:
        theirs = int(client) if client else -1
    except ValueError:
        theirs = -1
    if theirs < now:
        return str(now)
    return str(theirs + max(1, math.ceil(random.randint(1, 3600) / _CURSOR_INTERVAL_S)))


def _is_json(content_type: str) -> bool:
    return media_type(content_type) == "application/json"


def _is_text(content_type: str) -> bool:
    m = media_type(content_type)
    return m.startswith("text/") or m == "application/json"


# Parsed JSON costs far more memory than its text: ``[{},{},...]`` holds an
# object of about 64 bytes for every 3 bytes of body.  An upper bound on the
# number of values (each needs a comma or an opening bracket or brace, and
# those inside strings only raise the bound) caps that before parsing.
MAX_JSON_VALUES = 1_000_000


def _json_records(body: bytes, allow_empty: bool, limit: int) -> list[bytes]:
    values = body.count(b",") + body.count(b"[") + body.count(b"{")
    if values > MAX_JSON_VALUES:
        raise _Fail(413, "json_too_large",
                    f"the body may hold up to {values} JSON values; the limit is "
                    f"{MAX_JSON_VALUES}: split it")
    try:
        value = json.loads(body, parse_constant=reject_json_constant)
    except (ValueError, UnicodeDecodeError):
        raise _Fail(400, "bad_json", "the body is not valid JSON") from None
    except RecursionError:
        raise _Fail(400, "bad_json", "the body is nested too deeply") from None
    items = value if isinstance(value, list) else [value]
    if not items and not allow_empty:
        raise _Fail(400, "empty_array", "an empty JSON array appends nothing")
    if len(items) > limit:
        raise _Fail(413, "batch_too_large",
                    f"{len(items)} records in one request; the limit is {limit}")
    try:
        return [json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode()
                for v in items]
    except UnicodeEncodeError:
        # An escaped lone surrogate ("\ud800") parses but is not Unicode text.
        raise _Fail(400, "bad_json", "the body holds an invalid Unicode escape") from None
    except RecursionError:       # dumping runs a frame deeper than parsing did
        raise _Fail(400, "bad_json", "the body is nested too deeply") from None


def _json_body(batch: _core.Batch) -> bytes:
    return b"[" + b",".join(batch.payloads()) + b"]"


def _etag(name: str, start: str, end: str, closed: bool) -> str:
    tag = base64.b64encode(name.encode()).decode()
    return f'"{tag}:{start}:{end}{":c" if closed else ""}"'


def _stream_name(header: str) -> str:
    """Stream-Forked-From names a stream by path (``/v1/stream/x``) or by name."""
    path = urllib.parse.urlsplit(header).path if "://" in header else header
    if path.startswith(STREAM_PREFIX):
        path = path[len(STREAM_PREFIX):]
    return urllib.parse.unquote(path)


def _epoch(epoch: int) -> tuple[str, str]:
    """Broker-Epoch: the session incarnation a response speaks of, so an HTTP
    client tells a re-created session from the one its offsets belong to."""
    return ("Broker-Epoch", str(epoch))


def _expires_header(info: SessionInfo) -> str | None:
    raw = info.extra.get("expires_at_raw")
    return raw if isinstance(raw, str) else None


# ------------------------------------------------- extensions: kinds, records

_KIND_NAMES = {"message": MESSAGE, "signal": SIGNAL}
_KIND_RE = re.compile(r"\d{1,2}")


def _parse_kind(text: str) -> int | None:
    """``message``, ``signal`` or 0..63 -> a record kind; None if it is none."""
    value = text.strip().lower()
    if value in _KIND_NAMES:
        return _KIND_NAMES[value]
    if _KIND_RE.fullmatch(value) and int(value) <= MAX_KIND:
        return int(value)
    return None


def _meta_header(req: Request) -> list[Any] | None:
    """The record metadata a POST gives (``Broker-Meta``: a JSON array with one
    value per record, in ASCII, non-ASCII as \\u escapes), or None."""
    raw = req.header(b"broker-meta")
    if raw is None:
        return None
    try:
        value = json.loads(raw, parse_constant=reject_json_constant)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, list):
        raise _Fail(400, "bad_meta", "Broker-Meta must be a JSON array, one value per record")
    return value


def _kind_header(req: Request) -> int:
    """The kind a POST gives its records (``Broker-Kind``; message without it)."""
    raw = req.header(b"broker-kind")
    if raw is None:
        return MESSAGE
    kind = _parse_kind(raw)
    if kind is None:
        raise _Fail(400, "bad_kind", f"Broker-Kind must be message, signal or a number "
                    f"0..{MAX_KIND}, not {raw[:40]!r}")
    return kind


# A POST body of several binary records: one msgpack array of byte strings.
RECORDS_TYPE = "application/vnd.broker.records+msgpack"

# msgpack's array and bin/str headers with a length field: first byte -> its size.
_MP_ARRAY_LENGTHS = {0xdc: 2, 0xdd: 4}
_MP_BYTES_LENGTHS = {0xc4: 1, 0xc5: 2, 0xc6: 4, 0xd9: 1, 0xda: 2, 0xdb: 4}


def _mp_length(body: bytes, pos: int, array: bool) -> tuple[int, int] | None:
    """The length in the msgpack array header (or bin/str header) at ``pos``
    and where what it counts starts; None if there is no such header."""
    if pos >= len(body):
        return None
    first = body[pos]
    if array and 0x90 <= first <= 0x9f:
        return first & 0x0f, pos + 1
    if not array and 0xa0 <= first <= 0xbf:
        return first & 0x1f, pos + 1
    size = (_MP_ARRAY_LENGTHS if array else _MP_BYTES_LENGTHS).get(first)
    if size is None or pos + 1 + size > len(body):
        return None
    return int.from_bytes(body[pos + 1:pos + 1 + size], "big"), pos + 1 + size


def _msgpack_records(body: bytes, limit: int) -> list[bytes]:
    """The records of a RECORDS_TYPE body: a msgpack array whose items are
    bin (or str) values, each one record's payload, empty ones included.

    Parsed by hand rather than by msgpack.unpackb: the array's framing is
    all there is to read, and a general unpacker would first build whatever
    nested values a bad body holds (the memory cost MAX_JSON_VALUES bounds
    for JSON)."""
    head = _mp_length(body, 0, True)
    if head is None:
        raise _Fail(400, "bad_records", f"a {RECORDS_TYPE} body is one msgpack array of "
                    "byte strings")
    count, pos = head
    if count == 0:
        raise _Fail(400, "empty_array", "an empty array appends nothing")
    if count > limit:
        raise _Fail(413, "batch_too_large",
                    f"{count} records in one request; the limit is {limit}")
    records = []
    for i in range(count):
        item = _mp_length(body, pos, False)
        if item is None:
            raise _Fail(400, "bad_records", f"item {i} of the array is not a msgpack bin or str")
        size, pos = item
        if pos + size > len(body):
            raise _Fail(400, "bad_records", "the body ends inside the array")
        records.append(body[pos:pos + size])
        pos += size
    if pos != len(body):
        raise _Fail(400, "bad_records", "bytes after the msgpack array")
    return records


def _client_header(req: Request) -> str | None:
    """The client id a request names in ``Broker-Client`` (percent-encoded
    UTF-8), or None."""
    raw = req.header(b"broker-client")
    if raw is None:
        return None
    try:
        client = urllib.parse.unquote(raw, errors="strict")
    except UnicodeDecodeError:
        client = ""
    if not 1 <= len(client) <= MAX_CLIENT_ID:
        raise _Fail(400, "bad_client", f"Broker-Client must be a client id of 1 to "
                    f"{MAX_CLIENT_ID} characters, percent-encoded UTF-8")
    return client


@dataclass(frozen=True, slots=True)
class _View:
    """How a GET shows records: the protocol's bare payloads, or record
    objects with their headers (``view=records``), maybe of some kinds only."""

    records: bool = False
    mask: int = _core.ALL_KINDS       # bit k set: records of kind k are shown


_BARE = _View()


@dataclass(frozen=True, slots=True)
class _Appearance:
    """How a live reader shows in presence (``Broker-Presence``): the client
    id it goes by (None: it named none) and its info map."""

    client: str | None
    info: dict[str, Any] | None


# Broker-Presence is "hidden" or a JSON object; its info is small by rule
# (_frames.info_problem), so a long header is refused before it is parsed.
_MAX_PRESENCE_HEADER = 4096


def _view(params: dict[str, list[str]]) -> _View:
    views, kinds = params.get("view"), params.get("kinds")
    if views is None:
        if kinds is not None:
            raise _Fail(400, "bad_kind", "kinds= needs view=records")
        return _BARE
    if views != ["records"]:
        raise _Fail(400, "bad_view", "the views are records, and conversation or presence "
                    f"(alone), not {','.join(views)[:40]!r}")
    if kinds is None:
        return _View(records=True)
    if len(kinds) > 1:
        raise _Fail(400, "bad_kind", "more than one kinds parameter")
    mask = 0
    for part in kinds[0].split(","):
        kind = _parse_kind(part)
        if kind is None:
            raise _Fail(400, "bad_kind", f"kinds= is a comma list of 0..{MAX_KIND} "
                        f"(or message, signal), not {kinds[0][:40]!r}")
        mask |= 1 << kind
    return _View(records=True, mask=mask)


def _jsonable(value: Any) -> Any:
    """A msgpack value (record meta) as JSON: bytes become base64 text, map
    keys text, and what JSON cannot hold (NaN, extension types) null."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k if isinstance(k, str) else json.dumps(_jsonable(k)): _jsonable(v)
                for k, v in value.items()}
    return None


def _header_fields(header: bytes | None) -> tuple[str | None, Any]:
    """(publisher, meta as JSON) from a record's stored header."""
    if header is None:
        return None, None
    try:
        publisher, meta, _ = header_parts(header)
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException):
        return None, None       # not ours to mend: the record is shown without it
    return publisher, _jsonable(meta)


def _record_objects(batch: _core.Batch, content_type: str, mask: int) -> list[dict[str, Any]]:
    """The records of ``batch`` whose kind is in ``mask``, as JSON objects."""
    is_json = _is_json(content_type)
    is_text = media_type(content_type).startswith("text/")
    shown: list[dict[str, Any]] = []
    for i in range(len(batch)):
        kind = (batch.flags(i) >> _core.KIND_SHIFT) & MAX_KIND
        if not mask >> kind & 1:
            continue
        publisher, meta = _header_fields(batch.meta(i))
        record: dict[str, Any] = {"o": batch.offset(i), "k": kind, "p": publisher,
                                  "ts": batch.timestamp(i), "m": meta}
        record.update(_payload_fields(bytes(batch.payload(i)), is_json, is_text))
        shown.append(record)
    return shown


def _payload_fields(payload: bytes, is_json: bool, is_text: bool) -> dict[str, Any]:
    if is_json:
        try:
            return {"d": json.loads(payload, parse_constant=reject_json_constant)}
        except (ValueError, RecursionError):
            # Every way in checks a JSON session's payloads; should one still
            # not parse, it is shown as bytes rather than dropped.
            pass
    elif is_text:
        return {"d": payload.decode("utf-8", "replace")}
    return {"d": base64.b64encode(payload).decode(), "b64": True}


def _some(batch: _core.Batch, shown: list[dict[str, Any]] | None) -> bool:
    """Whether a read has anything to answer (record objects, if shown)."""
    return bool(batch) if shown is None else bool(shown)


def _records_body(records: list[dict[str, Any]]) -> bytes:
    try:
        return json.dumps(records, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:      # a lone surrogate from a JSON escape: escape it again
        return json.dumps(records, separators=(",", ":")).encode()


# ------------------------------------------------------------------- the API

class StreamsApi:
    def __init__(self, broker: Broker, long_poll_timeout_s: float = 30.0,
                 sse_max_s: float = 60.0, auth: Authenticator | None = None,
                 max_batch_records: int = 10_000, presence_linger_s: float = 10.0) -> None:
        self.broker = broker
        # A long-poll reader stays present this long after its last poll ends.
        self.presence_linger_s = presence_linger_s
        self.auth = auth or Authenticator()
        self.max_batch_records = max_batch_records
        self.long_poll_timeout_s = long_poll_timeout_s
        self.sse_max_s = sse_max_s
        self._waits: set[trio.CancelScope] = set()   # live waits, ended on shutdown
        self._fork_lock = trio.Lock()                # fork links change one at a time
        self._closing = False

    def shut_down(self) -> None:
        """End every long-poll and SSE wait now (they answer as on a timeout)."""
        self._closing = True
        for scope in self._waits:
            scope.cancel()

    @contextlib.contextmanager
    def _live_wait(self, deadline: float) -> Iterator[None]:
        """A wait at the tail (long-poll, idle SSE) that ends at ``deadline``,
        or at once when the server shuts down."""
        with trio.move_on_at(-math.inf if self._closing else deadline) as scope:
            self._waits.add(scope)
            try:
                yield
            finally:
                self._waits.discard(scope)

    async def handle(self, req: Request, out: Responder) -> None:
        path, _, query = req.target.partition("?")
        name = urllib.parse.unquote(path[len(STREAM_PREFIX):])
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        try:
            if req.method == "OPTIONS":
                # A CORS preflight carries no credentials, by the Fetch standard.
                await out.send(response(204, b""))
                return
            who = self.auth.verify(_token(req, params)) if self.auth.enabled else OPEN
            if not name:
                raise _Fail(404, "not_found", "no stream named")
            if req.method not in _OPERATIONS:
                raise _Fail(405, "method_not_allowed", f"{req.method} is not supported")
            # Before any lookup, so a refusal is the same whether or not the
            # stream exists.
            for session, operation in _operations(name, req):
                who.check(session, operation)
            if req.method == "PUT":
                await self._put(name, req, who, out)
            elif req.method == "POST":
                await self._post(name, req, who, out)
            elif req.method == "HEAD":
                await self._head(name, out)
            elif req.method == "GET":
                await self._get(name, req, params, who, out)
            else:
                await self._delete(name)
                await out.send(response(204, b""))
        except AuthError as exc:
            challenge = 'Bearer realm="broker"'
            if exc.code != "unauthorized":
                challenge += ', error="invalid_token"'
            await _answer(out, error(exc.status, exc.code, exc.message,
                                     [("www-authenticate", challenge)]))
        except Forbidden as exc:
            await _answer(out, error(exc.status, exc.code, exc.message, [
                ("www-authenticate", 'Bearer realm="broker", error="insufficient_scope"')]))
        except _Fail as f:
            await _answer(out, error(f.status, f.code, str(f), f.headers))
        except (SessionNotFound, SessionDeleted):
            await _answer(out, error(404, "session_not_found", f"stream {name!r} not found"))
        except EpochChanged as exc:
            await _answer(out, error(409, exc.code, str(exc)))
        except InvalidSessionName as exc:
            await _answer(out, error(400, exc.code, str(exc)))
        except (SessionExists, SequenceConflict) as exc:
            await _answer(out, error(409, exc.code, str(exc)))
        except OffsetTooOld as exc:
            await _answer(out, error(410, exc.code, str(exc), [
                ("Stream-Earliest-Offset", format_offset(exc.earliest))]))
        except OffsetOutOfRange as exc:
            await _answer(out, error(400, exc.code, str(exc)))
        except RecordTooLarge as exc:
            await _answer(out, error(413, exc.code, str(exc)))
        except BrokerError as exc:
            await _answer(out, error(500 if exc.code in ("internal", "storage_error") else 409,
                                 exc.code, str(exc)))

    def _publisher(self, req: Request, who: Principal) -> str | None:
        """Who the records a request appends are stamped with: the token's
        ``sub`` with auth on; with it off, the client the request names in
        ``Broker-Client``, as a WebSocket hello names its client, so an
        idempotent producer is the same one on both transports."""
        if self.auth.enabled:
            return who.sub
        return _client_header(req)

    # ------------------------------------------------------------ PUT

    async def _put(self, name: str, req: Request, who: Principal, out: Responder) -> None:
        source = req.header(b"stream-forked-from")
        fork_offset_h = req.header(b"stream-fork-offset")
        sub_h = req.header(b"stream-fork-sub-offset")
        if sub_h is not None and source is None:
            raise _Fail(400, "bad_fork", "Stream-Fork-Sub-Offset needs Stream-Forked-From")
        fork_offset: int | None = None
        if fork_offset_h is not None:
            if not HTTP_OFFSET_RE.fullmatch(fork_offset_h):
                raise _Fail(400, "bad_fork", f"malformed Stream-Fork-Offset {fork_offset_h!r}")
            fork_offset = parse_offset(fork_offset_h)
        sub = 0
        if sub_h is not None:
            if not _TTL_RE.fullmatch(sub_h.strip()):
                raise _Fail(400, "bad_fork", f"malformed Stream-Fork-Sub-Offset {sub_h!r}")
            sub = int(sub_h)
            if sub and fork_offset is None:
                raise _Fail(400, "bad_fork", "a sub-offset needs Stream-Fork-Offset")
        raw_ct = req.header(b"content-type") or ""
        ct = raw_ct if _CT_RE.match(raw_ct.strip()) else _DEFAULT_CT
        ttl_h, exp_h = req.header(b"stream-ttl"), req.header(b"stream-expires-at")
        if ttl_h is not None and exp_h is not None:
            raise _Fail(400, "bad_ttl", "Stream-TTL and Stream-Expires-At are exclusive")
        ttl: float | None = None
        expires: float | None = None
        extra: dict[str, Any] = {}
        if ttl_h is not None:
            if not _TTL_RE.fullmatch(ttl_h):
                raise _Fail(400, "bad_ttl", f"bad Stream-TTL {ttl_h!r}")
            ttl = float(int(ttl_h))
        if exp_h is not None:
            try:
                expires = datetime.datetime.fromisoformat(exp_h.strip()).timestamp()
            except ValueError:
                raise _Fail(400, "bad_expires_at", f"bad Stream-Expires-At {exp_h!r}") from None
            extra["expires_at_raw"] = exp_h
        closed = (req.header(b"stream-closed") or "").lower() == "true"
        body = bytes(req.body)
        publisher = self._publisher(req, who)
        try:
            existing: SessionInfo | None = await self.broker.info(name)
        except SessionNotFound:
            existing = None
        if existing is not None and existing.extra.get("soft_deleted"):
            raise _Fail(409, "session_conflict", "the stream was deleted but still has forks")
        if source is not None:
            info, created = await self._fork(
                name, _stream_name(source), raw_ct if _CT_RE.match(raw_ct.strip()) else None,
                ttl, expires, extra, closed, body, fork_offset, sub, existing, publisher)
        else:
            initial = (_json_records(body, True, self.max_batch_records)
                       if body and _is_json(ct) else [body] if body else [])
            info, created = await self.broker.create(name, content_type=ct, ttl_s=ttl,
                                                     expires_at=expires, extra=extra,
                                                     closed=closed, initial=initial,
                                                     publisher=publisher)
        headers: Headers = [("content-type", info.content_type),
                            ("Stream-Next-Offset", format_offset(info.next_offset)),
                            _epoch(info.epoch)]
        if created:
            host = req.header(b"host") or "localhost"
            headers.append(("location", f"http://{host}{STREAM_PREFIX}{urllib.parse.quote(name)}"))
        if info.closed:
            headers.append(("Stream-Closed", "true"))
        await out.send(response(201 if created else 200, b"", headers=headers))

    # ---------------------------------------------------------- forks
    #
    # A fork is created as a copy: the source's records below the fork offset
    # (plus a sub-offset prefix) become the fork's first records, at the same
    # offsets, in one atomic create.  Reads, appends, live modes and closing
    # then need nothing special.  The links are kept in ``extra``: the fork
    # names its source, the source lists its forks.  Deleting a source that
    # still has live forks only marks it soft-deleted (410 to readers, 409 to
    # a re-create); it is removed once its last fork is gone, and that
    # cascades up a chain of soft-deleted sources.  Forks that expire drop
    # out of the list when it is next checked.

    async def _fork(self, name: str, source: str, ct: str | None, ttl: float | None,
                    expires: float | None, extra: dict[str, Any], closed: bool, body: bytes,
                    fork_offset: int | None, sub: int, existing: SessionInfo | None,
                    publisher: str | None) -> tuple[SessionInfo, bool]:
        async with self._fork_lock:
            if existing is not None:
                e = existing.extra
                same = (e.get("forked_from") == source
                        and (fork_offset is None or e.get("fork_offset") == fork_offset)
                        and e.get("fork_sub_offset", 0) == sub
                        and (ct is None or media_type(ct) == media_type(existing.content_type))
                        and existing.closed == closed)
                if not same:
                    raise _Fail(409, "session_conflict",
                                "the stream exists with a different configuration")
                return existing, False
            try:
                src = await self.broker.info(source)
            except SessionNotFound:
                raise _Fail(404, "session_not_found", f"source stream {source!r} not found") \
                    from None
            if src.extra.get("soft_deleted"):
                raise _Fail(409, "session_conflict", "the source stream was deleted")
            if ct is not None and media_type(ct) != media_type(src.content_type):
                raise _Fail(409, "content_type_mismatch", "a fork keeps its source's type")
            at = src.next_offset if fork_offset is None else fork_offset
            if not src.start_offset <= at <= src.next_offset:
                raise _Fail(400, "bad_fork", "the fork offset is outside the source stream")
            records = await self._read_range(source, src.start_offset, at)
            if sub:
                if at >= src.next_offset:
                    raise _Fail(400, "bad_fork", "no data past the fork offset for a sub-offset")
                if _is_json(src.content_type):
                    if at + sub > src.next_offset:
                        raise _Fail(400, "bad_fork", "the sub-offset overshoots the message")
                    records += await self._read_range(source, at, at + sub)
                else:
                    (first,) = await self._read_range(source, at, at + 1)
                    if sub > len(first):
                        raise _Fail(400, "bad_fork", "the sub-offset overshoots the message")
                    records.append(first[:sub])
            copied = len(records)
            if body:
                records += (_json_records(body, True, self.max_batch_records)
                            if _is_json(src.content_type) else [body])
            if ttl is None and expires is None:
                ttl, expires = src.ttl_s, src.expires_at
                if _expires_header(src) is not None:
                    extra["expires_at_raw"] = _expires_header(src)
            extra.update(forked_from=source, fork_offset=at, fork_sub_offset=sub)
            info, created = await self.broker.create(
                name, content_type=src.content_type, ttl_s=ttl, expires_at=expires,
                extra=extra, closed=closed, initial=records, publisher=publisher,
                copied=copied)
            forks = [f for f in src.extra.get("forks", []) if f != name] + [name]
            await self.broker.set_extra(source, {"forks": forks})
            return info, created

    async def _read_range(self, name: str, start: int, stop: int) -> list[bytes]:
        out: list[bytes] = []
        while start < stop:
            batch = await self.broker.read(name, start, max_records=stop - start)
            out += batch.payloads()[: stop - start]
            start = batch.next_offset
        return out

    async def _live_forks(self, info: SessionInfo) -> list[str]:
        live = []
        for fork in info.extra.get("forks", []):
            try:
                f = await self.broker.info(fork)
            except SessionNotFound:
                continue
            if f.extra.get("forked_from") == info.name:
                live.append(fork)
        return live

    async def _check_gone(self, info: SessionInfo) -> None:
        """410 for a soft-deleted stream; 404 once its forks are all gone."""
        if not info.extra.get("soft_deleted"):
            return
        if not await self._live_forks(info):
            await self._remove(info)
            raise SessionNotFound(info.name)
        raise _Fail(410, "session_gone", "the stream was deleted (forks of it remain)")

    async def _delete(self, name: str) -> None:
        async with self._fork_lock:
            info = await self.broker.info(name)
            await self._check_gone(info)
            if await self._live_forks(info):
                await self.broker.set_extra(name, {"soft_deleted": True})
            else:
                await self._remove(info)

    async def _remove(self, info: SessionInfo) -> None:
        """Delete for real, then let a soft-deleted source go if this was its last fork."""
        try:
            await self.broker.delete(info.name)
        except SessionNotFound:
            pass
        source = info.extra.get("forked_from")
        if not isinstance(source, str):
            return
        try:
            src = await self.broker.info(source)
        except SessionNotFound:
            return
        forks = [f for f in src.extra.get("forks", []) if f != info.name]
        await self.broker.set_extra(source, {"forks": forks})
        if src.extra.get("soft_deleted") and not await self._live_forks(
                await self.broker.info(source)):
            await self._remove(src)

    # ----------------------------------------------------------- HEAD

    async def _head(self, name: str, out: Responder) -> None:
        info = await self.broker.info(name)
        await self._check_gone(info)
        nxt = format_offset(info.next_offset)
        headers: Headers = [("content-type", info.content_type), ("Stream-Next-Offset", nxt),
                            ("cache-control", "no-store"),
                            ("etag", _etag(name, "-1", nxt, info.closed)), _epoch(info.epoch)]
        if info.closed:
            headers.append(("Stream-Closed", "true"))
        if info.ttl_s is not None:
            headers.append(("Stream-TTL", str(int(info.ttl_s))))
        exp = _expires_header(info)
        if exp is not None:
            headers.append(("Stream-Expires-At", exp))
        await out.send(response(200, b"", headers=headers))

    # ----------------------------------------------------------- POST

    async def _post(self, name: str, req: Request, who: Principal, out: Responder) -> None:
        producer = _producer_headers(req)
        seq = req.header(b"stream-seq")
        close = (req.header(b"stream-closed") or "").lower() == "true"
        body = bytes(req.body)
        kind = _kind_header(req)
        metas = _meta_header(req)
        publisher = self._publisher(req, who)
        headed = kind != MESSAGE or metas is not None      # needs the session's publish path
        if headed and body and (seq is not None or (producer and close)):
            # The session core stamps a kind or meta only on plain and producer appends.
            raise _Fail(400, "bad_kind", "Broker-Kind other than message, or Broker-Meta, "
                        "cannot be combined with Stream-Seq, nor with Stream-Closed on a "
                        "producer's append")
        info = await self.broker.info(name, touch=True)
        await self._check_gone(info)
        if not body and close and producer is not None:
            result = await self.broker.produce(name, [], producer=producer[0],
                                               epoch=producer[1], seq=producer[2], close=True,
                                               publisher=publisher)
            await self._produced(name, info, result, producer, out)
            return
        if not body:
            if not close:
                raise _Fail(400, "empty_body", "an append needs a body")
            info = await self.broker.close_session(name)
            await out.send(response(204, b"", headers=[
                ("Stream-Next-Offset", format_offset(info.next_offset)),
                ("Stream-Closed", "true"), _epoch(info.epoch)]))
            return
        records = self._records(req, body, info)
        if metas is not None and len(metas) != len(records):
            raise _Fail(400, "bad_meta", f"Broker-Meta has {len(metas)} values for "
                        f"{len(records)} records")
        if producer is not None and headed:
            produced = await self.broker.publish(name, records, kind=kind, publisher=publisher,
                                                 metas=metas, producer=producer)
            assert isinstance(produced, ProduceResult)
            await self._produced(name, info, produced, producer, out)
            return
        if producer is not None:
            result = await self.broker.produce(name, records, producer=producer[0],
                                               epoch=producer[1], seq=producer[2], close=close,
                                               publisher=publisher)
            await self._produced(name, info, result, producer, out)
            return
        try:
            if headed:
                published = await self.broker.publish(name, records, kind=kind,
                                                      publisher=publisher, metas=metas)
                assert isinstance(published, range)
                offsets = published
            else:
                offsets = await self.broker.append_many(name, records, seq=seq,
                                                        publisher=publisher)
        except SessionClosed:
            raise await self._closed(name) from None
        headers: Headers = [("Stream-Next-Offset", format_offset(offsets.stop)),
                            _epoch(info.epoch)]
        if close:
            await self.broker.close_session(name)
            headers.append(("Stream-Closed", "true"))
        await out.send(response(204, b"", headers=headers))

    def _records(self, req: Request, body: bytes, info: SessionInfo) -> list[bytes]:
        """The records a POST body holds: one, the items of a JSON array for a
        JSON stream, or the items of a RECORDS_TYPE body (a broker extension:
        several binary records in one atomic append)."""
        ct = req.header(b"content-type")
        if not ct:
            raise _Fail(400, "content_type_required", "an append needs a Content-Type")
        if media_type(ct) == RECORDS_TYPE and media_type(info.content_type) != RECORDS_TYPE:
            if _is_json(info.content_type):
                raise _Fail(409, "content_type_mismatch", "a JSON stream takes its records "
                            "as a JSON body (an array for several)")
            return _msgpack_records(body, self.max_batch_records)
        if media_type(ct) != media_type(info.content_type):
            raise _Fail(409, "content_type_mismatch",
                        f"the stream holds {info.content_type}, not {ct}")
        return _json_records(body, False, self.max_batch_records) if _is_json(ct) else [body]

    async def _produced(self, name: str, info: SessionInfo, r: ProduceResult,
                        producer: tuple[str, int, int], out: Responder) -> None:
        """The HTTP answer to an idempotent producer's append.  ``info`` is
        the session as the request found it.

        A duplicate is a 204 as the protocol says; while the broker knows
        where the original landed, it also says where, as an accepted append
        would: Stream-Next-Offset after its records, and Broker-First-Offset
        at the first one, so a client that lost the first answer still learns
        its offsets."""
        _, epoch, seq = producer
        if r.status == "accepted":
            assert r.offsets is not None
            headers: Headers = [("Stream-Next-Offset", format_offset(r.offsets.stop)),
                                ("Producer-Epoch", str(epoch)), ("Producer-Seq", str(seq)),
                                _epoch(info.epoch)]
            if r.offsets:
                headers.append(("Broker-First-Offset", format_offset(r.offsets.start)))
            if r.closed:
                headers.append(("Stream-Closed", "true"))
            # A close with no data is a 204, like a plain close.
            status = 204 if not r.offsets and r.closed else 200
            await out.send(response(status, b"", headers=headers))
        elif r.status == "duplicate":
            headers = [("Producer-Epoch", str(epoch)), ("Producer-Seq", str(r.last_seq)),
                       _epoch(info.epoch)]
            if r.offsets:
                headers += [("Stream-Next-Offset", format_offset(r.offsets.stop)),
                            ("Broker-First-Offset", format_offset(r.offsets.start))]
            if r.closed:
                headers.append(("Stream-Closed", "true"))
                if not r.offsets:
                    now = await self.broker.info(name)
                    headers.append(("Stream-Next-Offset", format_offset(now.next_offset)))
            await out.send(response(204, b"", headers=headers))
        elif r.status == "stale_epoch":
            raise _Fail(403, "stale_producer_epoch", "a newer epoch of this producer exists",
                        [("Producer-Epoch", str(r.epoch))])
        elif r.status == "invalid_epoch_seq":
            raise _Fail(400, "invalid_epoch_seq", "a new producer epoch must start at seq 0")
        elif r.status == "sequence_gap":
            raise _Fail(409, "producer_sequence_gap", "producer sequence gap", [
                ("Producer-Expected-Seq", str(r.expected_seq)),
                ("Producer-Received-Seq", str(r.received_seq))])
        else:
            raise await self._closed(name)

    async def _closed(self, name: str) -> _Fail:
        """The 409 for an append to a closed stream, with where it ends."""
        info = await self.broker.info(name)
        return _Fail(409, "session_closed", "the stream is closed", [
            ("Stream-Closed", "true"), ("Stream-Next-Offset", format_offset(info.next_offset))])

    # ------------------------------------------------------------ GET

    async def _get(self, name: str, req: Request, params: dict[str, list[str]],
                   who: Principal, out: Responder) -> None:
        if params.get("view") == ["conversation"]:
            await self._conversation(name, params, out)
            return
        if params.get("view") == ["presence"]:
            await self._presence_view(name, params, out)
            return
        offsets = params.get("offset")
        if offsets is not None and len(offsets) > 1:
            raise _Fail(400, "bad_offset", "more than one offset parameter")
        raw = offsets[0] if offsets else None
        if raw == "":
            raise _Fail(400, "bad_offset", "empty offset parameter")
        live = params.get("live", [None])[0]
        if live not in (None, "long-poll", "sse"):
            raise _Fail(400, "bad_live", f"unknown live mode {live!r}")
        if live is not None and raw is None:
            raise _Fail(400, "bad_offset", f"live={live} needs an offset")
        offset = parse_offset(raw) if raw is not None else START
        cursor = params.get("cursor", [None])[0]
        view = _view(params)
        appear = self._appearance(req, who) if live is not None else None
        info = await self.broker.info(name, touch=True)
        await self._check_gone(info)
        # A live read ends by the token's expiry at the latest: the client
        # then comes back with a fresh token and its offset.
        expiry = who.seconds_left(self.auth.clock())
        if live == "sse":
            await self._sse(name, info, offset, cursor, expiry, view, out, appear)
            return
        if live == "long-poll":
            self._polled(name, appear)     # present from this poll to its linger, waiting or not
        ct = "application/json" if view.records else info.content_type
        if offset == NOW and live is None:
            headers: Headers = [("content-type", ct),
                                ("Stream-Next-Offset", format_offset(info.next_offset)),
                                ("Stream-Up-To-Date", "true"), ("cache-control", "no-store"),
                                _epoch(info.epoch)]
            if info.closed:
                headers.append(("Stream-Closed", "true"))
            await out.send(response(200, b"[]" if _is_json(ct) else b"",
                                    content_type=ct, headers=headers))
            return
        # Bound to the epoch the request found: should the session be
        # re-created meanwhile, the read fails (409 epoch_changed) rather than
        # answer records of another incarnation under this one's Broker-Epoch.
        async with self.broker.subscribe(name, offset, epoch=info.epoch) as sub:
            batch = await sub.next(wait=False)
            # With view=records, ``shown`` is what the answer holds.
            shown = _record_objects(batch, info.content_type, view.mask) \
                if view.records else None
            if live == "long-poll" and not sub.finished and not _some(batch, shown):
                with self._live_wait(trio.current_time()
                                     + min(self.long_poll_timeout_s, expiry)), \
                        self._polling(name, appear):
                    # With a kinds filter, records of other kinds only move
                    # the cursor on: the poll waits on for one it shows.
                    while True:
                        batch = await sub.next()
                        if shown is None:
                            break
                        shown = _record_objects(batch, info.content_type, view.mask)
                        if shown or not batch:
                            break
            info = await self.broker.info(name)
            nxt = format_offset(sub.offset)
            at_tail = sub.offset >= info.next_offset
            closed_here = info.closed and at_tail
            headers = [("Stream-Next-Offset", nxt), _epoch(sub.epoch)]
            if at_tail:
                headers.append(("Stream-Up-To-Date", "true"))
            if live == "long-poll" and not closed_here:
                headers.append(("Stream-Cursor", _cursor(cursor)))
            if closed_here:
                headers.append(("Stream-Closed", "true"))
            if live == "long-poll" and not _some(batch, shown):
                await out.send(response(204, b"", headers=headers))
                return
            etag = _etag(name, raw if raw is not None else "-1", nxt, closed_here)
            if view.records:
                # Another view of the same offsets is another representation.
                etag = etag[:-1] + f':r{view.mask:x}"'
            headers.append(("etag", etag))
            if req.header(b"if-none-match") == etag:
                await out.send(response(304, b"", headers=[("etag", etag), _epoch(sub.epoch)]))
                return
            if shown is not None:
                body = _records_body(shown)
            else:
                body = _json_body(batch) if _is_json(ct) else batch.join()
            await out.send(response(200, body, content_type=ct, headers=headers))

    async def _conversation(self, name: str, params: dict[str, list[str]],
                            out: Responder) -> None:
        """``view=conversation``: the AI conversation so far as JSON (the
        snapshot's text form, docs/ai.md "Views"), exact at its
        Stream-Next-Offset, from which the client reads on."""
        extra = sorted(set(params) & {"offset", "live", "kinds", "cursor"})
        if extra:
            raise _Fail(400, "bad_view", f"view=conversation takes no {extra[0]}: it is the "
                        "view at the end, and reading goes on from its Stream-Next-Offset")
        info = await self.broker.info(name, touch=True)
        await self._check_gone(info)
        view = await self.broker.view(name, text=True)
        info = await self.broker.info(name)
        headers: Headers = [("Stream-Next-Offset", format_offset(view.next)), _epoch(view.epoch),
                            ("cache-control", "no-store")]
        if info.epoch == view.epoch and view.next >= info.next_offset:
            headers.append(("Stream-Up-To-Date", "true"))
            if info.closed:
                headers.append(("Stream-Closed", "true"))
        try:
            body = json.dumps(view.snapshot, separators=(",", ":"), ensure_ascii=False).encode()
        except UnicodeEncodeError:      # a lone surrogate in meta: escape it
            body = json.dumps(view.snapshot, separators=(",", ":")).encode()
        await out.send(response(200, body, content_type="application/json", headers=headers))

    # ------------------------------------------------------------ presence
    #
    # An SSE response is a member for as long as it is open.  A long-poll
    # reader is only ever a run of requests: keyed by its client id (the
    # token's sub, or Broker-Client), every poll keeps it present (while
    # the poll waits, and for ``presence_linger_s`` after it), so a reader
    # that polls again at once stays one member; one that names no client
    # cannot be told from the next, and is not shown.

    def _appearance(self, req: Request, who: Principal) -> _Appearance | None:
        """How a live read shows in presence; None for ``Broker-Presence:
        hidden``.  A bad header is a 400 before anything is read."""
        raw = req.header(b"broker-presence")
        info = None
        if raw is not None:
            text = raw.strip()
            if text.lower() == "hidden":
                return None
            if len(text) > _MAX_PRESENCE_HEADER:
                raise _Fail(400, "bad_presence", f"Broker-Presence is longer than "
                            f"{_MAX_PRESENCE_HEADER} characters")
            try:
                info = json.loads(text, parse_constant=reject_json_constant)
            except (ValueError, RecursionError):
                info = None
            problem = info_problem(info)
            if problem is not None:
                raise _Fail(400, "bad_presence", "Broker-Presence must be hidden or a JSON "
                            f"object of the presence info rules: it {problem}")
        return _Appearance(self._publisher(req, who), info)

    def _member(self, prefix: str, transport: str, appear: _Appearance) -> Member:
        presence = self.broker.presence
        member_id = presence.new_id(prefix)
        return Member(member_id, appear.client or f"anon-{member_id}", transport,
                      time.time_ns() // 1000, appear.info)

    def _join_sse(self, name: str, appear: _Appearance | None) -> str | None:
        """An SSE response joins; its member id (None if it is not shown)."""
        if appear is None:
            return None
        member = self._member("sse", "sse", appear)
        self.broker.presence.join(name, member)
        return member.id

    @contextlib.contextmanager
    def _polling(self, name: str, appear: _Appearance | None) -> Iterator[None]:
        """A long-poll holds its reader present while it waits."""
        if appear is None or appear.client is None:
            yield
            return
        presence = self.broker.presence
        presence.hold(name, self._member("lp", "longpoll", appear))
        try:
            yield
        finally:
            presence.release(name, appear.client,
                             trio.current_time() + self.presence_linger_s)

    def _polled(self, name: str, appear: _Appearance | None) -> None:
        with self._polling(name, appear):
            pass

    async def _presence_view(self, name: str, params: dict[str, list[str]],
                             out: Responder) -> None:
        """``view=presence``: the session's members now, as JSON."""
        extra = sorted(set(params) - {"view", "token"})
        if extra:
            raise _Fail(400, "bad_view", f"view=presence takes no {extra[0][:40]!r}: it is "
                        "who is attached now, with no offset and no live mode")
        info = await self.broker.info(name)
        await self._check_gone(info)
        members = [m.as_map() for m in self.broker.presence.members(name)]
        await out.send(response(200, json.dumps({"members": members}).encode(),
                                headers=[("cache-control", "no-store"), _epoch(info.epoch)]))

    # ------------------------------------------------------------ SSE

    async def _sse(self, name: str, info: SessionInfo, offset: int, cursor: str | None,
                   expiry: float, view: _View, out: Responder,
                   appear: _Appearance | None = None) -> None:
        ct = info.content_type
        binary = not _is_text(ct) and not view.records
        headers: Headers = [("content-type", "text/event-stream"),
                            ("cache-control", "no-cache"), _epoch(info.epoch)]
        if binary:
            headers.append(("stream-sse-data-encoding", "base64"))
        async with self.broker.subscribe(name, offset, epoch=info.epoch) as sub:
            await out.start(200, headers)
            member = self._join_sse(name, appear)
            try:
                await self._sse_events(name, sub, ct, binary, cursor,
                                       min(self.sse_max_s, expiry), view, out)
            except (SessionDeleted, EpochChanged, SessionNotFound):
                pass                 # the stream went away: end the response
            finally:
                if member is not None:
                    self.broker.presence.leave(name, member)
            await out.end()

    async def _sse_events(self, name: str, sub: Subscription, ct: str, binary: bool,
                          cursor: str | None, lifetime: float, view: _View,
                          out: Responder) -> None:
        # Only the waits are cancelled (by the deadline or by shutdown), never a
        # write, so the chunked response always ends cleanly.
        deadline = trio.current_time() + lifetime
        while not self._closing:
            batch = await sub.next(wait=False)
            out_bytes = b""
            if batch and view.records:
                shown = _record_objects(batch, ct, view.mask)
                if shown:
                    out_bytes = _sse_event("data", _records_body(shown).decode())
            elif batch:
                if _is_json(ct):
                    data = _json_body(batch).decode()
                elif binary:
                    data = base64.b64encode(batch.join()).decode()
                else:
                    data = batch.join().decode("utf-8", "replace")
                out_bytes = _sse_event("data", data)
            info = await self.broker.info(name)
            at_tail = sub.offset >= info.next_offset
            control: dict[str, Any] = {"streamNextOffset": format_offset(sub.offset)}
            if info.closed and at_tail:
                control["streamClosed"] = True
                await out.chunk(out_bytes + _sse_event("control", json.dumps(control)))
                return
            control["streamCursor"] = _cursor(cursor)
            if at_tail:
                control["upToDate"] = True
            # A data event and its control event go out in one write, so a
            # reader never sees one without the other.
            await out.chunk(out_bytes + _sse_event("control", json.dumps(control)))
            now = trio.current_time()
            if now >= deadline:
                return
            if at_tail:
                with self._live_wait(min(deadline, now + self.long_poll_timeout_s)):
                    await sub.wait()


# ------------------------------------------------------------------- auth

# What each method does to the stream it names.  A PUT with a body also
# appends, and a fork also reads its source: see _operations.
_OPERATIONS = {"GET": READ, "HEAD": READ, "POST": APPEND, "PUT": CREATE, "DELETE": DELETE}


def _operations(name: str, req: Request) -> list[tuple[str, str]]:
    """Every (session, operation) the request needs the token to allow."""
    ops = [(name, _OPERATIONS[req.method])]
    if req.method == "POST" and req.body and _kind_header(req) == SIGNAL:
        # A signal needs ``signal`` whichever way it comes (as on the
        # WebSocket); ``append`` only if the request also closes the stream.
        ops = [(name, SIGNAL_OP)]
        if (req.header(b"stream-closed") or "").lower() == "true":
            ops.append((name, APPEND))
    if req.method == "PUT":
        if req.body:
            ops.append((name, APPEND))
        source = req.header(b"stream-forked-from")
        if source is not None:
            ops.append((_stream_name(source), READ))
    return ops


def _token(req: Request, params: dict[str, list[str]]) -> str | None:
    """The bearer token: ``Authorization: Bearer``, or else ``?token=`` (an
    EventSource cannot set headers).  Another scheme (Basic, for a proxy in
    front) is not ours, and is passed over."""
    header = req.header(b"authorization")
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            return token.strip()
    tokens = params.get("token")
    if tokens is not None and len(tokens) > 1:
        raise AuthError("token_invalid", "more than one token parameter")
    return tokens[0] if tokens else None


_UINT_RE = re.compile(r"\d{1,16}")


def _producer_headers(req: Request) -> tuple[str, int, int] | None:
    """(Producer-Id, Producer-Epoch, Producer-Seq): all three or none."""
    pid, epoch, seq = (req.header(b"producer-id"), req.header(b"producer-epoch"),
                       req.header(b"producer-seq"))
    if pid is None and epoch is None and seq is None:
        return None
    if pid is None or epoch is None or seq is None:
        raise _Fail(400, "bad_producer", "Producer-Id, Producer-Epoch and Producer-Seq "
                    "go together")
    if not pid:
        raise _Fail(400, "bad_producer", "Producer-Id must not be empty")
    for label, value in (("Producer-Epoch", epoch), ("Producer-Seq", seq)):
        if not _UINT_RE.fullmatch(value) or int(value) > 2**53 - 1:
            raise _Fail(400, "bad_producer", f"{label} must be a non-negative integer")
    return pid, int(epoch), int(seq)


async def _answer(out: Responder, data: bytes) -> None:
    """Send an error answer, unless a streamed response already began: then
    the connection is dropped, since nothing valid can follow."""
    if out.sent:
        raise trio.ClosedResourceError("error after the response began")
    await out.send(data)


def _sse_event(kind: str, data: str) -> bytes:
    # Every line of the payload gets its own data: field (CR, LF and CRLF all
    # end lines in SSE), so a payload can never inject an event of its own.
    # A client strips one space after "data:", so a line that starts with a
    # space gets one extra, and every other line none (the form the
    # conformance suite checks byte for byte).
    lines = re.split(r"\r\n|\r|\n", data)
    return (f"event: {kind}\n"
            + "".join(f"data: {line}\n" if line.startswith(" ") else f"data:{line}\n"
                      for line in lines) + "\n").encode()

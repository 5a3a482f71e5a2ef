// broker.js: the browser client of the broker (an ES module, no dependencies).
//
// Theory of operation
// -------------------
// A client follows ONE session.  It holds a cursor, `next` (the offset after
// the last record it delivered) and the session's `epoch`, and hands every
// record to `on("record")` exactly once, in offset order, whatever happens to
// the connection.  Every transport resumes from `next`, and a record whose
// offset is below `next` is dropped before delivery, so a transport that
// repeats itself (an EventSource retry, a resent batch) cannot repeat a record.
//
// Transports are tried in the order given (default ws, sse, longpoll):
//   ws       /v1/ws, subprotocol broker.v1, one msgpack map per binary message
//            (hello, attach from `next` with the epoch, publish, pong);
//   sse      EventSource on /v1/stream/<s>?offset=..&live=sse&view=records;
//   longpoll fetch loop on /v1/stream/<s>?offset=..&live=long-poll&view=records.
// A transport "opens" when it proves it works (ws: `welcome`; sse: the
// EventSource `open` event; longpoll: any 200/204).  One that fails to open
// twice in a row while plain HTTP to the broker answers (a HEAD of the session)
// is given up for the next one, for the life of this client: the usual cause is
// a proxy that refuses upgrades or buffers streams, and that does not heal.
// If HTTP does not answer either, the broker is down, and the client stays
// with its transport and retries.  A reload starts again from the first.
//
// Reconnects wait with exponential backoff and full jitter: attempt n waits a
// uniformly random time in [0, min(maximum, initial * 2^n)).  The attempt count
// starts again once a connection has stayed up for `resetAfter` seconds.
//
// Publishing is one idempotent producer per client object: a random id, and
// (epoch, seq) per session, as docs/protocol.md says.  Publishes are sent one
// at a time, in call order: on the WebSocket as `publish` frames (signals are
// publishes of kind 1), otherwise as POSTs with Producer-Id/-Epoch/-Seq (and
// `Broker-Kind: signal`).  A publish whose answer was lost is sent again with
// the same stamp, so it is stored once, and resolves to its offset all the
// same (the broker answers a duplicate with where it landed).  With auth off
// the broker keys producers by client id: the POSTs name the client the
// WebSocket's welcome gave (`Broker-Client`), so a publish in flight when the
// client falls back from the WebSocket to HTTP is a duplicate there too.
//
// Epochs: the WebSocket's `attached` and `epoch_changed` carry the session's
// epoch; over HTTP, every read answer carries it in `Broker-Epoch` (an SSE
// attempt asks a HEAD first, since EventSource shows no headers).  An epoch
// other than the cursor's means the session was re-created: `reset`, and
// reading starts again from -1.
//
// The cursor {epoch, offset} is saved in sessionStorage under `storageKey`
// (default "broker:<session>") after each delivered batch.  `connect()` starts
// from the saved cursor unless `offset` is given, so a reloaded page that
// keeps its own view (or needs only new records) goes on where it stopped;
// a page that rebuilds its view from the log passes offset: -1.
//
// Conversations (option `conversation`): the client also folds the records
// into `client.conversation`, a port of broker/_convo.py's fold.  Every
// connect() starts from a view instead of a cursor: an attach with
// `view: true` (the `view` frame restores the fold and sets `next`), or over
// HTTP a GET of `?view=conversation` before the first read.  From there it
// is the same cursor as above: a cut resumes from `next`, and only a reset
// (the epoch changed) asks for a new view.  A reload thus costs one frame,
// not a replay of every delta.
//
// Presence (option `presence`): the WebSocket attach asks for it and keeps
// the `members`/`join`/`leave` frames in `client.members`; HTTP has no
// presence events, so SSE and long-poll attempts poll `?view=presence`.

const SUBPROTOCOL = "broker.v1";
const TRANSPORTS = ["ws", "sse", "longpoll"];
const AUTH_ERRORS = new Set(["unauthorized", "token_invalid", "token_expired", "client_mismatch"]);
const FATAL_CLOSES = new Set([1002, 1003, 1007, 1009, 1010, 4000]);
const RETRY_PUBLISH = new Set(["rate_limited", "unavailable", "storage_error"]);
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

// ----------------------------------------------------------------- msgpack

/** Encode a value as msgpack: null, booleans, numbers, strings, Uint8Array
 * (bin), arrays and plain objects (maps with string keys). */
export function encode(value) {
  const out = [];
  pack(value, out);
  return flatten(out);
}

function flatten(parts) {
  let size = 0;
  for (const p of parts) size += typeof p === "number" ? 1 : p.length;
  const buf = new Uint8Array(size);
  let i = 0;
  for (const p of parts) {
    if (typeof p === "number") buf[i++] = p;
    else { buf.set(p, i); i += p.length; }
  }
  return buf;
}

function be(n, bytes) {
  const b = new Uint8Array(bytes);
  const v = new DataView(b.buffer);
  if (bytes === 2) v.setUint16(0, n);
  else if (bytes === 4) v.setUint32(0, n);
  else v.setBigUint64(0, BigInt.asUintN(64, BigInt(n)));
  return b;
}

function header(out, len, small, fixBase, c8, c16, c32) {
  if (small && len < small) out.push(fixBase | len);
  else if (c8 !== null && len < 0x100) out.push(c8, len);
  else if (len < 0x10000) out.push(c16, be(len, 2));
  else out.push(c32, be(len, 4));
}

function pack(v, out) {
  if (v === null || v === undefined) out.push(0xc0);
  else if (v === false) out.push(0xc2);
  else if (v === true) out.push(0xc3);
  else if (typeof v === "number") packNumber(v, out);
  else if (typeof v === "bigint") { out.push(v < 0n ? 0xd3 : 0xcf, be(v, 8)); }
  else if (typeof v === "string") {
    const b = utf8.encode(v);
    header(out, b.length, 32, 0xa0, 0xd9, 0xda, 0xdb);
    out.push(b);
  } else if (v instanceof Uint8Array || v instanceof ArrayBuffer) {
    const b = v instanceof Uint8Array ? v : new Uint8Array(v);
    header(out, b.length, 0, 0, 0xc4, 0xc5, 0xc6);
    out.push(b);
  } else if (Array.isArray(v)) {
    header(out, v.length, 16, 0x90, null, 0xdc, 0xdd);
    for (const x of v) pack(x, out);
  } else if (typeof v === "object") {
    const keys = Object.keys(v).filter((k) => v[k] !== undefined);
    header(out, keys.length, 16, 0x80, null, 0xde, 0xdf);
    for (const k of keys) { pack(k, out); pack(v[k], out); }
  } else throw new TypeError(`cannot encode ${typeof v} as msgpack`);
}

function packNumber(n, out) {
  if (!Number.isInteger(n)) {
    const b = new Uint8Array(9);
    b[0] = 0xcb;
    new DataView(b.buffer).setFloat64(1, n);
    out.push(b);
  } else if (n >= 0) {
    if (n < 0x80) out.push(n);
    else if (n < 0x100) out.push(0xcc, n);
    else if (n < 0x10000) out.push(0xcd, be(n, 2));
    else if (n < 0x100000000) out.push(0xce, be(n, 4));
    else out.push(0xcf, be(n, 8));
  } else if (n >= -32) out.push(n & 0xff);
  else if (n >= -0x80) out.push(0xd0, n & 0xff);
  else if (n >= -0x8000) out.push(0xd1, be(n & 0xffff, 2));
  else if (n >= -0x80000000) out.push(0xd2, be(n >>> 0, 4));
  else out.push(0xd3, be(n, 8));
}

/** Decode one msgpack value (maps become plain objects, bin a Uint8Array,
 * 64-bit integers Numbers; ext values become {ext: type, data}). */
export function decode(bytes) {
  const buf = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let i = 0;
  const need = (n) => { if (i + n > buf.length) throw new RangeError("truncated msgpack"); };
  const u8 = () => { need(1); return buf[i++]; };
  const u16 = () => { need(2); const x = view.getUint16(i); i += 2; return x; };
  const u32 = () => { need(4); const x = view.getUint32(i); i += 4; return x; };
  const bytesOf = (n) => { need(n); const b = buf.subarray(i, i + n); i += n; return b; };
  const str = (n) => fromUtf8.decode(bytesOf(n));
  const arr = (n) => { const a = new Array(n); for (let k = 0; k < n; k++) a[k] = value(); return a; };
  const map = (n) => {
    const o = {};
    for (let k = 0; k < n; k++) { const key = value(); o[String(key)] = value(); }
    return o;
  };
  const ext = (n) => { const type = view.getInt8((need(1), i++)); return { ext: type, data: bytesOf(n) }; };
  function value() {
    const c = u8();
    if (c < 0x80) return c;
    if (c < 0x90) return map(c & 0x0f);
    if (c < 0xa0) return arr(c & 0x0f);
    if (c < 0xc0) return str(c & 0x1f);
    if (c >= 0xe0) return c - 0x100;
    switch (c) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return bytesOf(u8());
      case 0xc5: return bytesOf(u16());
      case 0xc6: return bytesOf(u32());
      case 0xc7: return ext(u8());
      case 0xc8: return ext(u16());
      case 0xc9: return ext(u32());
      case 0xca: { need(4); const x = view.getFloat32(i); i += 4; return x; }
      case 0xcb: { need(8); const x = view.getFloat64(i); i += 8; return x; }
      case 0xcc: return u8();
      case 0xcd: return u16();
      case 0xce: return u32();
      case 0xcf: { need(8); const x = view.getBigUint64(i); i += 8; return Number(x); }
      case 0xd0: { need(1); return view.getInt8(i++); }
      case 0xd1: { need(2); const x = view.getInt16(i); i += 2; return x; }
      case 0xd2: { need(4); const x = view.getInt32(i); i += 4; return x; }
      case 0xd3: { need(8); const x = view.getBigInt64(i); i += 8; return Number(x); }
      case 0xd4: return ext(1);
      case 0xd5: return ext(2);
      case 0xd6: return ext(4);
      case 0xd7: return ext(8);
      case 0xd8: return ext(16);
      case 0xd9: return str(u8());
      case 0xda: return str(u16());
      case 0xdb: return str(u32());
      case 0xdc: return arr(u16());
      case 0xdd: return arr(u32());
      case 0xde: return map(u16());
      case 0xdf: return map(u32());
      default: throw new RangeError(`bad msgpack byte 0x${c.toString(16)}`);
    }
  }
  const result = value();
  if (i !== buf.length) throw new RangeError("trailing bytes after msgpack value");
  return result;
}

// ----------------------------------------------------------------- helpers

/** An offset as HTTP writes it ("0000000000000000_0000000000000042"); -1 stays -1. */
export function formatOffset(n) {
  return n < 0 ? "-1" : `0000000000000000_${String(n).padStart(16, "0")}`;
}

/** The record number in an HTTP offset (or an integer, or "-1"). */
export function parseOffset(text) {
  if (typeof text === "number") return text;
  const s = String(text);
  const m = /^(?:\d{16}_)?(-1|\d+)$/.exec(s);
  if (!m) throw new Error(`bad offset ${s}`);
  return Number(m[1]);
}

/** Full-jitter exponential backoff, as the Python client's Backoff. */
export class Backoff {
  constructor({ initial = 0.1, maximum = 10, multiplier = 2, resetAfter = 1 } = {}) {
    Object.assign(this, { initial, maximum, multiplier, resetAfter });
  }
  cap(n) { return Math.min(this.maximum, this.initial * this.multiplier ** n); }
  delay(n) { return Math.random() * this.cap(n); }
}

/** A refusal from the broker, or from this client: a stable `code` and a message. */
export class BrokerError extends Error {
  constructor(code, message, extra = {}) {
    super(message);
    this.name = "BrokerError";
    this.code = code;
    Object.assign(this, extra);
  }
}

const sleep = (s) => new Promise((r) => setTimeout(r, s * 1000));

function randomId() {
  const b = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

function b64bytes(text) {
  const bin = atob(text);
  const b = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) b[i] = bin.charCodeAt(i);
  return b;
}

async function errorOf(res) {
  try {
    const body = await res.json();
    if (body && body.error) return new BrokerError(body.error.code, body.error.message, { status: res.status });
  } catch { /* not our JSON */ }
  return new BrokerError(`http_${res.status}`, `HTTP ${res.status}`, { status: res.status });
}

// A transport attempt ends by throwing one of these: Lost (retry),
// Fatal (stop the client), Reset (the epoch changed: read again from -1).
class Lost extends Error {}
class Fatal extends Error {
  constructor(error) { super(error.message); this.error = error; }
}

// ----------------------------------------------------------------- the conversation fold
//
// A port of broker/_convo.py's Conversation (docs/ai.md, "The fold"): the
// same rules in the same order, so a page folds exactly what the server's
// view holds, and a view restored with fromSnapshot then fed the records
// after it ends where a fold of the whole log ends.  Records come as this
// client delivers them: `data` is the JSON value in a JSON session, a string
// in a text/* one, a Uint8Array otherwise.  Text is kept as strings (a
// binary session's payloads are decoded one record at a time, so a UTF-8
// character split across records shows as U+FFFD here, where the Python fold
// joins the bytes), and tool arguments and results as JSON text, never
// parsed by the fold (`JSON.parse(call.args)` to read them).

const KIND_NAMES = { 1: "signal", 2: "start", 3: "delta", 4: "end", 5: "tool_call", 6: "tool_result", 7: "state" };
const OUTCOMES = new Set(["complete", "cancelled", "error"]);
const MAX_ID = 256;

class Skip extends Error {
  constructor(code) { super(code); this.code = code; }
}

// Meta fields, as _convo.py reads them.  A JS string's length counts UTF-16
// units and Python's code points: ids outside the BMP near 256 characters
// are the one place they could disagree, so count code points.
const cpLength = (s) => { let n = 0; for (const _ of s) n++; return n; };
const present = (meta, key) => meta[key] !== undefined && meta[key] !== null;
function metaId(meta, key) {
  const v = meta[key];
  if (typeof v !== "string" || v.length === 0 || (v.length > MAX_ID && cpLength(v) > MAX_ID)) throw new Skip("bad_meta");
  return v;
}
const optId = (meta, key) => (present(meta, key) ? metaId(meta, key) : null);
function optStr(meta, key) {
  if (!present(meta, key)) return null;
  if (typeof meta[key] !== "string") throw new Skip("bad_meta");
  return meta[key];
}
function optBool(meta, key) {
  if (!present(meta, key)) return null;
  if (typeof meta[key] !== "boolean") throw new Skip("bad_meta");
  return meta[key];
}
function optOutcome(meta) {
  if (!present(meta, "outcome")) return null;
  const v = meta.outcome;
  if (typeof v !== "string" || !OUTCOMES.has(v)) throw new Skip("bad_meta");
  return v;
}

function snapText(value, text) {
  // A byte field of a snapshot: bin (msgpack), or a string / [base64] (text form).
  if (text) {
    if (typeof value === "string") return value;
    if (Array.isArray(value) && value.length === 1 && typeof value[0] === "string") return fromUtf8.decode(b64bytes(value[0]));
  } else if (value instanceof Uint8Array) return fromUtf8.decode(value);
  throw new Error(`expected bytes, not ${typeof value}`);
}

const isPlainMap = (m) => m !== null && typeof m === "object" && !Array.isArray(m) && !(m instanceof Uint8Array);

/**
 * The fold of a session's AI records.  `apply(offset, kind, publisher, meta,
 * data)` (or `applyRecord(record)`) folds one record and returns null or the
 * code it was counted under; read `items`, `messages`, `toolCalls`,
 * `signals`, `states`, `state`, `pendingApprovals`, `anomalies`, `next`.
 * Items are plain objects with the fields of docs/ai.md's view; `text`,
 * `args`, `result` and a signal's `text` are strings.
 */
export class Conversation {
  constructor({ json = false, start = 0 } = {}) {
    this.json = json;
    this.start = start;
    this.next = start;
    this._items = new Map();        // id -> item, in opening order
    this._open = new Set();         // ids of open items, for a run's cancel
    this.signals = [];
    this._signalIds = new Set();
    this._states = new Map();       // publisher -> latest state
    this._anomalies = new Map();
  }

  get items() { return [...this._items.values()]; }
  get messages() { return this.items.filter((i) => i.type === "message"); }
  get toolCalls() { return this.items.filter((i) => i.type === "tool_call"); }
  get pendingApprovals() { return this.toolCalls.filter((c) => c.approval && c.approved === null && c.outcome === null); }
  get states() { return [...this._states.values()].sort((a, b) => a.offset - b.offset); }
  get state() { const s = this.states; return s.length ? s[s.length - 1] : null; }
  get anomalies() { return Object.fromEntries([...this._anomalies].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))); }
  item(id) { return this._items.get(id) ?? null; }

  applyRecord(r) { return this.apply(r.offset, r.kind, r.publisher ?? null, r.meta ?? null, r.data); }

  apply(offset, kind, publisher, meta, data) {
    if (offset < this.next) throw new RangeError(`record ${offset} is below ${this.next}: already folded`);
    this.next = offset + 1;
    if (kind === 0) return null;
    let code;
    try {
      if (kind > 7) throw new Skip("reserved_kind");
      if (!isPlainMap(meta)) throw new Skip("bad_meta");
      code = this[`_${KIND_NAMES[kind]}`](offset, publisher, meta, data);
    } catch (e) {
      if (!(e instanceof Skip)) throw e;
      code = e.code;
    }
    if (code) this._anomalies.set(code, (this._anomalies.get(code) || 0) + 1);
    return code;
  }

  /** No AI record lies below `next` beyond those applied. */
  advance(next) { if (next > this.next) this.next = next; }

  _text(data) {
    if (this.json) {
      if (typeof data !== "string") throw new Skip("bad_payload");
      return data;
    }
    if (typeof data === "string") return data;
    return data instanceof Uint8Array ? fromUtf8.decode(data) : "";
  }

  _json(data) {
    if (this.json) return JSON.stringify(data === undefined ? null : data);
    if (typeof data === "string") return data;
    return data instanceof Uint8Array ? fromUtf8.decode(data) : "";
  }

  _start(offset, publisher, meta, data) {
    const id = metaId(meta, "id"), role = metaId(meta, "role");
    const replyTo = optId(meta, "reply_to"), outcome = optOutcome(meta), error = optStr(meta, "error");
    const text = this._text(data);
    if (this._items.has(id)) throw new Skip("duplicate_id");
    const msg = { type: "message", id, role, publisher, offset, text, outcome: null, error: null, end: null, replyTo, cancel: null };
    this._items.set(id, msg);
    if (outcome === null) this._open.add(id);
    else Object.assign(msg, { outcome, error, end: offset });
    return null;
  }

  _delta(offset, publisher, meta, data) {
    const id = metaId(meta, "id");
    const text = this._text(data);
    this._continued(publisher, id).text += text;
    return null;
  }

  _end(offset, publisher, meta, data) {
    const id = metaId(meta, "id");
    const outcome = optOutcome(meta) || "complete", error = optStr(meta, "error");
    const text = this._text(data);
    const msg = this._continued(publisher, id);
    msg.text += text;
    Object.assign(msg, { outcome, error, end: offset });
    this._open.delete(id);
    return null;
  }

  _continued(publisher, id) {
    const msg = this._items.get(id);
    if (!msg || msg.type !== "message") throw new Skip("unknown_id");
    if (publisher !== msg.publisher) throw new Skip("wrong_publisher");
    if (msg.outcome !== null) throw new Skip("after_end");
    return msg;
  }

  _tool_call(offset, publisher, meta, data) {
    const id = metaId(meta, "id"), name = metaId(meta, "name");
    const approval = optBool(meta, "approval") || false, message = optId(meta, "message");
    if (this._items.has(id)) throw new Skip("duplicate_id");
    this._items.set(id, {
      type: "tool_call", id, name, publisher, offset, args: this._json(data), message, approval,
      approved: null, decided: null, outcome: null, result: null, error: null, end: null, resultPublisher: null, cancel: null,
    });
    this._open.add(id);
    return null;
  }

  _tool_result(offset, publisher, meta, data) {
    const id = metaId(meta, "id");
    const outcome = optOutcome(meta) || "complete", error = optStr(meta, "error");
    const call = this._items.get(id);
    if (!call || call.type !== "tool_call") throw new Skip("unknown_id");
    if (call.outcome !== null) throw new Skip("after_end");
    Object.assign(call, { outcome, result: this._json(data), error, end: offset, resultPublisher: publisher });
    this._open.delete(id);
    return null;
  }

  _state(offset, publisher, meta, data) {
    const state = metaId(meta, "state"), ref = optId(meta, "ref"), detail = this._text(data);
    this._states.set(publisher, { offset, publisher, state, ref, detail });
    return null;
  }

  _signal(offset, publisher, meta, data) {
    const type = metaId(meta, "signal"), id = optId(meta, "id"), ref = optId(meta, "ref");
    let approved = optBool(meta, "approved");
    if ((type === "approve" || type === "reject") && ref === null) throw new Skip("bad_meta");
    if (type === "approve" && approved === null) throw new Skip("bad_meta");
    if (type === "reject") approved = false;
    const text = this._text(data);
    if (id !== null && this._signalIds.has(id)) throw new Skip("duplicate_signal");
    const item = ref === null ? null : this._items.get(ref) ?? null;
    const target = ref === null ? (type === "cancel" ? "run" : null) : item === null ? null : item.type;
    if (type === "cancel") {
      // A run's cancel reaches what is open now, not what opens later.
      const victims = ref === null ? [...this._open] : this._open.has(ref) ? [ref] : [];
      for (const v of victims) { const it = this._items.get(v); if (it.cancel === null) it.cancel = offset; }
    } else if ((type === "approve" || type === "reject") && item && item.type === "tool_call" && item.approved === null && item.outcome === null) {
      item.approved = approved;
      item.decided = offset;
    }
    if (id !== null) this._signalIds.add(id);
    this.signals.push({ offset, publisher, type, id, ref, target, approved, text });
    return ref !== null && item === null ? "unknown_ref" : null;
  }

  /** The snapshot's text form (docs/ai.md, "Snapshot"), as Python's
   * `to_snapshot(text=True)` writes it for this fold. */
  toSnapshot() {
    const items = this.items.map((i) => (i.type === "message"
      ? ["m", i.id, i.role, i.publisher, i.offset, i.text, i.outcome, i.error, i.end, i.replyTo, i.cancel]
      : ["t", i.id, i.name, i.publisher, i.offset, i.args, i.message, i.approval, i.approved, i.decided,
        i.outcome, i.result, i.error, i.end, i.resultPublisher, i.cancel]));
    const snap = {
      v: 1, json: this.json, next: this.next, items,
      signals: this.signals.map((s) => [s.offset, s.publisher, s.type, s.id, s.ref, s.target, s.approved, s.text]),
      states: this.states.map((s) => [s.offset, s.publisher, s.state, s.ref, s.detail]),
      anomalies: Object.entries(this.anomalies),
    };
    if (this.start) snap.start = this.start;
    snap.text = true;
    return snap;
  }

  /** A fold restored from a snapshot: the `v` of a WebSocket `view` frame
   * (byte fields as bin) or the body of `?view=conversation` (text form). */
  static fromSnapshot(snap) {
    if (!isPlainMap(snap) || snap.v !== 1) throw new BrokerError("bad_view", `not a version 1 conversation snapshot`);
    const text = snap.text === true;
    const t = (v) => snapText(v, text);
    const opt = (f, v) => (v === null || v === undefined ? null : f(v));
    const conv = new Conversation({ json: !!snap.json, start: snap.start || 0 });
    conv.next = snap.next;
    for (const e of snap.items) {
      let item;
      if (e[0] === "m") {
        item = { type: "message", id: e[1], role: e[2], publisher: e[3], offset: e[4], text: t(e[5]), outcome: e[6], error: e[7], end: e[8], replyTo: e[9], cancel: e[10] };
      } else {
        item = {
          type: "tool_call", id: e[1], name: e[2], publisher: e[3], offset: e[4], args: t(e[5]), message: e[6], approval: e[7],
          approved: e[8], decided: e[9], outcome: e[10], result: opt(t, e[11]), error: e[12], end: e[13], resultPublisher: e[14], cancel: e[15],
        };
      }
      conv._items.set(item.id, item);
      if (item.outcome === null) conv._open.add(item.id);
    }
    for (const [offset, publisher, type, id, ref, target, approved, data] of snap.signals) {
      conv.signals.push({ offset, publisher, type, id, ref, target, approved, text: t(data) });
      if (id !== null) conv._signalIds.add(id);
    }
    for (const [offset, publisher, state, ref, detail] of snap.states) {
      conv._states.set(publisher, { offset, publisher, state, ref, detail: t(detail) });
    }
    for (const [code, count] of snap.anomalies) conv._anomalies.set(code, count);
    return conv;
  }
}

// ----------------------------------------------------------------- client

/**
 * Follow one session.  Options:
 *   url          the broker's base URL (default: this page's origin)
 *   session      the session name
 *   token        a JWT, or a function (maybe async) returning one
 *   transports   the order to try: ["ws", "sse", "longpoll"] (any subset)
 *   storageKey   where the cursor is kept in sessionStorage ("broker:<session>")
 *   offset       where to start reading: -1 (the whole log), "now", a number;
 *                default: the saved cursor, else -1
 *   contentType  the session's content type (default application/json): JSON
 *                sessions give and take JSON values, text/* strings, others bytes
 *   create       PUT the session (with contentType) before reading
 *   backoff      {initial, maximum, multiplier, resetAfter} in seconds
 */
export function connect(options) {
  return new Client(options);
}

export class Client {
  constructor(options) {
    const o = { ...options };
    if (!o.session) throw new BrokerError("bad_session", "connect() needs a session name");
    this.session = o.session;
    this.url = (o.url || globalThis.location.origin).replace(/\/+$/, "");
    this.transports = (o.transports || TRANSPORTS).filter((t) => TRANSPORTS.includes(t));
    if (!this.transports.length) throw new BrokerError("bad_transports", "no known transport given");
    this.storageKey = o.storageKey || `broker:${o.session}`;
    this.contentType = o.contentType || "application/json";
    this.format = /^application\/json\b/i.test(this.contentType) ? "json"
      : /^text\//i.test(this.contentType) ? "text" : "bytes";
    this.backoff = new Backoff(o.backoff);
    this._token = o.token;
    this._create = !!o.create;
    this._createOption = !!o.create;
    this._handlers = { record: new Set(), state: new Set(), reset: new Set(), error: new Set(), view: new Set(), presence: new Set() };
    // With `presence`, who is attached (docs/protocol.md, "Presence"): member
    // id -> {id, client, transport, since, info}.  Live on the WebSocket;
    // over HTTP, polled with ?view=presence every `presenceEvery` seconds.
    this._presence = !!o.presence;
    this._info = o.info || null;
    this.presenceEvery = o.presenceEvery ?? 5;
    this.members = new Map();
    // With `conversation`, every connect() starts from a view (a reload
    // included) and the fold goes on from it; a cut resumes from `next`.
    this.conversation = o.conversation ? new Conversation({ json: this.format === "json" }) : null;
    this._needView = !!o.conversation;
    this.stats = { frames: 0, records: 0, views: 0 };   // what was received, for pages and tests

    const saved = o.offset === undefined && !o.conversation ? this._load() : null;
    this.next = saved ? saved.offset : (o.offset === "now" ? "now" : parseOffset(o.offset ?? -1));
    this.epoch = saved ? saved.epoch : (o.epoch ?? null);

    this.state = "connecting";        // connecting | connected | reconnecting | reset | ended | closed
    this.transport = this.transports[0];
    this.upToDate = false;
    this.error = null;                // why the client closed on its own
    this.clientId = null;             // the WebSocket client id the server gave us
    this._closed = false;
    this._ws = null;                  // the WebSocket while connected over it
    this._wsWaiters = new Map();      // request id -> {resolve, reject}
    this._nextId = 1;
    this._aborts = new Set();         // AbortControllers and closers of the attempt in progress

    this._producer = { id: randomId(), epoch: 0, seq: 0 };
    this._queue = [];                 // pending publishes, sent one at a time
    this._wake = null;
    this._pumping = this._pump();
    this._running = this._run();
  }

  // ---------------------------------------------------------- public API

  /** on("record"|"state"|"reset"|"error", fn); returns a function that removes fn. */
  on(event, fn) {
    const set = this._handlers[event];
    if (!set) throw new BrokerError("bad_event", `no event ${event}`);
    set.add(fn);
    if (event === "state") fn(this._stateInfo());
    return () => set.delete(fn);
  }

  /** Append one record (a JSON value for JSON sessions).  Resolves to its
   * offset, or null when a resend was recognised as already stored. */
  publish(value, { meta } = {}) { return this._enqueue(0, value, meta); }

  /** Append one signal (kind 1): cancel, approval, human input. */
  signal(value, { meta } = {}) { return this._enqueue(1, value, meta); }

  /** Append one record of any kind (docs/ai.md: 2 start ... 7 state) with its meta. */
  append(kind, value, meta) { return this._enqueue(kind, value, meta); }

  /** A signal of the message model: meta {signal, id, ref, approved}, the
   * text as the session's payload rule wants it (a JSON string in a JSON
   * session, UTF-8 elsewhere). */
  sendSignal(type, text = "", { ref = null, approved = null, id = null } = {}) {
    const meta = { signal: type, id: id || `s_${randomId().slice(0, 16)}` };
    if (ref !== null) meta.ref = ref;
    if (approved !== null) meta.approved = !!approved;
    return this._enqueue(1, String(text), meta);
  }

  /** Cancel one item, or (ref null) the whole run. */
  cancel(ref = null, reason = "") { return this.sendSignal("cancel", reason, { ref }); }

  /** Decide a tool call that waits for approval. */
  approve(ref, approved = true, note = "") { return this.sendSignal("approve", note, { ref, approved: !!approved }); }

  /** Free-form human input, maybe answering an item. */
  input(text, { ref = null } = {}) { return this.sendSignal("input", text, { ref }); }

  /** A whole message in one record (a `start` with an outcome); resolves to its offset. */
  message(text, { role = "user", id = null, replyTo = null } = {}) {
    const meta = { id: id || `m_${randomId().slice(0, 16)}`, role, outcome: "complete" };
    if (replyTo !== null) meta.reply_to = replyTo;
    return this._enqueue(2, String(text), meta);
  }

  /** Stop: the socket is closed, pending publishes are rejected. */
  close() {
    if (this._closed) return;
    this._closed = true;
    this._abortAttempt();
    for (const item of this._queue) item.reject(new BrokerError("client_closed", "the client was closed"));
    this._queue = [];
    this._kick();
    this._setState("closed");
  }

  // ---------------------------------------------------------- events

  _emit(event, arg) {
    for (const fn of [...this._handlers[event]]) {
      try { fn(arg); } catch (e) { console.error(`broker.js: ${event} handler failed`, e); }
    }
  }

  _stateInfo() {
    return {
      state: this.state, transport: this.transport, offset: this.next, epoch: this.epoch,
      upToDate: this.upToDate, error: this.error,
    };
  }

  _setState(state) {
    this.state = state;
    this._emit("state", this._stateInfo());
    this._kick();
  }

  _deliver(records) {
    let any = false;
    for (const r of records) {
      if (typeof this.next === "number" && this.next >= 0 && r.offset < this.next) continue;
      this.next = r.offset + 1;
      any = true;
      this.stats.records++;
      if (this.conversation) r.anomaly = this.conversation.applyRecord(r);
      this._emit("record", r);
    }
    if (any) { this._save(); this._emit("state", this._stateInfo()); }
  }

  _advance(next, upToDate) {
    if (typeof this.next !== "number" || next > this.next) this.next = next;
    if (this.conversation && !this._needView) this.conversation.advance(next);
    if (upToDate) this.upToDate = true;
    this._save();
    this._emit("state", this._stateInfo());
  }

  _reset(epoch) {
    // The session was deleted and created again: offsets start over.
    this.epoch = epoch;
    this.next = -1;
    this.upToDate = false;
    if (this.conversation) {
      this.conversation = new Conversation({ json: this.format === "json" });
      this._needView = true;
    }
    this._save();
    this._setState("reset");
    this._emit("reset", { epoch });
  }

  _setMembers(list) {
    this.members = new Map(list.map((m) => [m.id, m]));
    this._emit("presence", this.members);
  }

  async _pollPresence() {
    // HTTP has no presence events: ask now and then while this attempt lives.
    let stop = false;
    this._aborts.add(() => { stop = true; });
    while (!stop && !this._closed) {
      try {
        const res = await this._fetch(`${this._sessionUrl()}?view=presence`, { headers: await this._headers() });
        if (res.ok) this._setMembers((await res.json()).members || []);
      } catch { /* the read loop notices a dead link; this only shows who is here */ }
      await sleep(this.presenceEvery);
    }
  }

  _presenceHeaders(headers) {
    if (this._info) headers["Broker-Presence"] = JSON.stringify(this._info).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
    if (this.clientId) headers["Broker-Client"] = encodeURIComponent(this.clientId);
    return headers;
  }

  _restore(snap) {
    // A view: the fold restored, and the cursor where it is exact.
    let conv;
    try { conv = Conversation.fromSnapshot(snap); } catch (e) { throw new Lost(`bad view: ${e.message}`); }
    this.conversation = conv;
    this._needView = false;
    this.next = conv.next;
    this.stats.views++;
    this._save();
    this._emit("view", conv);
    this._emit("state", this._stateInfo());
  }

  async _httpView() {
    // ?view=conversation: the snapshot's text form, exact at Stream-Next-Offset.
    const res = await this._fetch(`${this._sessionUrl()}?view=conversation`, { headers: await this._headers() });
    if (res.status !== 200) this._httpFailure(await errorOf(res));
    const epoch = res.headers.get("Broker-Epoch");
    if (epoch !== null && /^\d+$/.test(epoch)) this.epoch = Number(epoch);   // the view's own
    let snap;
    try { snap = await res.json(); } catch (e) { throw new Lost(String(e)); }
    this.stats.frames++;
    this._restore(snap);
  }

  _load() {
    try {
      const v = JSON.parse(globalThis.sessionStorage?.getItem(this.storageKey) || "null");
      return v && typeof v.offset === "number" ? v : null;
    } catch { return null; }
  }

  _save() {
    if (typeof this.next !== "number") return;
    try {
      globalThis.sessionStorage?.setItem(this.storageKey, JSON.stringify({ epoch: this.epoch, offset: this.next }));
    } catch { /* storage full or disabled: the cursor lives in memory only */ }
  }

  async _tokenValue() {
    const t = typeof this._token === "function" ? await this._token() : this._token;
    return t || null;
  }

  _fail(error) {
    this.error = error;
    this._emit("error", error);
    this.close();
  }

  // ---------------------------------------------------------- supervisor

  async _run() {
    let index = 0, failures = 0, attempt = 0;
    while (!this._closed) {
      this.transport = this.transports[index];
      const started = Date.now();
      let opened = false;
      try {
        if (this._create) await this._put();
        const attemptFn = { ws: this._runWs, sse: this._runSse, longpoll: this._runLongPoll }[this.transport];
        await attemptFn.call(this, () => { opened = true; });
        throw new Lost("ended");
      } catch (e) {
        if (this._closed) break;
        if (e instanceof Fatal) { this._fail(e.error); break; }
        if (!(e instanceof Lost)) { console.error("broker.js:", e); }
        if (e instanceof BrokerError && AUTH_ERRORS.has(e.code) && typeof this._token !== "function") {
          this._fail(e); break;
        }
      } finally {
        this._abortAttempt();
      }
      if (this.state === "ended") break;
      if (opened) {
        failures = 0;
        if ((Date.now() - started) / 1000 >= this.backoff.resetAfter) attempt = 0;
      } else if (++failures >= 2 && index < this.transports.length - 1 && await this._httpAnswers()) {
        index++;                 // this transport does not get through; HTTP does
        failures = 0;
        attempt = 0;
        continue;
      }
      this._setState("reconnecting");
      await sleep(this.backoff.delay(attempt++));
    }
  }

  _abortAttempt() {
    for (const abort of this._aborts) abort();
    this._aborts.clear();
  }

  _sessionUrl() {
    return `${this.url}/v1/stream/${this.session.split("/").map(encodeURIComponent).join("/")}`;
  }

  async _headers(extra = {}) {
    const token = await this._tokenValue();
    return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
  }

  async _fetch(url, init = {}) {
    const ctl = new AbortController();
    const abort = () => ctl.abort();
    this._aborts.add(abort);
    try {
      return await fetch(url, { ...init, signal: ctl.signal, cache: "no-store" });
    } catch (e) {
      throw new Lost(String(e));
    } finally {
      this._aborts.delete(abort);
    }
  }

  async _httpAnswers() {
    try {
      const ctl = new AbortController();
      const timer = setTimeout(() => ctl.abort(), 10000);
      await fetch(this._sessionUrl(), { method: "HEAD", headers: await this._headers(), signal: ctl.signal, cache: "no-store" });
      clearTimeout(timer);
      return true;
    } catch { return false; }
  }

  async _put() {
    const res = await this._fetch(this._sessionUrl(), {
      method: "PUT", headers: await this._headers({ "Content-Type": this.contentType }),
    });
    if (res.ok || res.status === 409) { this._create = false; return; }  // 409: it exists, as something else
    const err = await errorOf(res);
    if (res.status === 401 || res.status === 403) throw new Fatal(err);
    throw new Lost(err.message);
  }

  _payload(d, b64) {
    if (this.format === "bytes" && b64) return b64bytes(d);
    return d;
  }

  _wsPayload(bytes) {
    if (this.format === "bytes") return bytes;
    const text = fromUtf8.decode(bytes);
    return this.format === "json" ? JSON.parse(text) : text;
  }

  _epochChanged(res) {
    // Broker-Epoch of an HTTP answer: adopt it if the cursor has none yet;
    // another than the cursor's resets it (true).  Absent (a cross-origin
    // page whose broker does not expose it), nothing is known.
    const text = res.headers.get("Broker-Epoch");
    if (text === null || !/^\d+$/.test(text)) return false;
    const epoch = Number(text);
    if (this.epoch === null) { this.epoch = epoch; this._save(); return false; }
    if (epoch === this.epoch) return false;
    this._reset(epoch);
    return true;
  }

  _httpFailure(err) {
    // A read refused over HTTP.  An offset the session does not have is
    // taken as a re-created session whose epoch was not seen: read it again
    // from the start.
    if (err.code === "offset_out_of_range" || err.code === "offset_too_old") {
      this._reset(this.epoch);
      throw new Lost(err.message);
    }
    if (err.status === 401 || err.status === 403) throw (typeof this._token === "function" && AUTH_ERRORS.has(err.code)) ? new Lost(err.message) : new Fatal(err);
    if ((err.code === "session_not_found" || err.status === 404) && this._createOption) this._create = true;
    throw new Lost(err.message);
  }

  // ---------------------------------------------------------- WebSocket

  _runWs(opened) {
    const wsUrl = this.url.replace(/^http/i, "ws") + "/v1/ws";
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new WebSocket(wsUrl, SUBPROTOCOL);
      } catch (e) { reject(new Fatal(new BrokerError("bad_url", String(e)))); return; }
      ws.binaryType = "arraybuffer";
      let welcomed = false, heartbeat = 25, heard = Date.now(), attachId = 0;
      let finished = false;
      const finish = (error) => {
        if (finished) return;
        finished = true;
        clearInterval(watch);
        if (this._ws === ws) this._ws = null;
        for (const w of this._wsWaiters.values()) w.reject(new Lost("connection lost"));
        this._wsWaiters.clear();
        try { ws.close(1000); } catch { /* already closing */ }
        this._kick();
        reject(error);
      };
      const abort = () => finish(new Lost("aborted"));
      this._aborts.add(abort);
      const connectBy = Date.now() + 10000;
      const watch = setInterval(() => {
        // No welcome in time, or silence for two heartbeats: a dead link.
        if (!welcomed && Date.now() > connectBy) finish(new Lost("no welcome"));
        if (welcomed && Date.now() - heard > 2 * heartbeat * 1000) finish(new Lost("heartbeat lost"));
      }, 500);
      const send = (frame) => ws.send(encode(frame));
      const attach = () => {
        attachId = this._nextId++;
        const frame = { t: "attach", id: attachId, s: this.session };
        if (this._needView) frame.view = true;
        else {
          frame.offset = this.next;
          if (this.epoch !== null && this.next !== -1 && this.next !== "now") frame.epoch = this.epoch;
        }
        if (this._presence) frame.presence = true;
        if (this._info) frame.info = this._info;
        send(frame);
      };
      ws.onopen = async () => {
        const hello = { t: "hello" };
        if (this.clientId) hello.client = this.clientId;
        const token = await this._tokenValue();
        if (token) hello.token = token;
        if (ws.readyState === WebSocket.OPEN) send(hello);
      };
      ws.onclose = (ev) => {
        if (FATAL_CLOSES.has(ev.code)) finish(new Fatal(new BrokerError("protocol_error", `closed ${ev.code} ${ev.reason}`)));
        else finish(new Lost(`closed ${ev.code}`));
      };
      ws.onmessage = (ev) => {
        heard = Date.now();
        if (typeof ev.data === "string") return;
        let f;
        try { f = decode(ev.data); } catch (e) { finish(new Lost(`bad frame: ${e}`)); return; }
        if (!f || typeof f !== "object") return;
        switch (f.t) {
          case "welcome":
            welcomed = true;
            heartbeat = f.heartbeat || 25;
            this.clientId = f.client || this.clientId;
            attach();
            break;
          case "attached":
            if (f.id !== attachId) break;
            this.epoch = f.epoch;
            if (this.next === "now") this.next = f.offset;
            if (this._needView) this.next = -1;     // the view frame comes next and sets it
            this._ws = ws;
            opened();
            this._setState("connected");
            break;
          case "view":
            if (f.s !== this.session) break;
            this.stats.frames++;
            try { this._restore(f.v); } catch (e) { finish(e); }
            break;
          case "data":
            if (f.s !== this.session) break;
            this.stats.frames++;
            this._deliver((f.r || []).map((r) => {
              const h = r[3] || [];
              return { offset: r[0], kind: r[2], publisher: h[0] ?? null, ts: r[1], meta: h[1] ?? null, data: this._wsPayload(r[4]) };
            }));
            break;
          case "up_to_date":
            if (f.s === this.session) this._advance(f.next, true);
            break;
          case "event":
            if (f.e === "epoch_changed") { this._reset(f.epoch); attach(); }
            else if (f.e === "closed") this._setState("ended");
            else if (f.e === "deleted") finish(new Fatal(new BrokerError("deleted", `session ${this.session} was deleted`)));
            break;
          case "ping":
            send({ t: "pong", id: f.id });
            break;
          case "members":
            if (f.s === this.session) this._setMembers(f.members || []);
            break;
          case "join":
            if (f.s === this.session && f.member) { this.members.set(f.member.id, f.member); this._emit("presence", this.members); }
            break;
          case "leave":
            if (f.s === this.session && f.member) { this.members.delete(f.member.id); this._emit("presence", this.members); }
            break;
          case "ack": {
            const w = this._wsWaiters.get(f.id);
            if (w) { this._wsWaiters.delete(f.id); w.resolve(f); }
            break;
          }
          case "error": {
            const err = new BrokerError(f.code, f.message, { retryAfter: f.retry_after, session: f.s });
            const w = f.id !== undefined ? this._wsWaiters.get(f.id) : undefined;
            if (w) { this._wsWaiters.delete(f.id); w.reject(err); break; }
            if (AUTH_ERRORS.has(f.code)) finish(typeof this._token === "function" ? new Lost(f.message) : new Fatal(err));
            else if (f.id === attachId && f.code === "session_not_found" && this._createOption) { this._create = true; finish(new Lost(f.message)); }
            else if (f.id === attachId || f.code === "forbidden") finish(f.code === "forbidden" ? new Fatal(err) : new Lost(f.message));
            else this._emit("error", err);
            break;
          }
          default: break;
        }
      };
    });
  }

  // ---------------------------------------------------------- HTTP reads

  async _readUrl(live) {
    const start = this.next === "now" ? "now" : formatOffset(this.next);
    let url = `${this._sessionUrl()}?offset=${start}&view=records`;
    if (live) url += `&live=${live}`;
    if (live === "sse") {
      // EventSource cannot set headers: the token goes in the query.
      const token = await this._tokenValue();
      if (token) url += `&token=${encodeURIComponent(token)}`;
    }
    return url;
  }

  _httpRecords(list) {
    return list.map((r) => ({ offset: r.o, kind: r.k, publisher: r.p ?? null, ts: r.ts, meta: r.m ?? null, data: this._payload(r.d, r.b64) }));
  }

  async _runSse(opened) {
    // EventSource shows no response headers: a HEAD tells the epoch first.
    const head = await this._fetch(this._sessionUrl(), { method: "HEAD", headers: await this._headers() });
    if (!head.ok && head.status !== 405) this._httpFailure(await errorOf(head));
    this._epochChanged(head);
    if (this._needView) await this._httpView();
    if (this._presence) this._pollPresence();
    const url = await this._readUrl("sse");
    return new Promise((resolve, reject) => {
      const es = new EventSource(url);
      let done = false, isOpen = false;
      const finish = (e) => { if (done) return; done = true; es.close(); reject(e); };
      this._aborts.add(() => finish(new Lost("aborted")));
      es.addEventListener("open", () => { isOpen = true; opened(); this._setState("connected"); });
      es.addEventListener("data", (ev) => {
        this.stats.frames++;
        try { this._deliver(this._httpRecords(JSON.parse(ev.data))); }
        catch (e) { finish(new Lost(`bad data event: ${e}`)); }
      });
      es.addEventListener("control", (ev) => {
        let c;
        try { c = JSON.parse(ev.data); } catch { return; }
        if (c.streamNextOffset) this._advance(parseOffset(c.streamNextOffset), !!c.upToDate);
        if (c.streamClosed) { this._setState("ended"); finish(new Lost("closed")); }
      });
      // EventSource would retry by itself from the offset in its URL; a new
      // one from `next` is what resumes without a repeat, so close it here.
      es.addEventListener("error", async () => {
        if (done) return;
        es.close();
        if (!isOpen) {
          // Never opened: ask plain HTTP why (a 401 or 404 is not worth retrying).
          try {
            const res = await this._fetch(this._sessionUrl(), { method: "HEAD", headers: await this._headers() });
            if (!res.ok && res.status !== 405) this._httpFailure(await errorOf(res));
          } catch (e) { finish(e); return; }
        }
        finish(new Lost("event stream ended"));
      });
    });
  }

  async _runLongPoll(opened) {
    // Catch up with plain reads first: a long-poll only answers at once when
    // there is something to read, and an empty session would look dead.
    let caughtUp = false;
    if (this._presence) this._pollPresence();
    while (!this._closed) {
      if (this._needView) { await this._httpView(); caughtUp = false; }
      const live = caughtUp ? "long-poll" : null;
      // A live poll is a presence member when it names its client (and shows `info`).
      const res = await this._fetch(await this._readUrl(live), { headers: await this._headers(live ? this._presenceHeaders({}) : {}) });
      if (res.status !== 200 && res.status !== 204) this._httpFailure(await errorOf(res));
      if (this._epochChanged(res)) { caughtUp = false; continue; }   // read it again from -1
      let records = [];
      if (res.status === 200) {
        try { records = await res.json(); } catch (e) { throw new Lost(String(e)); }
        this.stats.frames++;
      }
      if (this.state !== "connected") { opened(); this._setState("connected"); }
      this._deliver(this._httpRecords(records));
      const nextHeader = res.headers.get("Stream-Next-Offset");
      const upToDate = res.headers.get("Stream-Up-To-Date") === "true";
      if (nextHeader) this._advance(parseOffset(nextHeader), upToDate);
      if (upToDate) caughtUp = true;
      if (res.headers.get("Stream-Closed") === "true" && res.status === 204) { this._setState("ended"); return; }
    }
  }

  // ---------------------------------------------------------- publishing

  _enqueue(kind, value, meta) {
    if (this._closed) return Promise.reject(new BrokerError("client_closed", "the client was closed"));
    let body;
    if (this.format === "json") body = JSON.stringify(value);
    else if (this.format === "text") body = String(value);
    else body = value instanceof Uint8Array ? value : utf8.encode(String(value));
    if (body === undefined) return Promise.reject(new BrokerError("bad_payload", "not a JSON value"));
    return new Promise((resolve, reject) => {
      this._queue.push({ kind, body, meta, stamp: null, resolve, reject });
      this._kick();
    });
  }

  _kick() {
    const wake = this._wake;
    this._wake = null;
    if (wake) wake();
  }

  _waitKick() {
    return new Promise((r) => { this._wake = r; });
  }

  _stamp(item) {
    // A publish keeps its stamp for life, whichever transport resends it.
    if (!item.stamp) {
      const p = this._producer;
      item.stamp = { id: p.id, epoch: p.epoch, seq: p.seq++ };
    }
    return item.stamp;
  }

  async _pump() {
    let attempt = 0;
    while (true) {
      if (this._closed) return;
      const item = this._queue[0];
      const ws = this._ws;
      const overWs = this.transport === "ws";
      if (!item || (overWs && (!ws || this.state !== "connected"))) { await this._waitKick(); continue; }
      try {
        const result = overWs ? await this._publishWs(ws, item) : await this._publishHttp(item);
        this._queue.shift();
        attempt = 0;
        item.resolve(result);
      } catch (e) {
        if (this._closed) return;
        if (e instanceof Lost || (e instanceof BrokerError && RETRY_PUBLISH.has(e.code))) {
          const wait = e.retryAfter ?? this.backoff.delay(attempt++);
          await Promise.race([sleep(wait), this._waitKick()]);
          continue;
        }
        // Refused for good: that publish fails, and the producer moves to a
        // new epoch so the next one does not leave a sequence gap.
        this._queue.shift();
        this._producer.epoch++;
        this._producer.seq = 0;
        item.reject(e);
      }
    }
  }

  _publishWs(ws, item) {
    const id = this._nextId++;
    const stamp = this._stamp(item);
    const frame = { t: "publish", id, s: this.session, r: [typeof item.body === "string" ? utf8.encode(item.body) : item.body], kind: item.kind, producer: stamp };
    if (item.meta !== undefined) frame.meta = [item.meta];
    return new Promise((resolve, reject) => {
      this._wsWaiters.set(id, {
        resolve: (ack) => resolve(ack.offset ?? null),   // a dup's, if the broker knows it
        reject,
      });
      try { ws.send(encode(frame)); } catch (e) { this._wsWaiters.delete(id); reject(new Lost(String(e))); }
    });
  }

  async _publishHttp(item) {
    const stamp = this._stamp(item);
    const headers = {
      "Content-Type": this.contentType,
      "Producer-Id": stamp.id, "Producer-Epoch": String(stamp.epoch), "Producer-Seq": String(stamp.seq),
    };
    // The same producer as on the WebSocket (auth off; with auth the token's sub is).
    if (this.clientId) headers["Broker-Client"] = encodeURIComponent(this.clientId);
    if (item.kind === 1) headers["Broker-Kind"] = "signal";
    else if (item.kind > 1) headers["Broker-Kind"] = String(item.kind);
    // Header values are Latin-1 at most: escape the rest, JSON reads it back the same.
    if (item.meta !== undefined) headers["Broker-Meta"] = JSON.stringify([item.meta]).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
    // A top-level JSON array would be split into records: wrap the value.
    let body = this.format === "json" ? `[${item.body}]` : item.body;
    if (this.format !== "json" && item.body.length === 0) {
      // A plain POST cannot be empty (an empty cancel reason is): frame it
      // as one record of the broker's msgpack records body.
      body = encode([new Uint8Array(0)]);
      headers["Content-Type"] = "application/vnd.broker.records+msgpack";
    }
    let res;
    try {
      res = await fetch(this._sessionUrl(), { method: "POST", headers: await this._headers(headers), body, cache: "no-store" });
    } catch (e) { throw new Lost(String(e)); }
    if (res.status === 200) {
      const next = res.headers.get("Stream-Next-Offset");
      return next ? parseOffset(next) - 1 : null;
    }
    if (res.status === 204) {                         // a retry of a stored append
      const first = res.headers.get("Broker-First-Offset");
      return first ? parseOffset(first) : null;
    }
    const err = await errorOf(res);
    if (res.status === 429) err.retryAfter = Number(res.headers.get("Retry-After")) || undefined;
    if (res.status === 429 || res.status >= 500) err.code = RETRY_PUBLISH.has(err.code) ? err.code : "unavailable";
    throw err;
  }

}

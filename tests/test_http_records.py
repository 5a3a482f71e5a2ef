"""Broker extensions to the Durable Streams HTTP API, and the static routes.

``Broker-Kind`` on POST, ``view=records`` (with ``kinds=``) on GET in
catch-up, long-poll and SSE, ``/client/broker.js`` and ``/demo``.  Servers
run in the test's own Trio run (conftest.serve_in_process) and are reached
over real sockets with httpx; the WebSocket side is read with tests/_wsraw.py.
The ``/demo`` route needs ``broker serve --demo``, so those tests start the
real command.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import trio
import trio.testing

from broker import _frames
from broker._auth import Authenticator, mint
from conftest import Served, serve_in_process
from _wsraw import RawWs

SECRET = "r" * 32 + "-records-test-secret"
JSON = {"content-type": "application/json"}
TEXT = {"content-type": "text/plain"}
BYTES = {"content-type": "application/octet-stream"}
ZERO = "0000000000000000_0000000000000000"
STATIC = Path(__file__).parent.parent / "broker" / "static"


def bearer(caps: dict[str, list[str]], sub: str = "alice") -> dict[str, str]:
    return {"authorization": f"Bearer {mint(sub, caps, secret=SECRET)}"}


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[tuple[Served, httpx.AsyncClient]]:
    async with serve_in_process(tmp_path / "data",
                                streams={"long_poll_timeout_s": 60.0, "sse_max_s": 60.0}) as s:
        async with httpx.AsyncClient(base_url=s.http_url, timeout=30) as c:
            yield s, c


@pytest.fixture
async def authed(tmp_path: Path) -> AsyncIterator[tuple[Served, httpx.AsyncClient]]:
    async with serve_in_process(tmp_path / "data", auth=Authenticator(SECRET)) as s:
        async with httpx.AsyncClient(base_url=s.http_url, timeout=30) as c:
            yield s, c


def url(name: str, **query: str) -> str:
    return f"/v1/stream/{name}" + ("?" + "&".join(f"{k}={v}" for k, v in query.items())
                                   if query else "")


# ------------------------------------------------------------- Broker-Kind

@pytest.mark.parametrize("header,kind", [("signal", 1), ("Signal", 1), ("message", 0),
                                         ("0", 0), ("7", 7), ("63", 63)])
async def test_broker_kind_is_stored(http: tuple[Served, httpx.AsyncClient], header: str,
                                     kind: int) -> None:
    _, c = http
    await c.put(url("k"), headers=JSON)
    r = await c.post(url("k"), content=b'[{"a":1},{"a":2}]',
                     headers={**JSON, "broker-kind": header})
    assert r.status_code == 204, r.text
    r = await c.get(url("k", offset="-1", view="records"))
    assert [(rec["k"], rec["d"]) for rec in r.json()] == [(kind, {"a": 1}), (kind, {"a": 2})]
    # The bare view is the plain protocol's, kind or not.
    assert (await c.get(url("k", offset="-1"))).json() == [{"a": 1}, {"a": 2}]


async def test_broker_meta_is_stored(http: tuple[Served, httpx.AsyncClient]) -> None:
    _, c = http
    await c.put(url("m"), headers=JSON)
    r = await c.post(url("m"), content=b'[1,2]', headers={
        **JSON, "broker-kind": "signal", "broker-meta": '[{"signal":"cancel"},null]'})
    assert r.status_code == 204, r.text
    r = await c.get(url("m", offset="-1", view="records"))
    assert [(rec["k"], rec["m"], rec["d"]) for rec in r.json()] == [
        (1, {"signal": "cancel"}, 1), (1, None, 2)]


@pytest.mark.parametrize("meta", ["{}", "[1]", "[1,2,3]", "not json", "[NaN, 1]"])
async def test_bad_broker_meta(http: tuple[Served, httpx.AsyncClient], meta: str) -> None:
    s, c = http
    await c.put(url("m"), headers=JSON)
    r = await c.post(url("m"), content=b'[1,2]', headers={**JSON, "broker-meta": meta})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_meta", r.text
    assert (await s.broker.info("m")).next_offset == 0


@pytest.mark.parametrize("header", ["64", "-1", "sig", "", "1.0", "999"])
async def test_bad_broker_kind(http: tuple[Served, httpx.AsyncClient], header: str) -> None:
    s, c = http
    await c.put(url("k"), headers=TEXT)
    r = await c.post(url("k"), content=b"x", headers={**TEXT, "broker-kind": header})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "bad_kind"
    assert (await s.broker.info("k")).next_offset == 0


async def test_broker_kind_with_stream_seq_is_refused(
        http: tuple[Served, httpx.AsyncClient]) -> None:
    s, c = http
    await c.put(url("k"), headers=TEXT)
    r = await c.post(url("k"), content=b"x",
                     headers={**TEXT, "broker-kind": "signal", "stream-seq": "a"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_kind"
    assert (await s.broker.info("k")).next_offset == 0


async def test_broker_kind_with_a_producer(http: tuple[Served, httpx.AsyncClient]) -> None:
    _, c = http
    await c.put(url("k"), headers=TEXT)
    producer = {"producer-id": "p", "producer-epoch": "0", "producer-seq": "0"}
    for _ in range(2):          # the retry is answered as a duplicate
        r = await c.post(url("k"), content=b"x",
                         headers={**TEXT, **producer, "broker-kind": "signal"})
        assert r.status_code in (200, 204), r.text
    r = await c.get(url("k", offset="-1", view="records"))
    assert [(rec["k"], rec["d"]) for rec in r.json()] == [(1, "x")]


@pytest.mark.parametrize("caps,kind,status", [
    ({"s": ["append"]}, "signal", 403),
    ({"s": ["signal"]}, "signal", 204),
    ({"s": ["signal"]}, "message", 403),
    ({"s": ["append"]}, "message", 204),
    ({"s": ["append"]}, "5", 204),
])
async def test_signal_needs_the_signal_capability(
        authed: tuple[Served, httpx.AsyncClient], caps: dict[str, list[str]], kind: str,
        status: int) -> None:
    s, c = authed
    await c.put(url("s"), headers={**TEXT, **bearer({"*": ["*"]})})
    r = await c.post(url("s"), content=b"go",
                     headers={**TEXT, **bearer(caps, "bob"), "broker-kind": kind})
    assert r.status_code == status, r.text
    if status == 403:
        assert r.json()["error"]["code"] == "forbidden"
        assert (await s.broker.info("s")).next_offset == 0
    else:
        r = await c.get(url("s", offset="-1", view="records"),
                        headers=bearer({"*": ["read"]}))
        assert r.json()[0]["p"] == "bob"


async def test_bad_kind_comes_after_the_token(authed: tuple[Served, httpx.AsyncClient]) -> None:
    _, c = authed
    r = await c.post(url("s"), content=b"x", headers={**TEXT, "broker-kind": "nope"})
    assert r.status_code == 401
    r = await c.post(url("s"), content=b"x",
                     headers={**TEXT, "broker-kind": "nope", **bearer({"*": ["*"]})})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_kind"


async def test_signal_kind_seen_over_the_websocket(
        authed: tuple[Served, httpx.AsyncClient]) -> None:
    s, c = authed
    await c.put(url("s"), headers={**TEXT, **bearer({"*": ["*"]})})
    r = await c.post(url("s"), content=b"stop",
                     headers={**TEXT, **bearer({"s": ["signal"]}, "bob"),
                              "broker-kind": "signal"})
    assert r.status_code == 204
    ws = await RawWs.connect(s.port, hello=False)
    await ws.send(_frames.Hello("carol", token=mint("carol", {"*": ["read"]}, secret=SECRET)))
    assert isinstance(await ws.frame(), _frames.Welcome)
    await ws.send(_frames.Attach(1, "s", offset=-1))
    assert isinstance(await ws.frame(), _frames.Attached)
    data = await ws.frame()
    assert isinstance(data, _frames.Data)
    (record,) = data.records
    assert (record.kind, record.publisher, record.payload) == (1, "bob", b"stop")
    await ws.aclose()


# ------------------------------------------------------------ view=records

async def _fill(s: Served, name: str, content_type: str, payloads: list[bytes]) -> None:
    """Records with every header field: kinds 0 and 1, a publisher, meta."""
    await s.broker.create(name, content_type=content_type)
    await s.broker.publish(name, payloads[:1], publisher="agent", metas=[{"step": 1}])
    await s.broker.publish(name, payloads[1:2], kind=1, publisher="user",
                           metas=[[b"\x00\xff", 2.5]])
    await s.broker.append_many(name, payloads[2:])


CASES = [
    ("application/json", [b'{"t":"a"}', b'"stop"', b"[1,2]"],
     [{"d": {"t": "a"}}, {"d": "stop"}, {"d": [1, 2]}]),
    ("text/plain; charset=utf-8", ["h\u00e9".encode(), b"line\nbreak", b"\xff"],
     [{"d": "h\u00e9"}, {"d": "line\nbreak"}, {"d": "\ufffd"}]),
    ("application/octet-stream", [b"\x00\x01", b"sig", b""],
     [{"d": "AAE=", "b64": True}, {"d": "c2ln", "b64": True}, {"d": "", "b64": True}]),
]
HEADERS = [{"o": 0, "k": 0, "p": "agent", "m": {"step": 1}},
           {"o": 1, "k": 1, "p": "user",
            "m": [base64.b64encode(b"\x00\xff").decode(), 2.5]},
           {"o": 2, "k": 0, "p": None, "m": None}]


def _strip_ts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in records:
        assert isinstance(r.pop("ts"), int) and r["o"] >= 0
    return records


@pytest.mark.parametrize("ct,payloads,shown", CASES, ids=["json", "text", "binary"])
async def test_records_catch_up(http: tuple[Served, httpx.AsyncClient], ct: str,
                                payloads: list[bytes], shown: list[dict[str, Any]]) -> None:
    s, c = http
    await _fill(s, "r", ct, payloads)
    r = await c.get(url("r", offset="-1", view="records"))
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.headers["stream-next-offset"] == "0000000000000000_0000000000000003"
    assert r.headers["stream-up-to-date"] == "true"
    assert _strip_ts(r.json()) == [{**h, **d} for h, d in zip(HEADERS, shown)]
    # Its own ETag, and 304 on it.
    bare = await c.get(url("r", offset="-1"))
    assert bare.headers["etag"] != r.headers["etag"]
    again = await c.get(url("r", offset="-1", view="records"),
                        headers={"if-none-match": r.headers["etag"]})
    assert again.status_code == 304
    # offset=now: nothing, as JSON.
    now = await c.get(url("r", offset="now", view="records"))
    assert (now.status_code, now.content, now.headers["content-type"]) == (
        200, b"[]", "application/json")


@pytest.mark.parametrize("kinds,offsets", [("1", [1]), ("0", [0, 2]), ("0,1", [0, 1, 2]),
                                           ("signal", [1]), ("5", [])])
async def test_kinds_filter(http: tuple[Served, httpx.AsyncClient], kinds: str,
                            offsets: list[int]) -> None:
    s, c = http
    await _fill(s, "f", *CASES[0][:2])           # type: ignore[arg-type]
    r = await c.get(url("f", offset="-1", view="records", kinds=kinds))
    assert [rec["o"] for rec in r.json()] == offsets
    # The cursor moves past what was left out.
    assert r.headers["stream-next-offset"] == "0000000000000000_0000000000000003"


@pytest.mark.parametrize("query,code", [
    ({"view": "bare"}, "bad_view"),
    ({"view": "records", "kinds": "64"}, "bad_kind"),
    ({"view": "records", "kinds": "1,x"}, "bad_kind"),
    ({"view": "records", "kinds": ""}, "bad_kind"),
    ({"kinds": "1"}, "bad_kind"),
])
async def test_bad_view_query(http: tuple[Served, httpx.AsyncClient], query: dict[str, str],
                              code: str) -> None:
    _, c = http
    await c.put(url("v"), headers=JSON)
    r = await c.get(url("v", offset="-1", **query))
    assert r.status_code == 400 and r.json()["error"]["code"] == code


async def test_records_long_poll(http: tuple[Served, httpx.AsyncClient]) -> None:
    s, c = http
    await s.broker.create("lp", content_type="application/json")
    got: list[httpx.Response] = []

    async def poll() -> None:
        got.append(await c.get(url("lp", offset=ZERO, live="long-poll", view="records",
                                   kinds="1")))

    async with trio.open_nursery() as n:
        n.start_soon(poll)
        await trio.testing.wait_all_tasks_blocked()
        # A message of another kind moves the cursor but does not answer the poll.
        await s.broker.publish("lp", [b'{"x":1}'], publisher="a")
        await trio.testing.wait_all_tasks_blocked()
        assert not got
        await s.broker.publish("lp", [b'{"type":"cancel"}'], kind=1, publisher="u")
    (r,) = got
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert [(rec["o"], rec["k"], rec["p"], rec["d"]) for rec in r.json()] == [
        (1, 1, "u", {"type": "cancel"})]
    assert r.headers["stream-next-offset"] == "0000000000000000_0000000000000002"
    assert "stream-cursor" in r.headers


async def test_records_long_poll_timeout(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path / "data", streams={"long_poll_timeout_s": 0.2}) as s:
        await s.broker.create("lp", content_type="text/plain")
        await s.broker.append_many("lp", [b"m"])
        async with httpx.AsyncClient(base_url=s.http_url, timeout=30) as c:
            r = await c.get(url("lp", offset=ZERO, live="long-poll", view="records",
                                kinds="1"))
    # Only a message there: skipped, and the poll times out past it.
    assert r.status_code == 204
    assert r.headers["stream-next-offset"] == "0000000000000000_0000000000000001"


async def _sse_events(c: httpx.AsyncClient, path: str) -> list[tuple[str, str]]:
    """(event, data) pairs of a whole SSE response (the stream is closed, so
    the response ends)."""
    r = await c.get(path)
    assert r.headers["content-type"] == "text/event-stream"
    assert "stream-sse-data-encoding" not in r.headers
    events = []
    for block in r.text.split("\n\n"):
        lines = block.split("\n")
        if lines[0].startswith("event:"):
            events.append((lines[0][6:].strip(),
                           "\n".join(line[5:].removeprefix(" ") for line in lines[1:])))
    return events


@pytest.mark.parametrize("ct,payloads,shown", CASES, ids=["json", "text", "binary"])
async def test_records_sse(http: tuple[Served, httpx.AsyncClient], ct: str,
                           payloads: list[bytes], shown: list[dict[str, Any]]) -> None:
    s, c = http
    await _fill(s, "e", ct, payloads)
    await s.broker.close_session("e")
    events = await _sse_events(c, url("e", offset=ZERO, live="sse", view="records"))
    assert [k for k, _ in events] == ["data", "control"]
    assert _strip_ts(json.loads(events[0][1])) == [{**h, **d} for h, d in zip(HEADERS, shown)]
    assert json.loads(events[1][1]) == {"streamNextOffset": "0000000000000000_0000000000000003",
                                        "streamClosed": True}


async def test_records_sse_live_with_kinds(http: tuple[Served, httpx.AsyncClient]) -> None:
    s, c = http
    await s.broker.create("e", content_type="application/json")
    await s.broker.publish("e", [b'{"n":0}'], publisher="a")
    got: list[list[tuple[str, str]]] = []

    async def read() -> None:
        got.append(await _sse_events(
            c, url("e", offset=ZERO, live="sse", view="records", kinds="1")))

    async with trio.open_nursery() as n:
        n.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        await s.broker.publish("e", [b'{"n":1}'], publisher="a")
        await s.broker.publish("e", [b'{"type":"approve","id":"r"}'], kind=1, publisher="u")
        await trio.testing.wait_all_tasks_blocked()
        await s.broker.close_session("e")
    (events,) = got
    data = [json.loads(d) for k, d in events if k == "data"]
    assert [[(r["o"], r["k"], r["d"]) for r in batch] for batch in data] == [
        [(2, 1, {"type": "approve", "id": "r"})]]
    # The skipped messages still moved the cursor, in control events.
    assert json.loads(events[-1][1]) == {"streamNextOffset": "0000000000000000_0000000000000003",
                                         "streamClosed": True}


# ------------------------------------------------------------------ static

async def test_browser_client_is_served(http: tuple[Served, httpx.AsyncClient]) -> None:
    _, c = http
    r = await c.get("/client/broker.js")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/javascript; charset=utf-8"
    assert r.content == (STATIC / "broker.js").read_bytes()
    head = await c.head("/client/broker.js")
    assert head.status_code == 200 and head.content == b""
    post = await c.post("/client/broker.js", content=b"x")
    assert post.status_code == 405
    # Without --demo there is no demo page.
    r = await c.get("/demo")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def _serve(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--port", "0",
         "--data-dir", str(tmp_path / "data"), *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "listening on" in line:
            return proc, int(line.rsplit(":", 1)[1])
    raise AssertionError("broker serve did not start")


@pytest.mark.parametrize("flag,status", [((), 404), (("--demo",), 200)])
def test_demo_route_needs_the_flag(tmp_path: Path, flag: tuple[str, ...],
                                   status: int) -> None:
    proc, port = _serve(tmp_path, *flag)
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/demo", timeout=30)
        assert r.status_code == status
        if status == 200:
            assert r.headers["content-type"] == "text/html; charset=utf-8"
            assert r.content == (STATIC / "demo.html").read_bytes()
        js = httpx.get(f"http://127.0.0.1:{port}/client/broker.js", timeout=30)
        assert js.status_code == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0


# ------------------------------------------- several binary records in one POST

RECORDS = {"content-type": "application/vnd.broker.records+msgpack"}
PRODUCER = {"producer-id": "p", "producer-epoch": "0"}


def test_the_client_names_the_records_type_as_the_server_does() -> None:
    from broker import _streams, client
    assert client.RECORDS_TYPE == _streams.RECORDS_TYPE


@pytest.mark.parametrize("ct", ["application/octet-stream", "text/plain"])
async def test_a_records_body_appends_atomically(http: tuple[Served, httpx.AsyncClient],
                                                 ct: str) -> None:
    s, c = http
    await c.put(url("b"), headers={"content-type": ct})
    body = msgpack.packb([b"one", b"", "three"], use_bin_type=True)
    r = await c.post(url("b"), content=body, headers=RECORDS)
    assert r.status_code == 204, r.text
    assert r.headers["stream-next-offset"] == "0000000000000000_0000000000000003"
    assert (await s.broker.read("b")).payloads() == [b"one", b"", b"three"]
    # With a producer, a kind and meta, and its retry as a duplicate.
    for status in (200, 204):
        r = await c.post(url("b"), content=msgpack.packb([b"x", b"y"]), headers={
            **RECORDS, **PRODUCER, "producer-seq": "0", "broker-kind": "signal",
            "broker-meta": '[{"n":1},null]'})
        assert r.status_code == status, r.text
        assert r.headers["broker-first-offset"] == "0000000000000000_0000000000000003"
        assert r.headers["stream-next-offset"] == "0000000000000000_0000000000000005"
    r = await c.get(url("b", offset="0000000000000000_0000000000000003", view="records"))
    assert [(rec["k"], rec["m"], base64.b64decode(rec["d"]) if rec.get("b64") else rec["d"])
            for rec in r.json()] == [(1, {"n": 1}, b"x" if ct != "text/plain" else "x"),
                                     (1, None, b"y" if ct != "text/plain" else "y")]


@pytest.mark.parametrize("body,status,code", [
    (b"", 400, "empty_body"),
    (b"\xc4\x01x", 400, "bad_records"),                          # a bin, not an array
    (b"\x91\x01", 400, "bad_records"),                           # an item that is not bytes
    (b"\x91\x91\xc4\x01x", 400, "bad_records"),                  # nested
    (b"\x92\xc4\x01x", 400, "bad_records"),                      # one item short
    (b"\x91\xc4\x05xy", 400, "bad_records"),                     # the item is cut short
    (b"\x91\xc4\x01xz", 400, "bad_records"),                     # bytes after the array
    (b"\xdd\x00\x00", 400, "bad_records"),                       # a cut array header
    (b"\x90", 400, "empty_array"),
    (b"\xdc\x00\x04" + b"\xc4\x00" * 4, 413, "batch_too_large"),  # over the limit of 3
])
async def test_bad_records_bodies(tmp_path: Path, body: bytes, status: int, code: str) -> None:
    async with serve_in_process(tmp_path / "data", streams={"max_batch_records": 3}) as s:
        async with httpx.AsyncClient(base_url=s.http_url, timeout=30) as c:
            await c.put(url("b"), headers=BYTES)
            r = await c.post(url("b"), content=body, headers=RECORDS)
            assert r.status_code == status, r.text
            assert r.json()["error"]["code"] == code
            assert (await s.broker.info("b")).next_offset == 0


async def test_records_bodies_and_json_streams(http: tuple[Served, httpx.AsyncClient]) -> None:
    s, c = http
    await c.put(url("j"), headers=JSON)
    r = await c.post(url("j"), content=msgpack.packb([b"1"]), headers=RECORDS)
    assert r.status_code == 409 and r.json()["error"]["code"] == "content_type_mismatch"
    # A stream of that very type takes such a body as one record, as the protocol says.
    await c.put(url("m"), headers=RECORDS)
    body = msgpack.packb([b"a", b"b"])
    assert (await c.post(url("m"), content=body, headers=RECORDS)).status_code == 204
    assert (await s.broker.read("m")).payloads() == [body]


async def test_a_record_over_the_limit_in_a_records_body(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path / "data", max_record_bytes=4) as s:
        async with httpx.AsyncClient(base_url=s.http_url, timeout=30) as c:
            await c.put(url("b"), headers=BYTES)
            r = await c.post(url("b"), content=msgpack.packb([b"ok", b"too long"]),
                             headers=RECORDS)
            assert r.status_code == 413 and r.json()["error"]["code"] == "record_too_large"
            assert (await s.broker.info("b")).next_offset == 0


# ------------------------------------------------------------ Broker-Epoch

async def test_every_answer_about_records_names_the_epoch(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path / "data",
                                streams={"long_poll_timeout_s": 0.05}) as s, \
            httpx.AsyncClient(base_url=s.http_url, timeout=30) as c:
        await _epochs_named(s, c)


async def _epochs_named(s: Served, c: httpx.AsyncClient) -> None:
    async def answers() -> list[httpx.Response]:
        out = [await c.put(url("e"), headers=TEXT),
               await c.post(url("e"), content=b"x", headers=TEXT),
               await c.post(url("e"), content=b"y", headers={**TEXT, **PRODUCER,
                                                              "producer-seq": "0"}),
               await c.head(url("e")),
               await c.get(url("e", offset="-1")),
               await c.get(url("e", offset="now")),
               await c.get(url("e", offset="now", live="long-poll"))]
        async with c.stream("GET", url("e", offset="now", live="sse")) as sse:
            out.append(sse)
        return out

    got = await answers()
    epoch = (await s.broker.info("e")).epoch
    assert [r.headers.get("broker-epoch") for r in got] == [str(epoch)] * 8
    await c.delete(url("e"))
    again = await answers()
    new = (await s.broker.info("e")).epoch
    assert new != epoch
    assert [r.headers.get("broker-epoch") for r in again] == [str(new)] * 8


# ------------------------------------------------------------ Broker-Client

async def test_broker_client_names_the_publisher_without_auth(
        http: tuple[Served, httpx.AsyncClient]) -> None:
    s, c = http
    await c.put(url("c"), headers=TEXT)
    r = await c.post(url("c"), content=b"x", headers={**TEXT, "broker-client": "ui%2F%C3%A9"})
    assert r.status_code == 204, r.text
    r = await c.get(url("c", offset="-1", view="records"))
    assert [rec["p"] for rec in r.json()] == ["ui/é"]


@pytest.mark.parametrize("value", ["", "%ff", "%C3", "a" * 257])
async def test_bad_broker_client(http: tuple[Served, httpx.AsyncClient], value: str) -> None:
    s, c = http
    await c.put(url("c"), headers=TEXT)
    r = await c.post(url("c"), content=b"x", headers={**TEXT, "broker-client": value})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_client", r.text
    assert (await s.broker.info("c")).next_offset == 0


async def test_broker_client_is_ignored_with_auth(authed: tuple[Served, httpx.AsyncClient]) -> None:
    _, c = authed
    alice = bearer({"c": ["*"]})
    await c.put(url("c"), headers={**TEXT, **alice})
    r = await c.post(url("c"), content=b"x",
                     headers={**TEXT, **alice, "broker-client": "mallory"})
    assert r.status_code == 204, r.text
    r = await c.get(url("c", offset="-1", view="records"), headers=alice)
    assert [rec["p"] for rec in r.json()] == ["alice"]


async def test_one_producer_across_the_websocket_and_http(
        http: tuple[Served, httpx.AsyncClient], raw: Any) -> None:
    """Without auth a WebSocket publish is keyed by the hello's client id; an
    HTTP POST naming the same client in Broker-Client is the same producer:
    its retry is a duplicate, answered with where the records landed."""
    s, c = http
    await c.put(url("w"), headers=BYTES)
    ws = await raw(s.port, client="ui-1")
    await ws.send(_frames.Publish(1, "w", (b"a", b"b"), producer=_frames.Producer("p", 0, 0)))
    ack = await ws.frame()
    assert isinstance(ack, _frames.Ack) and (ack.offset, ack.count) == (0, 2)
    retry = {**RECORDS, **PRODUCER, "producer-seq": "0"}
    r = await c.post(url("w"), content=msgpack.packb([b"a", b"b"]),
                     headers={**retry, "broker-client": "ui-1"})
    assert r.status_code == 204, r.text
    assert (r.headers["broker-first-offset"], r.headers["stream-next-offset"]) == (
        ZERO, "0000000000000000_0000000000000002")
    # Another client's producer of the same id is another producer.
    r = await c.post(url("w"), content=msgpack.packb([b"c"]),
                     headers={**retry, "broker-client": "ui-2"})
    assert r.status_code == 200, r.text
    assert (await s.broker.read("w")).payloads() == [b"a", b"b", b"c"]


async def test_cors_lets_a_page_send_and_read_the_broker_headers(
        http: tuple[Served, httpx.AsyncClient]) -> None:
    # A cross-origin page that falls back to HTTP sends Broker-Client (its
    # preflight must allow it) and reads Broker-Epoch and Broker-First-Offset.
    served, c = http
    r = await c.request("OPTIONS", url("cors"), headers={
        "origin": "https://app.example", "access-control-request-method": "POST",
        "access-control-request-headers": "broker-client, broker-kind, broker-presence"})
    allowed = r.headers["access-control-allow-headers"].lower()
    assert all(h in allowed for h in ("broker-client", "broker-kind", "broker-presence"))
    r = await c.put(url("cors"), headers={"content-type": "application/octet-stream"})
    exposed = r.headers["access-control-expose-headers"].lower()
    assert "broker-epoch" in exposed and "broker-first-offset" in exposed

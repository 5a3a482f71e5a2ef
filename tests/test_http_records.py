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

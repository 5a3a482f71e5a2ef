"""``GET /v1/stream/<name>?view=conversation`` (docs/protocol.md, docs/ai.md "Views").

The answer is the conversation so far in the snapshot's JSON text form, with
``Stream-Next-Offset`` where it is exact and ``Broker-Epoch``; a client reads
on from there with ``?offset=``.  A late joiner over HTTP ends with the
log's transcript from one request and only the records after it; a view at
any offset plus the records after it is the full replay, in a binary and a
JSON session; the refusals are checked one by one; and a real ``broker
serve`` restarted on the same data directory answers from its saved
snapshot (a doctored one shows through, so it was used) or, if the file is
corrupt, from the log again.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest

from _serveproc import serving
from broker._convo import Conversation
from broker._session import CONVO_FILE, convo_file, read_convo_file
from conftest import Served, serve_in_process
from test_view_store import NEVER, WAIT, Rec, fold, publish, script

URL = "/v1/stream/chat"


def offset_of(header: str) -> int:
    return int(header.partition("_")[2])


async def get_view(h: httpx.AsyncClient, url: str = URL) -> tuple[dict[str, Any], int, int]:
    """(snapshot in text form, Stream-Next-Offset, Broker-Epoch)."""
    r = await h.get(url, params={"view": "conversation"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    snap: dict[str, Any] = r.json()
    nxt = offset_of(r.headers["stream-next-offset"])
    assert snap["text"] is True and snap["next"] == nxt
    return snap, nxt, int(r.headers["broker-epoch"])


async def read_records(h: httpx.AsyncClient, offset: int | str,
                       url: str = URL) -> tuple[list[dict[str, Any]], int]:
    """Every record object from ``offset`` to the end, and the requests it took."""
    out: list[dict[str, Any]] = []
    requests = 0
    if isinstance(offset, int) and offset >= 0:
        offset = "0000000000000000_%016d" % offset
    while True:
        r = await h.get(url, params={"offset": str(offset), "view": "records"})
        requests += 1
        assert r.status_code == 200, r.text
        out += r.json()
        offset = r.headers["stream-next-offset"]
        if r.headers.get("stream-up-to-date") == "true":
            return out, requests


def http(s: Served | str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=s if isinstance(s, str) else s.http_url, timeout=WAIT)


# ---------------------------------------------------------------- late joiners

@pytest.mark.parametrize("join", [0.3, 1.0])
async def test_a_late_joiner_over_http_gets_the_transcript_from_one_request(
        tmp_path: Path, join: float) -> None:
    recs = script(21)
    end, cut = len(recs), int(len(recs) * join)
    async with serve_in_process(tmp_path, fsync=NEVER, max_batch_records=64) as s, \
            http(s) as h:
        await s.broker.create("chat")
        await publish(s.broker, "chat", recs[:cut])
        snap, nxt, epoch = await get_view(h)
        assert nxt == cut and epoch == (await s.broker.info("chat")).epoch
        late = Conversation.from_snapshot(snap)
        await publish(s.broker, "chat", recs[cut:])
        tail, late_requests = await read_records(h, nxt)
        for obj in tail:
            late.apply_view_record(obj)
        everything, replay_requests = await read_records(h, -1)
    replay = Conversation()
    for obj in everything:
        replay.apply_view_record(obj)
    assert late.view() == replay.view() == fold(recs).view()
    # One request and no record for what came before the join.
    assert len(tail) == end - cut and len(everything) == end
    print(f"join at {cut}/{end}: late joiner 1 + {late_requests} requests, {len(tail)} "
          f"records; replay {replay_requests} requests, {end} records")
    if cut == end:
        assert (len(tail), late_requests) == (0, 1) and replay_requests > 2


@pytest.mark.parametrize("json_session", [False, True])
async def test_a_view_at_any_offset_then_the_records_after_it_is_a_replay(
        tmp_path: Path, json_session: bool) -> None:
    rng = random.Random(22)
    recs = script(22, json=json_session)
    cuts = sorted(rng.sample(range(len(recs) + 1), 30)) + [len(recs)]
    ct = "application/json" if json_session else "application/octet-stream"
    async with serve_in_process(tmp_path, fsync=NEVER) as s, http(s) as h:
        await s.broker.create("chat", content_type=ct)
        views, done = [], 0
        for cut in cuts:
            await publish(s.broker, "chat", recs[done:cut])
            done = cut
            snap, nxt, _ = await get_view(h)
            assert nxt == cut
            views.append(snap)
        everything, _ = await read_records(h, -1)
    full = Conversation(json=json_session)
    for obj in everything:
        full.apply_view_record(obj)
    assert full.view() == fold(recs, json=json_session).view()
    for snap in views:
        conv = Conversation.from_snapshot(snap)
        assert conv.json is json_session
        for obj in everything[snap["next"]:]:
            conv.apply_view_record(obj)
        assert conv.view() == full.view(), snap["next"]


async def test_the_headers_say_where_the_view_is_exact(served: Served) -> None:
    recs = script(23)
    async with http(served) as h:
        info, _ = await served.broker.create("chat")
        await publish(served.broker, "chat", recs)
        r = await h.get(URL, params={"view": "conversation"})
        assert r.headers["broker-epoch"] == str(info.epoch)
        assert r.headers["stream-next-offset"] == "0000000000000000_%016d" % len(recs)
        assert r.headers["stream-up-to-date"] == "true" and "stream-closed" not in r.headers
        await served.broker.close_session("chat")
        r = await h.get(URL, params={"view": "conversation"})
        assert r.headers["stream-closed"] == "true"
        # And the offset it gives is where a plain read goes on.
        r = await h.get(URL, params={"offset": r.headers["stream-next-offset"]})
        assert r.status_code == 200 and r.content == b""
        assert r.headers["stream-closed"] == "true"


@pytest.mark.parametrize("query, status, code", [
    ("view=conversation&offset=0", 400, "bad_view"),
    ("view=conversation&offset=-1", 400, "bad_view"),
    ("view=conversation&live=long-poll", 400, "bad_view"),
    ("view=conversation&live=sse&offset=now", 400, "bad_view"),
    ("view=conversation&kinds=1", 400, "bad_view"),
    ("view=conversation&cursor=5", 400, "bad_view"),
    ("view=conversation&view=records", 400, "bad_view"),
    ("view=conversations", 400, "bad_view"),
    ("view=", 400, "bad_view"),
])
async def test_bad_view_requests_are_refused(served: Served, query: str, status: int,
                                             code: str) -> None:
    async with http(served) as h:
        await served.broker.create("chat")
        r = await h.get(f"{URL}?{query}")
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


async def test_the_view_of_a_missing_stream_is_not_found(served: Served) -> None:
    async with http(served) as h:
        r = await h.get("/v1/stream/nope", params={"view": "conversation"})
        assert (r.status_code, r.json()["error"]["code"]) == (404, "session_not_found")


# ---------------------------------------------------------------- a real server, restarted

async def post_records(h: httpx.AsyncClient, recs: list[Rec]) -> None:
    """Each record in its own POST, with its kind, meta and publisher (as a
    msgpack records body, which may hold an empty record)."""
    for publisher, d in recs:
        headers = {"content-type": "application/vnd.broker.records+msgpack",
                   "broker-kind": str(d.kind), "broker-meta": json.dumps([d.meta])}
        if publisher is not None:
            headers["broker-client"] = publisher
        r = await h.post(URL, content=msgpack.packb([d.payload]), headers=headers)
        assert r.status_code == 204, r.text


def stop(proc: Any) -> None:
    proc.send_signal(signal.SIGTERM)          # a clean shutdown: actors exit and save
    assert proc.wait(WAIT) == 0


async def test_broker_serve_restarts_from_its_snapshot_and_rebuilds_a_corrupt_one(
        tmp_path: Path) -> None:
    recs = script(24)
    cut = len(recs) // 2
    data = tmp_path / "data"
    path = data / "sessions" / "chat" / CONVO_FILE
    with serving(data) as (proc, port):
        async with http(f"http://127.0.0.1:{port}") as h:
            assert (await h.put(URL)).status_code == 201
            await post_records(h, recs[:cut])
            _, nxt, epoch = await get_view(h)
            assert nxt == cut
            await post_records(h, recs[cut:])
        stop(proc)
    # Viewed once, the fold followed the records and was saved on exit.
    saved_epoch, conv = read_convo_file(path.read_bytes())
    assert (saved_epoch, conv.next) == (epoch, len(recs))
    # Put back a snapshot at ``cut`` (as one saved before a crash would be), with
    # its copy of the first message doctored: if a restarted server shows it,
    # it used the file, and it folded the log after it.
    conv = fold(recs[:cut])
    assert conv.next == cut
    snap = conv.to_snapshot()
    assert snap["items"][0][1] == "u0"
    snap["items"][0][5] = b"doctored"
    path.write_bytes(convo_file(epoch, Conversation.from_snapshot(snap)))
    expected = fold(recs).to_snapshot(text=True)

    with serving(data) as (proc, port):
        async with http(f"http://127.0.0.1:{port}") as h:
            got, nxt, again = await get_view(h)
        stop(proc)
    assert (nxt, again) == (len(recs), epoch)
    assert got["items"][0][5] == "doctored"                 # from the file...
    got["items"][0][5] = expected["items"][0][5]
    assert got == expected                                  # ... and the log after it

    data_bytes = bytearray(path.read_bytes())
    data_bytes[-3] ^= 0xFF                                   # now corrupt it
    path.write_bytes(bytes(data_bytes))
    with serving(data) as (proc, port):
        async with http(f"http://127.0.0.1:{port}") as h:
            got, nxt, _ = await get_view(h)
        stop(proc)
    assert got == expected                                  # folded from the log again
    assert read_convo_file(path.read_bytes())[1].next == len(recs)


async def test_retention_that_overtook_the_fold_shows_in_the_view(tmp_path: Path) -> None:
    recs = script(25, turns=12)
    async with serve_in_process(tmp_path, segment_bytes=4096, retention_bytes=8192,
                                fsync=NEVER) as s, http(s) as h:
        await s.broker.create("chat")
        await publish(s.broker, "chat", recs)
        snap, nxt, _ = await get_view(h)
        start = (await s.broker.info("chat")).start_offset
        assert snap["start"] == start > 0 and nxt == len(recs)
        r = await h.get(URL, params={"offset": "-1", "view": "records"})
        assert r.json()[0]["o"] == start       # a replay from -1 starts where the view does
    assert snap == fold(recs, start=start).to_snapshot(text=True)


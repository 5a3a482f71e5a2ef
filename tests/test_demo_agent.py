"""The simulated agent of ``broker serve --demo`` (broker/_demo.py).

A server runs in the test's own Trio run with a DemoAgent beside it, paced
in milliseconds instead of seconds; the page's side is played over HTTP
(a PUT, POSTs with and without ``Broker-Kind: signal``, long-polls with
``view=records``).  Waits are bounded by generous deadlines, never timed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from broker._demo import AGENT, DemoAgent
from conftest import Served, serve_in_process

JSON = {"content-type": "application/json"}
SIGNAL = {**JSON, "broker-kind": "signal"}
ZERO = "0000000000000000_0000000000000000"
Records = list[dict[str, Any]]


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[tuple[Served, httpx.AsyncClient]]:
    async with serve_in_process(tmp_path / "data") as s:
        async with trio.open_nursery() as n:
            agent = DemoAgent(s.broker, token_s=0.001, think_s=0.001, tool_s=0.01,
                              poll_s=0.01)
            n.start_soon(agent.run)
            async with httpx.AsyncClient(base_url=s.http_url, timeout=30) as c:
                yield s, c
            n.cancel_scope.cancel()


async def read_until(c: httpx.AsyncClient, name: str, done: Callable[[Records], bool],
                     ) -> Records:
    """Every record of ``name`` (long-polling, view=records) once ``done`` holds."""
    records: Records = []
    offset = ZERO
    with trio.fail_after(30):
        while not done(records):
            r = await c.get(f"/v1/stream/{name}",
                            params={"offset": offset, "live": "long-poll", "view": "records"})
            assert r.status_code in (200, 204), r.text
            offset = r.headers["stream-next-offset"]
            if r.status_code == 200:
                records += r.json()
    return records


def types(records: Records) -> list[str]:
    return [r["d"].get("type") for r in records]


def has(kind: str) -> Callable[[Records], bool]:
    return lambda records: kind in types(records)


def replies(records: Records) -> list[str]:
    """The agent's messages, as text."""
    text: dict[str, str] = {}
    for r in records:
        d = r["d"]
        if d.get("type") == "start":
            text[d["id"]] = ""
        elif d.get("type") == "delta":
            text[d["id"]] += d["text"]
    return list(text.values())


async def start_room(c: httpx.AsyncClient, name: str, text: str = "tides") -> None:
    assert (await c.put(f"/v1/stream/{name}", headers=JSON)).status_code == 201
    r = await c.post(f"/v1/stream/{name}", headers=JSON,
                     content=json.dumps({"type": "user", "id": "u1", "text": text}))
    assert r.status_code == 204


@pytest.mark.parametrize("decision,final", [("approve", "Done: I sent the summary"),
                                            ("reject", "I will not send it")])
async def test_a_turn(demo: tuple[Served, httpx.AsyncClient], decision: str,
                      final: str) -> None:
    _, c = demo
    await start_room(c, "demo/a")
    records = await read_until(c, "demo/a", has("approval_request"))
    agent = [r for r in records if r["p"] == AGENT]
    assert all(r["k"] == 0 for r in records)
    assert types(agent)[:2] == ["state", "start"]
    assert agent[0]["d"]["state"] == "thinking"
    start = agent[1]["d"]
    assert (start["role"], start["reply_to"]) == ("assistant", "u1")
    flow = [t for t in types(agent) if t != "delta"]
    assert flow == ["state", "start", "end", "state", "tool_call", "tool_result", "state",
                    "approval_request"]
    assert types(agent).count("delta") > 10
    assert "tides" in replies(records)[0]
    call = next(r["d"] for r in agent if r["d"]["type"] == "tool_call")
    result = next(r["d"] for r in agent if r["d"]["type"] == "tool_result")
    assert (call["name"], call["args"], result["id"]) == ("search", {"query": "tides"},
                                                          call["id"])
    assert [r["d"]["state"] for r in agent if r["d"]["type"] == "state"][1:] == [
        "calling tool search", "awaiting approval"]
    request = agent[-1]["d"]
    assert request["text"] == "Send the summary?"

    r = await c.post("/v1/stream/demo/a", headers=SIGNAL,
                     content=json.dumps({"type": decision, "id": request["id"]}))
    assert r.status_code == 204
    records = await read_until(c, "demo/a", lambda rs: rs[-1:] != [] and rs[-1]["d"] == {
        "type": "state", "state": "idle"})
    signal = next(r for r in records if r["k"] == 1)
    assert signal["d"] == {"type": decision, "id": request["id"]}
    after = records[records.index(signal) + 1:]
    assert [t for t in types(after) if t != "delta"] == ["start", "end", "state"]
    assert final in replies(records)[-1]


async def test_a_signal_for_another_request_is_not_an_answer(
        demo: tuple[Served, httpx.AsyncClient]) -> None:
    s, c = demo
    await start_room(c, "demo/b")
    await read_until(c, "demo/b", has("approval_request"))
    await c.post("/v1/stream/demo/b", headers=SIGNAL,
                 content=json.dumps({"type": "approve", "id": "someone-else"}))
    # The agent read the signal (its next records would follow it) and waits on.
    records = await read_until(c, "demo/b", lambda rs: rs[-1:] != [] and rs[-1]["k"] == 1)
    await trio.testing.wait_all_tasks_blocked()
    assert (await s.broker.info("demo/b")).next_offset == records[-1]["o"] + 1


async def test_cancel_ends_the_turn(demo: tuple[Served, httpx.AsyncClient]) -> None:
    _, c = demo
    await start_room(c, "demo/c")
    await read_until(c, "demo/c", has("approval_request"))
    await c.post("/v1/stream/demo/c", headers=SIGNAL, content=b'{"type":"cancel"}')
    records = await read_until(c, "demo/c", lambda rs: rs[-1:] != [] and rs[-1]["d"].get("state") == "idle")
    assert types(records)[-2:] == ["cancel", "state"]


async def test_it_works_with_nobody_attached(demo: tuple[Served, httpx.AsyncClient]) -> None:
    """The page leaves after sending; the agent carries on; a late reader
    finds the whole turn."""
    s, c = demo
    await start_room(c, "demo/d", "the moon")
    # Nothing reads the session over HTTP or the WebSocket meanwhile: the
    # test looks at its end offset only.
    with trio.fail_after(30):
        while (await s.broker.info("demo/d")).next_offset < 40:
            await trio.sleep(0.01)
    records = await read_until(c, "demo/d", has("approval_request"))
    assert "the moon" in replies(records)[0]


async def test_two_messages_are_answered_in_turn(
        demo: tuple[Served, httpx.AsyncClient]) -> None:
    _, c = demo
    await start_room(c, "demo/e", "first")
    await c.post("/v1/stream/demo/e", headers=JSON,
                 content=json.dumps({"type": "user", "id": "u2", "text": "second"}))
    records = await read_until(c, "demo/e", has("approval_request"))
    rid = records[-1]["d"]["id"]
    await c.post("/v1/stream/demo/e", headers=SIGNAL,
                 content=json.dumps({"type": "reject", "id": rid}))
    records = await read_until(
        c, "demo/e", lambda rs: types(rs).count("approval_request") == 2)
    starts = [r["d"].get("reply_to") for r in records if r["d"]["type"] == "start"]
    assert starts == ["u1", None, "u2"]


async def test_sessions_outside_demo_are_left_alone(
        demo: tuple[Served, httpx.AsyncClient]) -> None:
    s, c = demo
    for name, ct in (("chat/x", JSON), ("demo/bytes", {"content-type": "text/plain"})):
        await c.put(f"/v1/stream/{name}", headers=ct)
        await c.post(f"/v1/stream/{name}", headers=ct,
                     content=b'{"type":"user","id":"u1","text":"hi"}')
    await start_room(c, "demo/f")      # answered, so the others were looked at too
    await read_until(c, "demo/f", has("approval_request"))
    assert (await s.broker.info("chat/x")).next_offset == 1
    assert (await s.broker.info("demo/bytes")).next_offset == 1


async def test_after_a_restart_only_unanswered_messages_are_answered(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with serve_in_process(data) as s:
        await s.broker.create("demo/r", content_type="application/json")
        await s.broker.append_many("demo/r", [
            b'{"type":"user","id":"u1","text":"old"}',
            b'{"type":"start","id":"m1","role":"assistant","reply_to":"u1"}',
            b'{"type":"user","id":"u2","text":"pending"}'])
    async with serve_in_process(data) as s:
        async with trio.open_nursery() as n:
            n.start_soon(DemoAgent(s.broker, token_s=0.001, think_s=0.001, tool_s=0.01,
                                   poll_s=0.01).run)
            await s.broker.info("demo/r")   # open it, as a page coming back would
            async with httpx.AsyncClient(base_url=s.http_url, timeout=30) as c:
                records = await read_until(c, "demo/r", has("approval_request"))
            n.cancel_scope.cancel()
    starts = [r["d"].get("reply_to") for r in records if r["d"]["type"] == "start"]
    assert starts == ["u1", "u2"]

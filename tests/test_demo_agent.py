"""The simulated agent of ``broker serve --demo`` (broker/_demo.py).

A server runs in the test's own Trio run with a DemoAgent beside it, paced
in milliseconds instead of seconds; the page's side is played over HTTP in
the AI message model (docs/ai.md): a PUT, user messages as ``start`` records
with an outcome, signals with ``{signal, id, ref, approved}`` meta, reads by
long-poll with ``view=records``, folded with ``Conversation``.  Waits are
bounded by generous deadlines, never timed.
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

from broker._convo import Conversation, Encoder, ToolCall
from broker._demo import AGENT, DemoAgent
from conftest import Served, serve_in_process

JSON = {"content-type": "application/json"}
NAMES = {1: "signal", 2: "start", 3: "delta", 4: "end", 5: "tool_call", 6: "tool_result",
         7: "state"}
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


def fold(records: Records) -> Conversation:
    conv = Conversation(json=True)
    for r in records:
        assert conv.apply_view_record(r) is None, r     # the agent writes nothing skipped
    return conv


def types(records: Records) -> list[str]:
    return [NAMES.get(r["k"], str(r["k"])) for r in records]


def states(records: Records) -> list[str]:
    return [r["m"]["state"] for r in records if r["k"] == 7]


def pending(records: Records) -> bool:
    """The agent waits for an approval (and has said so)."""
    view = fold(records).view()
    return bool(view.pending_approvals) and view.state is not None \
        and view.state.state == "awaiting_approval"


def idle(records: Records) -> bool:
    return records[-1:] != [] and records[-1]["k"] == 7 and records[-1]["m"]["state"] == "idle"


def replies(records: Records) -> list[str]:
    """The agent's messages, as text."""
    return [m.text for m in fold(records).view().messages if m.role == "assistant"]


async def post(c: httpx.AsyncClient, name: str, kind: int, meta: dict[str, Any],
               text: str = "") -> None:
    r = await c.post(f"/v1/stream/{name}", content=json.dumps([text]),
                     headers={**JSON, "broker-kind": str(kind), "broker-meta": json.dumps([meta])})
    assert r.status_code == 204, r.text


async def say(c: httpx.AsyncClient, name: str, text: str, id: str) -> None:
    await post(c, name, 2, {"id": id, "role": "user", "outcome": "complete"}, text)


async def start_room(c: httpx.AsyncClient, name: str, text: str = "tides") -> None:
    assert (await c.put(f"/v1/stream/{name}", headers=JSON)).status_code == 201
    await say(c, name, text, "u1")


def waiting_call(records: Records) -> ToolCall:
    (call,) = fold(records).view().pending_approvals
    return call


@pytest.mark.parametrize("approved,final", [(True, "Done: I sent the summary"),
                                            (False, "I will not send it")])
async def test_a_turn(demo: tuple[Served, httpx.AsyncClient], approved: bool,
                      final: str) -> None:
    _, c = demo
    await start_room(c, "demo/a")
    records = await read_until(c, "demo/a", pending)
    agent = [r for r in records if r["p"] == AGENT]
    flow = [t for t in types(agent) if t != "delta"]
    assert flow == ["state", "start", "state", "end", "tool_call", "state", "tool_result",
                    "tool_call", "state"]
    assert states(agent) == ["thinking", "writing", "tool", "awaiting_approval"]
    assert types(agent).count("delta") > 10
    view = fold(records).view()
    user, reply = view.messages
    assert (user.role, user.text, reply.role, reply.reply_to) == ("user", "tides", "assistant",
                                                                 "u1")
    assert "tides" in reply.text and reply.outcome == "complete"
    search, send = view.tool_calls
    assert (search.name, json.loads(search.args), search.message) == (
        "search", {"query": "tides"}, reply.id)
    assert search.outcome == "complete" and json.loads(search.result or b"")[0]["title"]
    assert (send.name, send.approval, send.open) == ("send_summary", True, True)
    assert view.state is not None and (view.state.state, view.state.ref) == (
        "awaiting_approval", send.id)

    await post(c, "demo/a", 1, {"signal": "approve", "id": "s1", "ref": send.id,
                                "approved": approved})
    records = await read_until(c, "demo/a", idle)
    signal = next(r for r in records if r["k"] == 1)
    after = records[records.index(signal) + 1:]
    assert [t for t in types(after) if t != "delta"] == [
        "tool_result", "start", "state", "end", "state"]
    view = fold(records).view()
    assert view.tool_calls[1].approved is approved
    assert view.tool_calls[1].outcome == ("complete" if approved else "cancelled")
    assert final in replies(records)[-1]


async def test_a_signal_for_another_call_is_not_an_answer(
        demo: tuple[Served, httpx.AsyncClient]) -> None:
    s, c = demo
    await start_room(c, "demo/b")
    await read_until(c, "demo/b", pending)
    await post(c, "demo/b", 1, {"signal": "approve", "id": "s1", "ref": "someone-else",
                                "approved": True})
    # The agent read the signal (its next records would follow it) and waits on.
    records = await read_until(c, "demo/b", lambda rs: rs[-1:] != [] and rs[-1]["k"] == 1)
    await trio.testing.wait_all_tasks_blocked()
    assert (await s.broker.info("demo/b")).next_offset == records[-1]["o"] + 1


async def test_cancel_ends_the_turn(demo: tuple[Served, httpx.AsyncClient]) -> None:
    _, c = demo
    await start_room(c, "demo/c")
    await read_until(c, "demo/c", pending)
    await post(c, "demo/c", 1, {"signal": "cancel", "id": "s1"})
    records = await read_until(c, "demo/c", idle)
    assert types(records)[-3:] == ["signal", "tool_result", "state"]
    view = fold(records).view()
    assert view.tool_calls[-1].outcome == "cancelled"
    assert view.tool_calls[-1].cancel == view.signals[0].offset


async def test_cancel_stops_a_message_mid_stream(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path / "data") as s:
        async with trio.open_nursery() as n:
            n.start_soon(DemoAgent(s.broker, token_s=0.05, think_s=0.001, tool_s=0.01,
                                   poll_s=0.01).run)
            async with httpx.AsyncClient(base_url=s.http_url, timeout=30) as c:
                await start_room(c, "demo/s")
                await read_until(c, "demo/s", lambda rs: "delta" in types(rs))
                await post(c, "demo/s", 1, {"signal": "cancel", "id": "s1"})
                records = await read_until(c, "demo/s", idle)
            n.cancel_scope.cancel()
    reply = fold(records).view().messages[1]
    assert reply.outcome == "cancelled" and reply.cancel is not None
    assert "tool_call" not in types(records)


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
    records = await read_until(c, "demo/d", pending)
    assert "the moon" in replies(records)[0]


async def test_two_messages_are_answered_in_turn(
        demo: tuple[Served, httpx.AsyncClient]) -> None:
    _, c = demo
    await start_room(c, "demo/e", "first")
    await say(c, "demo/e", "second", "u2")
    records = await read_until(c, "demo/e", pending)
    await post(c, "demo/e", 1, {"signal": "reject", "id": "s1", "ref": waiting_call(records).id})
    records = await read_until(
        c, "demo/e", lambda rs: len(fold(rs).view().tool_calls) == 4 and pending(rs))
    replies_to = [m.reply_to for m in fold(records).view().messages if m.role == "assistant"]
    assert replies_to == ["u1", None, "u2"]


async def test_sessions_outside_demo_are_left_alone(
        demo: tuple[Served, httpx.AsyncClient]) -> None:
    s, c = demo
    await c.put("/v1/stream/chat/x", headers=JSON)
    await say(c, "chat/x", "hi", "u1")
    await c.put("/v1/stream/demo/bytes", headers={"content-type": "text/plain"})
    r = await c.post("/v1/stream/demo/bytes", content=b"hi",
                     headers={"content-type": "text/plain", "broker-kind": "2",
                              "broker-meta": '[{"id":"u1","role":"user","outcome":"complete"}]'})
    assert r.status_code == 204, r.text
    await start_room(c, "demo/f")      # answered, so the others were looked at too
    await read_until(c, "demo/f", pending)
    assert (await s.broker.info("chat/x")).next_offset == 1
    assert (await s.broker.info("demo/bytes")).next_offset == 1


async def test_after_a_restart_only_unanswered_messages_are_answered(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with serve_in_process(data) as s:
        await s.broker.create("demo/r", content_type="application/json")
        for draft, publisher in [
                (Encoder(json=True).message("u1", "user", "old"), "me"),
                (Encoder(json=True).start("m1", "assistant", reply_to="u1"), AGENT),
                (Encoder(json=True).message("u2", "user", "pending"), "me")]:
            await s.broker.publish("demo/r", [draft.payload], kind=draft.kind,
                                   publisher=publisher, metas=[draft.meta])
    async with serve_in_process(data) as s:
        async with trio.open_nursery() as n:
            n.start_soon(DemoAgent(s.broker, token_s=0.001, think_s=0.001, tool_s=0.01,
                                   poll_s=0.01).run)
            await s.broker.info("demo/r")   # open it, as a page coming back would
            async with httpx.AsyncClient(base_url=s.http_url, timeout=30) as c:
                records = await read_until(c, "demo/r", pending)
            n.cancel_scope.cancel()
    replies_to = [m.reply_to for m in fold(records).view().messages if m.role == "assistant"]
    assert replies_to == ["u1", "u2"]

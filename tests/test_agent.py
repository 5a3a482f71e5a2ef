"""broker.agent and the client's AI-model side, against a real server.

Every test runs the server in this process (conftest.serve_in_process) and
talks to it over real sockets, each party (the agent, a user's device, a
watcher) on a client of its own, as on different machines.  What is checked
is what issue 7 promises: a cancel stops the agent within one delta batch
and every device sees the message end ``cancelled``; an approval from one
device unblocks a tool call another watches; a late joiner gets the same
conversation as a live watcher, from a view instead of every delta; every
device ends with the log's conversation through thousands of cuts; and
batching sends fewer records than tokens.  No assertion is about time:
waits are bounded, and "within one batch" is counted in records.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio

from broker import _convo
from broker._convo import View
from broker.agent import Agent, Incoming, anthropic_text, openai_text, plain_text
from broker.client import (Backoff, ClientError, Conversation, Record, Session, State,
                           connect)
from _proxy import Proxy
from _serveproc import serving
from conftest import Served

FAST = Backoff(initial=0.001, maximum=0.01)
CUTS = Backoff(initial=0.0005, maximum=0.002)     # reconnect at once: cuts come fast
WAIT = 30            # seconds: a bound on waits that should take milliseconds


# ---------------------------------------------------------------- helpers

async def tokens(n: int, *, pause: float = 0.0, word: str = "tok") -> AsyncIterator[str]:
    """A fake model: ``n`` tokens (forever if n < 0), ``pause`` seconds apart."""
    for i in itertools.count() if n < 0 else range(n):
        await trio.sleep(pause)
        yield f"{word}{i} "


async def records_of(served: Served, name: str) -> list[Record]:
    """Every record of the log, read by a client of its own from offset -1."""
    end = (await served.broker.info(name)).next_offset
    out: list[Record] = []
    if end == 0:
        return out
    async with connect(served.ws_url) as c, c.session(name).subscribe("-1") as sub:
        with trio.fail_after(WAIT):
            async for record in sub:
                out.append(record)
                if record.offset + 1 >= end:
                    break
    return out


async def log_view(served: Served, name: str, json: bool = False) -> View:
    """The log's conversation: a fold of every record, from the start."""
    fold = _convo.Conversation(json=json)
    for record in await records_of(served, name):
        fold.apply_record(record)
    return fold.view()


async def caught_up(convo: Conversation, served: Served, name: str) -> View:
    """The conversation's view once it has folded the whole log."""
    end = (await served.broker.info(name)).next_offset
    with trio.fail_after(WAIT):
        return await convo.wait(lambda v: v.next >= end)


def messages(view: View) -> list[tuple[str, str, str | None]]:
    return [(m.role, m.text, m.outcome) for m in view.messages]


# ---------------------------------------------------------------- streaming

@pytest.mark.parametrize("window", [0.0, 0.03])
async def test_stream_batches_tokens_into_fewer_records(served: Served, window: float) -> None:
    """A burst of 300 tokens (an SDK stream often hands over several per
    read): with a window, a handful of delta records; without, one each."""
    async with connect(served.ws_url, client_id="agent") as c:
        async with Agent(c.session("chat/1"), create=True, window=window) as agent:
            reply = await agent.stream(tokens(300), reply_to="q1")
    assert (reply.outcome, reply.tokens) == ("complete", 300)
    assert reply.text == "".join(f"tok{i} " for i in range(300))
    records = await records_of(served, "chat/1")
    mine = [r for r in records if isinstance(r.meta, dict) and r.meta.get("id") == reply.id]
    assert [r.kind for r in mine[:1] + mine[-1:]] == [2, 4]
    deltas = [r for r in mine if r.kind == 3]
    assert reply.records == len(mine)
    if window:
        # What batching saves: records not sent, one per token otherwise.
        assert len(deltas) < 300 // 5, len(deltas)
        print(f"300 tokens in a burst: {reply.records} records (start, {len(deltas)} "
              f"deltas, end): {300 + 2 - reply.records} saved")
    else:
        assert len(deltas) == 300 and reply.records == 302
    assert mine[0].meta == {"id": reply.id, "role": "assistant", "reply_to": "q1"}
    assert mine[-1].meta == {"id": reply.id, "outcome": "complete"}
    assert b"".join(r.payload for r in mine).decode() == reply.text
    assert [r.offset for r in mine] == [o.start for o in reply.offsets if o is not None]
    view = await log_view(served, "chat/1")
    assert messages(view) == [("assistant", reply.text, "complete")]
    # The agent said what it was doing, and idle once it left.
    assert [s.state for s in view.states] == ["idle"]


async def test_paced_tokens_are_batched_by_the_window(served: Served) -> None:
    """Tokens 2 ms apart with a 30 ms window: each record holds several."""
    async with connect(served.ws_url, client_id="agent") as c:
        async with Agent(c.session("chat/1"), create=True) as agent:
            reply = await agent.stream(tokens(100, pause=0.002))
    assert reply.outcome == "complete" and reply.tokens == 100
    assert reply.records < reply.tokens // 2, reply.records
    print(f"100 tokens 2 ms apart: {reply.records} records")


async def test_a_failing_model_ends_the_message_with_error(served: Served) -> None:
    async def broken() -> AsyncIterator[str]:
        yield "Hel"
        yield "lo"
        raise ConnectionError("the model went away")

    async with connect(served.ws_url, client_id="agent") as c:
        async with Agent(c.session("chat/1"), create=True) as agent:
            with pytest.raises(ConnectionError):
                await agent.stream(broken())
    (m,) = (await log_view(served, "chat/1")).messages
    assert (m.text, m.outcome, m.error) == ("Hello", "error",
                                            "ConnectionError: the model went away")


def test_text_of_sdk_events() -> None:
    class O:
        def __init__(self, **kw: Any) -> None:
            self.__dict__.update(kw)

    chunk = O(choices=[O(delta=O(content="Hi"))])
    assert openai_text(chunk) == "Hi"
    assert openai_text(O(choices=[])) is None
    assert openai_text(O(choices=[O(delta=O(content=None))])) is None
    assert openai_text(O(type="response.output_text.delta", delta="yo")) == "yo"
    assert openai_text(O(type="response.completed")) is None
    event = O(type="content_block_delta", delta=O(type="text_delta", text="Bonjour"))
    assert anthropic_text(event) == "Bonjour"
    assert anthropic_text(O(type="content_block_delta", delta=O(type="input_json_delta",
                                                                partial_json="{"))) is None
    assert anthropic_text("plain") == openai_text("plain") == plain_text("plain") == "plain"
    with pytest.raises(TypeError, match="text="):
        plain_text(chunk)


# ---------------------------------------------------------------- cancel

async def test_cancel_mid_message_stops_within_one_batch(served: Served) -> None:
    """The model never stops; a user's device cancels the message once it
    has seen three deltas.  The agent stops: after the cancel's offset the
    log holds at most one delta of the message (the batch already on its
    way), then its end, ``cancelled``, and both devices see that end."""
    name = "chat/1"
    window = 0.2           # long beside a localhost round trip: "one batch" is what is counted
    async with connect(served.ws_url, client_id="agent") as a, \
            connect(served.ws_url, client_id="phone") as b, \
            connect(served.ws_url, client_id="laptop") as w:
        async with Agent(a.session(name), create=True, window=window) as agent, \
                b.session(name).conversation() as phone, \
                w.session(name).conversation() as laptop:
            result: list[Any] = []

            async def run() -> None:
                result.append(await agent.stream(tokens(-1, pause=0.002)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                with trio.fail_after(WAIT):
                    view = await phone.wait(      # a few deltas in
                        lambda v: v.messages and v.next - v.messages[0].offset > 4)
                cancel_at = await b.session(name).cancel("stop", ref=view.messages[0].id)
            (reply,) = result
            assert reply.outcome == "cancelled" and reply.cancel == cancel_at
            for device in (phone, laptop):
                with trio.fail_after(WAIT):
                    seen = await device.wait(lambda v: not v.messages[0].open)
                m = seen.messages[0]
                assert (m.outcome, m.cancel, m.text) == ("cancelled", cancel_at, reply.text)
    records = await records_of(served, name)
    after = [r for r in records if r.offset > cancel_at and r.meta.get("id") == reply.id]
    assert [r.kind for r in after][-1] == 4 and [r.kind for r in after].count(3) <= 1
    assert after[-1].meta == {"id": reply.id, "outcome": "cancelled"}


async def test_a_run_cancel_stops_a_running_tool(served: Served) -> None:
    """A cancel without ref stops whatever runs: here a tool that would
    never return; its result is ``cancelled``."""
    started = trio.Event()

    async def forever(args: Any) -> None:
        started.set()
        await trio.sleep_forever()

    async with connect(served.ws_url, client_id="agent") as a, \
            connect(served.ws_url, client_id="phone") as b:
        async with Agent(a.session("chat/1"), create=True) as agent:
            async with trio.open_nursery() as nursery:
                result: list[Any] = []

                async def call() -> None:
                    result.append(await agent.tool_call("wait", {"s": 1}, run=forever))

                nursery.start_soon(call)
                with trio.fail_after(WAIT):
                    await started.wait()
                at = await b.session("chat/1").cancel("enough")
    (done,) = result
    assert (done.outcome, done.cancel, done.result) == ("cancelled", at, None)
    (call_,) = (await log_view(served, "chat/1")).tool_calls
    assert (call_.outcome, call_.cancel, call_.args) == ("cancelled", at, b'{"s":1}')


async def test_cancels_of_other_items_or_malformed_are_not_acted_on(served: Served) -> None:
    """While a tool runs, cancels that name an ended message, an unknown
    item, or that the fold would skip (a ``ref`` that is not a string) leave
    it running; an input sent after them shows they were all handled."""
    async with connect(served.ws_url, client_id="agent") as a, \
            connect(served.ws_url, client_id="phone") as b:
        phone = b.session("chat/1")
        async with Agent(a.session("chat/1"), create=True) as agent:
            first = await agent.stream(["Hi"])

            async def run(args: Any) -> str:
                await phone.cancel(ref=first.id)
                await phone.cancel(ref="m_unknown")
                await phone.signal(b"", type="cancel", meta={"ref": 5})
                await phone.input("go on")
                return (await agent.receive()).text     # the watch got past them all

            call = await agent.tool_call("t", None, run=run)
    assert (first.outcome, call.outcome, call.result) == ("complete", "complete", "go on")
    view = await log_view(served, "chat/1")
    assert view.anomalies == (("bad_meta", 1), ("unknown_ref", 1))


# ---------------------------------------------------------------- approvals

@pytest.mark.parametrize("approved", [True, False])
async def test_an_approval_from_another_device_unblocks_a_tool_call(
        served: Served, approved: bool) -> None:
    """Device A watches the conversation and sees the call wait for
    approval; device B answers it; the agent runs the tool (or, rejected,
    does not) and A sees the result."""
    name = "chat/1"
    ran: list[Any] = []

    async def lookup(args: Any) -> dict[str, Any]:
        ran.append(args)
        await trio.sleep(0)
        return {"high": "06:12", "port": args["port"]}

    await served.broker.create(name)
    async with connect(served.ws_url, client_id="agent") as ag, \
            connect(served.ws_url, client_id="device-a") as a, \
            connect(served.ws_url, client_id="device-b") as b, \
            a.session(name).conversation() as watcher:
        async with Agent(ag.session(name)) as agent:
            result: list[Any] = []

            async def call() -> None:
                result.append(await agent.tool_call("tides", {"port": "Brest"}, run=lookup,
                                                    approval=True, message="m_1"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                with trio.fail_after(WAIT):
                    view = await watcher.wait(lambda v: v.pending_approvals and v.state
                                              and v.state.state == "awaiting_approval")
                (pending,) = view.pending_approvals
                assert (pending.name, pending.args, pending.message) == (
                    "tides", b'{"port":"Brest"}', "m_1")
                assert view.state is not None and view.state.ref == pending.id
                assert ran == []                               # it waits
                decided_at = await b.session(name).approve(pending.id, approved=approved,
                                                            note="ok" if approved else "no")
            with trio.fail_after(WAIT):
                seen = await watcher.wait(lambda v: not v.tool_calls[0].open)
        # The agent has left (and said ``idle``): the watcher ends with the log.
        assert await caught_up(watcher, served, name) == await log_view(served, name)
    (done,) = result
    (c,) = seen.tool_calls
    assert (c.approved, c.decided) == (approved, decided_at)
    if approved:
        assert ran == [{"port": "Brest"}]
        assert (done.outcome, done.result, done.approved) == (
            "complete", {"high": "06:12", "port": "Brest"}, True)
        assert (c.outcome, c.result) == ("complete", b'{"high":"06:12","port":"Brest"}')
        assert c.result_publisher == "agent"
    else:
        assert ran == []
        assert (done.outcome, done.approved, c.outcome) == ("cancelled", False, "cancelled")
    assert done.note == ("ok" if approved else "no")


async def test_tool_errors_are_results_not_exceptions(served: Served) -> None:
    def broken(args: Any) -> Any:
        raise KeyError("port")

    async with connect(served.ws_url, client_id="agent") as c:
        async with Agent(c.session("chat/1"), create=True) as agent:
            failed = await agent.tool_call("broken", None, run=broken)
            odd = await agent.tool_call("odd", [1], run=lambda args: {1, 2})   # not JSON
            fine = await agent.tool_call("sync", [1, 2], run=lambda args: sum(args))
    assert (failed.outcome, failed.error, type(failed.exception)) == (
        "error", "KeyError: 'port'", KeyError)
    assert odd.outcome == "error" and "not JSON serializable" in (odd.error or "")
    assert (fine.outcome, fine.result) == ("complete", 3)
    calls = (await log_view(served, "chat/1")).tool_calls
    assert [(t.name, t.outcome, t.result) for t in calls] == [
        ("broken", "error", b"null"), ("odd", "error", b"null"), ("sync", "complete", b"3")]


# ---------------------------------------------------------------- turns

async def test_the_agent_hears_messages_and_input_not_its_own(served: Served) -> None:
    name = "chat/1"
    async with connect(served.ws_url, client_id="agent") as a, \
            connect(served.ws_url, client_id="phone") as b:
        async with Agent(a.session(name), create=True) as agent:
            phone = b.session(name)
            mid = await phone.send_message("What is the tide?")
            first = await agent.receive()
            await agent.stream(["Let me see."], reply_to=mid)
            await phone.input("Brest, please", ref=mid)
            await phone.signal(b"raw", type="custom")
            second, third = await agent.receive(), await agent.receive()
    assert (first.type, first.text, first.id, first.role, first.publisher) == (
        "message", "What is the tide?", mid, "user", "phone")
    assert (second.type, second.text, second.ref) == ("input", "Brest, please", mid)
    assert (third.type, third.text) == ("custom", "raw")
    assert isinstance(first, Incoming) and first.is_message and not second.is_message


async def test_the_agent_resumes_from_a_saved_offset(served: Served) -> None:
    """Messages sent while no agent was attached are heard by one that
    starts from where the last one stopped."""
    async with connect(served.ws_url, client_id="phone") as b:
        phone = b.session("chat/1")
        await phone.send_message("first", create=True)
        async with connect(served.ws_url, client_id="agent") as a:
            async with Agent(a.session("chat/1"), since="-1") as agent:
                turn = await agent.receive()
        await phone.send_message("while away")
        async with connect(served.ws_url, client_id="agent") as a:
            async with Agent(a.session("chat/1"), since=turn.offset + 1) as agent:
                later = await agent.receive()
    assert (turn.text, later.text) == ("first", "while away")


# ---------------------------------------------------------------- reading

async def test_a_late_joiner_sees_what_a_live_watcher_saw(served: Served) -> None:
    """A watcher folds every record as it comes; a device that joins when
    it is over gets the same conversation from the broker's view, having
    folded far fewer records (measured)."""
    name = "chat/1"
    await served.broker.create(name)
    async with connect(served.ws_url, client_id="agent") as a, \
            connect(served.ws_url, client_id="phone") as b, \
            connect(served.ws_url, client_id="live") as w:
        async with w.session(name).conversation() as live:
            async with Agent(a.session(name), window=0.0) as agent:
                phone = b.session(name)
                mid = await phone.send_message("Tell me a story")
                await agent.receive()
                await agent.state("thinking")
                reply = await agent.stream(tokens(400), reply_to=mid)
                await agent.tool_call("save", {"title": "story"}, run=lambda args: True)
                await phone.input("thanks")
            watched = await caught_up(live, served, name)
    async with connect(served.ws_url, client_id="late") as late_client:
        async with late_client.session(name).conversation() as late:
            joined = await caught_up(late, served, name)
    assert joined == watched == await log_view(served, name)
    assert messages(joined) == [("user", "Tell me a story", "complete"),
                                ("assistant", reply.text, "complete")]
    assert live.records >= 400 and live.views in (0, 1)
    if late.views:                # the broker sent the conversation whole
        assert late.records < 10, late.records
    print(f"live watcher folded {live.records} records; the late joiner "
          f"{late.records} after {late.views} view(s)")


@pytest.mark.parametrize("transport", ["sse", "longpoll"])
async def test_the_agent_and_a_reader_over_http(served: Served, transport: str) -> None:
    """Over HTTP there is no view: the reader folds the log from its start,
    and ends with the same conversation; the agent works the same."""
    name = "chat/1"
    await served.broker.create(name)
    async with connect(served.ws_url, client_id="agent", transports=(transport,)) as a, \
            connect(served.ws_url, client_id="phone", transports=(transport,)) as b:
        async with b.session(name).conversation() as convo:
            async with Agent(a.session(name)) as agent:
                mid = await b.session(name).send_message("hi")
                turn = await agent.receive()
                reply = await agent.stream(tokens(50), reply_to=turn.id)
                call = await agent.tool_call("echo", [1], run=lambda x: x)
            view = await caught_up(convo, served, name)
    assert (a.transport, convo.views) == (transport, 0)
    assert turn.id == mid and reply.outcome == "complete" and call.result == [1]
    assert view == await log_view(served, name)
    assert messages(view) == [("user", "hi", "complete"), ("assistant", reply.text, "complete")]


async def test_a_conversation_follows_a_session_created_again(served: Served) -> None:
    """Deleted and created again while the reader was cut off: on its return
    the epoch has changed, and it folds the new session from its start."""
    async with Proxy.running(served.port) as proxy, \
            connect(proxy.url, client_id="w", backoff=FAST) as w:
        s = w.session("chat/1")
        await s.send_message("before", create=True)
        async with s.conversation() as convo:
            with trio.fail_after(WAIT):
                await convo.wait(lambda v: v.messages)
            proxy.refuse = True
            proxy.cut()
            await served.broker.delete("chat/1")
            await served.broker.create("chat/1")
            await served.broker.publish("chat/1", [b"after"], kind=2,
                                        metas=[{"id": "m_2", "role": "user",
                                                "outcome": "complete"}])
            proxy.refuse = False
            with trio.fail_after(WAIT):
                view = await convo.wait(lambda v: [m.text for m in v.messages] == ["after"])
    assert messages(view) == [("user", "after", "complete")]


async def test_a_conversation_of_a_deleted_session_ends(served: Served) -> None:
    async with connect(served.ws_url) as c:
        s = c.session("chat/1")
        await s.send_message("gone soon", create=True)
        async with s.conversation() as convo:
            with trio.fail_after(WAIT):
                await convo.wait(lambda v: v.messages)
            await served.broker.delete("chat/1")
            with trio.fail_after(WAIT), pytest.raises(ClientError) as e:
                await convo.wait(lambda v: False)
    assert e.value.code == "deleted"


async def test_a_conversation_of_a_closed_session_ends(served: Served) -> None:
    """Once a closed session is read to its end, a wait that can no longer
    come true raises ``session_closed`` instead of waiting for ever."""
    async with connect(served.ws_url) as c:
        s = c.session("chat/1")
        await s.send_message("last words", create=True)
        await served.broker.close_session("chat/1")
        async with s.conversation() as convo:
            with trio.fail_after(WAIT), pytest.raises(ClientError) as e:
                await convo.wait(lambda v: len(v.messages) > 1)
    assert e.value.code == "session_closed"
    assert messages(convo.view()) == [("user", "last words", "complete")]


# ---------------------------------------------------------------- JSON sessions

@pytest.mark.parametrize("transport", ["ws", "longpoll"])
async def test_signals_messages_and_the_agent_on_a_json_session(served: Served,
                                                                transport: str) -> None:
    """Text payloads are JSON strings in a JSON session (docs/ai.md,
    "Payloads"): the typed signals are no longer refused there, and the
    agent and the reader learn the rule by themselves."""
    await served.broker.create("chat/j", content_type="application/json")
    async with connect(served.ws_url, client_id="agent", transports=(transport,)) as a, \
            connect(served.ws_url, client_id="phone", transports=(transport,)) as b:
        phone = b.session("chat/j")
        assert await phone.is_json() is True
        async with Agent(a.session("chat/j")) as agent:
            mid = await phone.send_message('say "hi"')
            turn = await agent.receive()
            reply = await agent.stream(["4", "2", ' "ok"'], reply_to=mid)
            at = await phone.cancel()                       # an empty reason: once refused
            await phone.input("42")                         # valid JSON as raw text, too
            heard = await agent.receive()
        async with phone.conversation() as convo:
            view = await caught_up(convo, served, "chat/j")
    assert turn.text == 'say "hi"' and heard.text == "42"
    assert messages(view) == [("user", 'say "hi"', "complete"),
                              ("assistant", '42 "ok"', "complete")]
    assert reply.outcome == "complete" and at is not None
    assert [(s.type, s.text) for s in view.signals] == [("cancel", ""), ("input", "42")]
    assert view.anomalies == ()
    assert view == await log_view(served, "chat/j", json=True)


async def test_the_payload_rule_can_be_given(served: Served) -> None:
    await served.broker.create("chat/j", content_type="application/json")
    async with connect(served.ws_url) as c:
        told = c.session("chat/j", json=False)        # wrong on purpose: the broker refuses
        with pytest.raises(ClientError) as e:
            await told.cancel()
        assert e.value.code == "bad_payload"
        assert await c.session("chat/j", json=True).cancel() is not None


# ---------------------------------------------------------------- refusals

async def test_refusals(served: Served) -> None:
    async with connect(served.ws_url) as c:
        s = c.session("chat/none")
        with pytest.raises(ValueError, match="ref"):
            await s.approve()
        with pytest.raises(ClientError) as e:
            async with Agent(s):                       # no such session, and no create
                pass                                                   # pragma: no cover
        assert e.value.code == "session_not_found"
        agent = Agent(c.session("chat/1"), create=True)
        with pytest.raises(RuntimeError, match="async with"):
            await agent.stream(["x"])
        async with agent:
            with pytest.raises(ValueError):
                await agent.tool_call("x", float("nan"), run=lambda a: a)     # not JSON
            with pytest.raises(ValueError):
                await agent.state("")
        with pytest.raises(RuntimeError, match="async with"):
            await agent.receive()
        with pytest.raises(ValueError):
            Agent(c.session("chat/1"), window=-1)
        sub = c.session("chat/1").subscribe("now")
        await sub.aclose()
        with pytest.raises(ClientError) as e:
            await sub.attached()
        assert e.value.code == "subscription_closed"
        async with c.session("chat/1").stream_message() as m:
            pass
        with pytest.raises(ClientError) as e:
            await m.append("late")
        assert e.value.code == "stream_ended"


# ---------------------------------------------------------------- cuts

async def scripted_conversation(agent: Agent, phone: Session, convo: Conversation,
                                turns: int) -> None:
    """User asks; the agent answers, asks to run a tool, the phone approves,
    the agent answers again, and the phone cancels that answer."""

    async def agent_side() -> None:
        for _ in range(turns):
            turn = await agent.receive()
            await agent.state("thinking")
            first = await agent.stream(tokens(100, pause=0.001, word="a"), reply_to=turn.id)
            call = await agent.tool_call("look", {"q": turn.text}, run=lambda a: a["q"],
                                         approval=True, message=first.id)
            assert call.ok
            second = await agent.stream(tokens(-1, pause=0.001, word="b"), reply_to=turn.id)
            assert second.cancelled

    async def phone_side() -> None:
        for t in range(turns):
            await phone.send_message(f"question {t}")
            view = await convo.wait(lambda v: v.pending_approvals)
            await phone.approve(view.pending_approvals[0].id)
            view = await convo.wait(lambda v: len(v.messages) == 3 * (t + 1)
                                    and len(v.messages[-1].data) > 300)
            await phone.cancel(ref=view.messages[-1].id)
            await convo.wait(lambda v: not v.messages[-1].open)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent_side)
        nursery.start_soon(phone_side)


TURNS = 8


@pytest.mark.parametrize("seed", range(2))
async def test_random_cuts_every_device_ends_with_the_log(served: Served, seed: int) -> None:
    """Every connection (the agent's, the phone's, a watcher's) goes through
    a proxy that cuts them all at random moments, over a thousand times, while
    a scripted conversation runs.  Every device ends with the conversation a
    fold of the log gives, and the log holds each record once."""
    rng = random.Random(seed)
    name = "chat/1"
    await served.broker.create(name)
    links = dict(backoff=CUTS, transports=("ws",))     # reconnects, not a fallback to HTTP
    async with Proxy.running(served.port) as proxy, \
            connect(proxy.url, client_id="agent", rng=random.Random(seed), **links) as a, \
            connect(proxy.url, client_id="phone", **links) as b, \
            connect(proxy.url, client_id="watch", **links) as w:
        done = trio.Event()

        async def cutter() -> None:
            # Each cut comes a random moment after every link is up again,
            # so the conversation moves on between cuts.
            while not done.is_set():
                for c in (a, b, w):
                    await c.wait_for(State.CONNECTED)
                await trio.sleep(rng.uniform(0, 0.003))
                proxy.cut()

        async with Agent(a.session(name), window=0.005) as agent, \
                b.session(name).conversation() as phone_view, \
                w.session(name).conversation() as watcher:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cutter)
                with trio.fail_after(120):
                    await scripted_conversation(agent, b.session(name), phone_view, TURNS)
                done.set()
            log = await log_view(served, name)
            for convo in (phone_view, watcher):
                assert await caught_up(convo, served, name) == log
    assert proxy.cuts >= 1000, proxy.cuts
    assert log.anomalies == ()                       # nothing twice, nothing out of place
    assert [(m.role, m.outcome) for m in log.messages] == [
        ("user", "complete"), ("assistant", "complete"), ("assistant", "cancelled")] * TURNS
    assert [c.outcome for c in log.tool_calls] == ["complete"] * TURNS
    print(f"seed {seed}: {proxy.cuts} cuts, {a.connects + b.connects + w.connects} connections")


# ---------------------------------------------------------------- asyncio

SECRET = "a test secret that is long enough for HS256"


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    data = tmp_path_factory.mktemp("agent-asyncio") / "data"
    with serving(data) as (_, found):
        yield found


def run_asyncio(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(scenario(), WAIT)
    asyncio.run(bounded())


def test_the_agent_under_asyncio(port: int) -> None:
    """The same helper under asyncio: a streamed reply, a tool call approved
    from another device, and a reply cancelled by it."""
    url = f"ws://127.0.0.1:{port}/v1/ws"

    async def forever() -> AsyncIterator[str]:
        for i in itertools.count():
            await asyncio.sleep(0.002)
            yield f"w{i} "

    async def scenario() -> None:
        async with connect(url, client_id="agent") as a, connect(url, client_id="phone") as b:
            phone = b.session("chat/aio")
            async with Agent(a.session("chat/aio"), create=True) as agent, \
                    phone.conversation() as convo:
                mid = await phone.send_message("hello")
                turn = await agent.receive()
                first = await agent.stream(["Hel", "lo ", "there"], reply_to=turn.id)
                call = asyncio.ensure_future(agent.tool_call(
                    "echo", {"x": 1}, run=lambda args: args, approval=True))
                view = await convo.wait(lambda v: v.pending_approvals)
                await phone.approve(view.pending_approvals[0].id)
                assert (await call).result == {"x": 1}
                second = asyncio.ensure_future(agent.stream(forever()))
                view = await convo.wait(lambda v: len(v.messages) == 3
                                        and len(v.messages[2].data) > 10)
                at = await phone.cancel(ref=view.messages[2].id)
                reply = await second
                view = await convo.wait(lambda v: not v.messages[2].open)
            assert (turn.id, first.text, first.outcome) == (mid, "Hello there", "complete")
            assert (reply.outcome, reply.cancel) == ("cancelled", at)
            assert [m.outcome for m in view.messages] == ["complete", "complete", "cancelled"]
            assert view.messages[2].text == reply.text

    run_asyncio(scenario)

"""The simulated agent behind ``broker serve --demo``.

Theory of operation
-------------------
The demo shows what a durable session buys: an agent that goes on working
while nobody watches, and a page that can leave, come back, and find
everything.  The agent here is in-process and uses the embedded Broker API;
the page (broker/static/demo.html) talks to it only through the session, and
both speak the AI message model of docs/ai.md: kinds 2-7 with their meta,
signals of kind 1 with ``{signal, id, ref, approved}``, text payloads as JSON
strings (a room is a JSON session).

Rooms.  A room is a JSON session ``demo/<room>``.  The page creates it and
appends user messages (a ``start`` with ``role: user`` and an ``outcome``:
a whole message in one record); the agent never creates one.  To find rooms
without a hook in the broker, the agent looks every ``poll_s`` at the
sessions the broker has open (any session in use, by either transport, has
a live actor) and follows each ``demo/*`` JSON session it is not following
yet.  Following holds the session open, so it stays found.

Following.  One task per room reads the whole session from its start and
folds every record into a ``Conversation``, the same fold the server's views
and the page use, so what the agent reads is exactly what they show: a
malformed record is skipped by all three alike.  The part already written
when the agent arrived is history, used only to learn which user messages
were answered (an agent message names the user message in ``reply_to``), so
after a restart the agent answers what is still unanswered and nothing
twice.  From then on it reads live: user messages go to the room's worker,
one at a time, in order; ``approve``/``reject`` signals record the decision
on their tool call, and ``cancel`` signals are counted.

A turn.  ``state thinking``; a reply streamed token by token (``start``,
``delta``..., ``end``, with ``state writing``); a ``search`` tool call whose
result comes ``tool_s`` later; a ``send_summary`` tool call with
``approval: true``; then it waits (``state awaiting_approval``), as long as
it takes, for the ``approve`` or ``reject`` naming that call, gives the call
its result, and streams its final message.  A ``cancel`` signal ends the turn
at the next token or wait: the message ends with ``outcome: cancelled``, an
open call gets a cancelled result.  ``state idle`` closes every turn.
Records are appended as they are made, whoever is attached: the point of the
demo.

A room ends when its session is closed, deleted or re-created; a room
re-created under the same name is followed afresh.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgpack
import trio

from . import _core
from ._broker import Broker
from ._convo import CANCELLED, Conversation, Draft, Encoder, Kind, Message, ToolCall, new_id
from ._errors import BrokerError
from ._meta import media_type
from ._session import MAX_KIND, START, header_parts

__all__ = ["AGENT", "PREFIX", "DemoAgent"]

AGENT = "demo-agent"          # the publisher of every record the agent writes
PREFIX = "demo/"
_MAX_QUEUED = 32              # user messages a room holds while busy; more are ignored
_ENCODE = Encoder(json=True)  # rooms are JSON sessions


class DemoAgent:
    """Follows every ``demo/*`` session and answers its user messages.

    The pace is a parameter so that tests can run turns in milliseconds;
    the defaults stream about 30 tokens a second.
    """

    def __init__(self, broker: Broker, *, token_s: float = 1 / 30, think_s: float = 0.6,
                 tool_s: float = 2.5, poll_s: float = 0.25) -> None:
        self.broker = broker
        self.token_s = token_s
        self.think_s = think_s
        self.tool_s = tool_s
        self.poll_s = poll_s
        # name -> the epoch followed, and whether that room has ended
        self._rooms: dict[str, tuple[int, bool]] = {}

    async def run(self) -> None:
        """Find and follow rooms until cancelled."""
        async with trio.open_nursery() as rooms:
            while True:
                # The registry of open sessions: read only, and copied, since
                # sessions come and go while this loop awaits.
                for name in [n for n in list(self.broker._actors) if n.startswith(PREFIX)]:
                    await self._discover(name, rooms)
                await trio.sleep(self.poll_s)

    async def _discover(self, name: str, rooms: trio.Nursery) -> None:
        known = self._rooms.get(name)
        if known is not None and not known[1]:
            return                              # followed right now
        try:
            info = await self.broker.info(name)
        except BrokerError:
            return                              # not created (yet), or going away
        if known is not None and known[0] == info.epoch:
            return                              # this room has ended; it stays ended
        if media_type(info.content_type) != "application/json":
            self._rooms[name] = (info.epoch, True)
            return
        self._rooms[name] = (info.epoch, False)
        rooms.start_soon(self._follow, name, info.epoch, info.next_offset)

    async def _follow(self, name: str, epoch: int, history_end: int) -> None:
        try:
            await _Room(self, name).run(epoch, history_end)
        except* BrokerError:
            pass                # closed, deleted or re-created: the room is over
        finally:
            self._rooms[name] = (epoch, True)


class _Room:
    """One followed session: a reader (this task) and a worker for turns."""

    def __init__(self, agent: DemoAgent, name: str) -> None:
        self.agent = agent
        self.name = name
        self.convo = Conversation(json=True)    # touched by the reader only
        self.decisions: dict[str, bool] = {}    # tool call id -> approved
        self.cancels = 0                        # cancel signals read live
        self._changed = trio.Event()            # set (and replaced) on every signal
        self._send, self._receive = trio.open_memory_channel[Message](_MAX_QUEUED)

    async def run(self, epoch: int, history_end: int) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._work)
            await self._read(epoch, history_end)
            nursery.cancel_scope.cancel()

    # ------------------------------------------------------------ reading

    async def _read(self, epoch: int, history_end: int) -> None:
        unanswered: dict[str, Message] = {}     # user messages in the history
        caught_up = False
        async with self.agent.broker.subscribe(self.name, START, epoch=epoch) as sub:
            async for batch in sub:                 # ends when the session is closed
                for offset, kind, publisher, meta, payload in _records(batch):
                    live = offset >= history_end
                    if self.convo.apply(offset, kind, publisher, meta, payload) not in (
                            None, "unknown_ref"):
                        continue                    # skipped: as if never written
                    if kind == Kind.SIGNAL:
                        self._signal(live)
                    elif kind == Kind.START:
                        msg = self.convo.view().item(meta["id"])
                        assert isinstance(msg, Message)
                        if msg.role == "user" and msg.outcome is not None:
                            if live:
                                self._enqueue(msg)
                            else:
                                unanswered[msg.id] = msg
                        elif publisher == AGENT and msg.reply_to is not None and not live:
                            unanswered.pop(msg.reply_to, None)
                if not caught_up and sub.offset >= history_end:
                    caught_up = True
                    for msg in unanswered.values():
                        self._enqueue(msg)
                    unanswered.clear()

    def _enqueue(self, user: Message) -> None:
        try:
            self._send.send_nowait(user)
        except trio.WouldBlock:
            pass            # a flood of messages: the agent answers what it can

    def _signal(self, live: bool) -> None:
        view = self.convo.view()
        signal = view.signals[-1]
        call = view.item(signal.ref) if signal.ref is not None else None
        if isinstance(call, ToolCall) and call.decided == signal.offset:
            # The fold's decision, the one every page shows: the first in time.
            self.decisions[call.id] = bool(call.approved)
        elif signal.type == "cancel" and live:
            self.cancels += 1
        self._changed.set()
        self._changed = trio.Event()

    # ------------------------------------------------------------ a turn

    async def _work(self) -> None:
        async for user in self._receive:
            await self._turn(user)

    async def _turn(self, user: Message) -> None:
        cancels = self.cancels

        def cancelled() -> bool:
            return self.cancels != cancels

        text = user.text[:200]
        await self._state("thinking")
        mid = await self._message(_reply(text), cancelled, reply_to=user.id)
        if mid is not None and await self._call("search", {"query": text}, cancelled,
                                                message=mid, result=_results(text)):
            call = new_id("call")
            await self._say(_ENCODE.tool_call(call, "send_summary", {"to": "you", "topic": text},
                                              approval=True, message=mid))
            await self._state("awaiting_approval", "Send the summary?", ref=call)
            approved = await self._decision(call, cancelled)
            if approved is None:
                await self._say(_ENCODE.tool_result(call, None, outcome=CANCELLED))
            elif approved:
                await self._say(_ENCODE.tool_result(call, {"sent": True}))
                await self._message(f"Done: I sent the summary of \u201c{text}\u201d.",
                                    cancelled)
            else:
                await self._say(_ENCODE.tool_result(call, None, outcome=CANCELLED,
                                                    error="rejected"))
                await self._message("All right, I will not send it.", cancelled)
        await self._state("idle")

    async def _message(self, text: str, cancelled: Callable[[], bool],
                       reply_to: str | None = None) -> str | None:
        """Stream ``text`` token by token; its id, or None if cancelled on the way."""
        mid = new_id("msg")
        await self._say(_ENCODE.start(mid, "assistant", reply_to=reply_to))
        await self._state("writing", ref=mid)
        for token in re.findall(r"\S+\s*", text):
            if not await self._pause(self.agent.token_s, cancelled):
                await self._say(_ENCODE.end(mid, outcome=CANCELLED))
                return None
            await self._say(_ENCODE.delta(mid, token))
        await self._say(_ENCODE.end(mid))
        return mid

    async def _call(self, name: str, args: Any, cancelled: Callable[[], bool], *,
                    message: str, result: Any) -> bool:
        """A tool call whose result comes ``tool_s`` later; False if cancelled."""
        call = new_id("call")
        await self._say(_ENCODE.tool_call(call, name, args, message=message))
        await self._state("tool", f"calling {name}", ref=call)
        if not await self._pause(self.agent.tool_s, cancelled):
            await self._say(_ENCODE.tool_result(call, None, outcome=CANCELLED))
            return False
        await self._say(_ENCODE.tool_result(call, result))
        return True

    async def _pause(self, seconds: float, cancelled: Callable[[], bool]) -> bool:
        """Wait ``seconds``; False (at once) if the turn is cancelled."""
        with trio.move_on_after(seconds):
            while not cancelled():
                await self._changed.wait()
        return not cancelled()

    async def _decision(self, call: str, cancelled: Callable[[], bool]) -> bool | None:
        """Approved or not; None if the turn is cancelled first."""
        while call not in self.decisions and not cancelled():
            await self._changed.wait()
        return None if cancelled() else self.decisions[call]

    async def _state(self, state: str, detail: str = "", *, ref: str | None = None) -> None:
        await self._say(_ENCODE.state(state, detail, ref=ref))

    async def _say(self, draft: Draft) -> None:
        await self.agent.broker.publish(self.name, [draft.payload], kind=draft.kind,
                                        publisher=AGENT, metas=[draft.meta])


# ------------------------------------------------------------------ helpers

def _records(batch: _core.Batch) -> list[tuple[int, int, str | None, Any, bytes]]:
    """(offset, kind, publisher, meta, payload) for each record of ``batch``."""
    out = []
    for i in range(len(batch)):
        header = batch.meta(i)
        try:
            publisher, meta, _ = header_parts(header) if header is not None else (None, None, None)
        except (ValueError, TypeError, RecursionError, msgpack.UnpackException):
            publisher, meta = None, None    # a header we cannot read: folded as meta-less
        out.append((batch.offset(i), (batch.flags(i) >> _core.KIND_SHIFT) & MAX_KIND,
                    publisher, meta, bytes(batch.payload(i))))
    return out


def _reply(text: str) -> str:
    return (f"You asked about \u201c{text}\u201d. Let me look into that. I will search "
            "what I can find, put the best of it into a short summary, and check with "
            "you before I send it anywhere.")


def _results(text: str) -> list[dict[str, str]]:
    return [{"title": f"{text[:40]}: an overview", "url": "https://example.com/overview"},
            {"title": f"Notes on {text[:40]}", "url": "https://example.com/notes"},
            {"title": "Frequently asked questions", "url": "https://example.com/faq"}]

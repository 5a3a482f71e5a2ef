"""The simulated agent behind ``broker serve --demo``.

Theory of operation
-------------------
The demo shows what a durable session buys: an agent that goes on working
while nobody watches, and a page that can leave, come back, and find
everything.  The agent here is in-process and uses the embedded Broker API;
the page (broker/static/demo.html) talks to it only through the session.

Rooms.  A room is a JSON session ``demo/<room>``.  The page creates it and
appends ``{"type": "user", ...}`` records; the agent never creates one.  To
find rooms without a hook in the broker, the agent looks every ``poll_s``
at the sessions the broker has open (any session in use, by either
transport, has a live actor) and follows each ``demo/*`` JSON session it is
not following yet.  Following holds the session open, so it stays found.

Following.  One task per room reads the whole session from its start: the
part already written when the agent arrived is history, used only to learn
which user messages were answered (an agent reply names the user message in
``reply_to``), so after a restart the agent answers what is still
unanswered and nothing twice.  From then on it reads live: ``user`` records
go to the room's worker, one at a time, in order; signals (kind 1) record
approvals and rejections by request id, and count cancels.

A turn.  ``state thinking``; a reply streamed token by token (``start``,
``delta``..., ``end``); a ``search`` tool call whose result comes
``tool_s`` later; an ``approval_request``; then it waits, as long as it
takes, for the ``approve`` or ``reject`` signal naming that request, and
streams its final message.  A ``cancel`` signal ends the turn at the next
token or wait.  ``state idle`` closes every turn.  Records are appended as
they are made, whoever is attached: the point of the demo.

A room ends when its session is closed, deleted or re-created; a room
re-created under the same name is followed afresh.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from typing import Any

import trio

from . import _core
from ._broker import Broker
from ._errors import BrokerError
from ._meta import media_type
from ._session import MAX_KIND, SIGNAL, START

__all__ = ["AGENT", "PREFIX", "DemoAgent"]

AGENT = "demo-agent"          # the publisher of every record the agent writes
PREFIX = "demo/"
_MAX_QUEUED = 32              # user messages a room holds while busy; more are ignored


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
        self.decisions: dict[str, str] = {}     # approval request id -> approve | reject
        self.cancels = 0                        # cancel signals read live
        self._changed = trio.Event()            # set (and replaced) on every signal
        self._send, self._receive = trio.open_memory_channel[dict[str, Any]](_MAX_QUEUED)

    async def run(self, epoch: int, history_end: int) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._work)
            await self._read(epoch, history_end)
            nursery.cancel_scope.cancel()

    # ------------------------------------------------------------ reading

    async def _read(self, epoch: int, history_end: int) -> None:
        unanswered: dict[str, dict[str, Any]] = {}  # user messages in the history
        caught_up = False
        async with self.agent.broker.subscribe(self.name, START, epoch=epoch) as sub:
            async for batch in sub:                 # ends when the session is closed
                for offset, kind, value in _records(batch):
                    live = offset >= history_end
                    if kind == SIGNAL:
                        self._signal(value, live)
                    elif value.get("type") == "user" and isinstance(value.get("text"), str):
                        if live:
                            self._enqueue(value)
                        else:
                            unanswered[str(value.get("id"))] = value
                    elif value.get("type") == "start" and not live:
                        unanswered.pop(str(value.get("reply_to")), None)
                if not caught_up and sub.offset >= history_end:
                    caught_up = True
                    for value in unanswered.values():
                        self._enqueue(value)
                    unanswered.clear()

    def _enqueue(self, user: dict[str, Any]) -> None:
        try:
            self._send.send_nowait(user)
        except trio.WouldBlock:
            pass            # a flood of messages: the agent answers what it can

    def _signal(self, value: dict[str, Any], live: bool) -> None:
        kind, rid = value.get("type"), value.get("id")
        if kind in ("approve", "reject") and isinstance(rid, str):
            self.decisions.setdefault(rid, kind)
        elif kind == "cancel" and live:
            self.cancels += 1
        self._changed.set()
        self._changed = trio.Event()

    # ------------------------------------------------------------ a turn

    async def _work(self) -> None:
        async for user in self._receive:
            await self._turn(user)

    async def _turn(self, user: dict[str, Any]) -> None:
        cancels = self.cancels

        def cancelled() -> bool:
            return self.cancels != cancels

        text = str(user["text"])[:200]
        await self._state("thinking")
        if await self._pause(self.agent.think_s, cancelled) and await self._message(
                _reply(text), cancelled, reply_to=user.get("id")):
            call = _new_id("call")
            await self._state("calling tool search")
            await self._say({"type": "tool_call", "id": call, "name": "search",
                             "args": {"query": text}})
            if await self._pause(self.agent.tool_s, cancelled):
                await self._say({"type": "tool_result", "id": call, "result": _results(text)})
                request = _new_id("req")
                await self._state("awaiting approval")
                await self._say({"type": "approval_request", "id": request,
                                 "text": "Send the summary?"})
                decision = await self._decision(request, cancelled)
                if decision == "approve":
                    await self._message(f"Done: I sent the summary of \u201c{text}\u201d.",
                                        cancelled)
                elif decision == "reject":
                    await self._message("All right, I will not send it.", cancelled)
        await self._state("idle")

    async def _message(self, text: str, cancelled: Callable[[], bool],
                       reply_to: Any = None) -> bool:
        """Stream ``text`` token by token; False if cancelled on the way."""
        mid = _new_id("msg")
        start: dict[str, Any] = {"type": "start", "id": mid, "role": "assistant"}
        if reply_to is not None:
            start["reply_to"] = reply_to
        await self._say(start)
        for token in re.findall(r"\S+\s*", text):
            if not await self._pause(self.agent.token_s, cancelled):
                await self._say({"type": "end", "id": mid, "cancelled": True})
                return False
            await self._say({"type": "delta", "id": mid, "text": token})
        await self._say({"type": "end", "id": mid})
        return True

    async def _pause(self, seconds: float, cancelled: Callable[[], bool]) -> bool:
        """Wait ``seconds``; False (at once) if the turn is cancelled."""
        with trio.move_on_after(seconds):
            while not cancelled():
                await self._changed.wait()
        return not cancelled()

    async def _decision(self, request: str, cancelled: Callable[[], bool]) -> str:
        while request not in self.decisions and not cancelled():
            await self._changed.wait()
        return "cancel" if cancelled() else self.decisions[request]

    async def _state(self, state: str) -> None:
        await self._say({"type": "state", "state": state})

    async def _say(self, value: dict[str, Any]) -> None:
        payload = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        await self.agent.broker.publish(self.name, [payload], publisher=AGENT)


# ------------------------------------------------------------------ helpers

def _records(batch: _core.Batch) -> list[tuple[int, int, dict[str, Any]]]:
    """(offset, kind, value) for each record of ``batch`` holding a JSON object."""
    out = []
    for i in range(len(batch)):
        try:
            value = json.loads(bytes(batch.payload(i)))
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            out.append((batch.offset(i), (batch.flags(i) >> _core.KIND_SHIFT) & MAX_KIND,
                        value))
    return out


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


def _reply(text: str) -> str:
    return (f"You asked about \u201c{text}\u201d. Let me look into that. I will search "
            "what I can find, put the best of it into a short summary, and check with "
            "you before I send it anywhere.")


def _results(text: str) -> list[dict[str, str]]:
    return [{"title": f"{text[:40]}: an overview", "url": "https://example.com/overview"},
            {"title": f"Notes on {text[:40]}", "url": "https://example.com/notes"},
            {"title": "Frequently asked questions", "url": "https://example.com/faq"}]


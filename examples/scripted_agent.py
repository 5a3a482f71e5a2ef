"""An AI agent on a broker session, with a scripted fake model: no API key needed.

Start a broker, then run this (under asyncio; add ``--trio`` for Trio)::

    broker serve &
    python examples/scripted_agent.py [ws://127.0.0.1:4437/v1/ws] [--trio]

Three parties share one session, each on its own connection, as they would
on three machines:

* the **agent** (``broker.agent.Agent``) answers the user's message with the
  fake model's token stream, asks to run a tool and waits for approval, runs
  it, and streams the rest of its answer;
* the **user's device** sends the message, approves the tool call, and
  cancels the second answer half-way through;
* a **watcher** (another device, or a tab opened late) reads the
  conversation as whole messages (``Session.conversation``).

It prints the conversation as the watcher sees it, e.g.::

    user: What is the tide at Brest today?
    assistant [complete]: Let me look at the tide table for Brest.
    tool tide_table {"port":"Brest"} approved=True [complete] -> {"high":"06:12","low":"12:25"}
    assistant [cancelled]: High tide at Brest is at 06:12 and low tide at 12:25. The
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio

from broker import client
from broker.agent import Agent

URL = "ws://127.0.0.1:4437/v1/ws"


class ScriptedModel:
    """A fake model: fixed answers, streamed a word at a time."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay            # seconds between tokens

    async def stream(self, text: str) -> AsyncIterator[str]:
        for word in text.split(" "):
            await anyio.sleep(self.delay)
            yield word + " "

    def first_answer(self, question: str) -> AsyncIterator[str]:
        return self.stream("Let me look at the tide table for Brest.")

    def second_answer(self, result: Any) -> AsyncIterator[str]:
        # Long enough that the user's cancel lands while it is being written.
        tail = " ".join(["Tides follow the moon, twice a day."] * 40)
        return self.stream(f"High tide at Brest is at {result['high']} and low tide at "
                           f"{result['low']}. {tail}")


async def tide_table(args: Any) -> dict[str, str]:
    """The tool: a lookup that takes a moment."""
    await anyio.sleep(0.01)
    return {"high": "06:12", "low": "12:25"}


async def run_agent(chat: client.Session, model: ScriptedModel, ready: anyio.Event) -> None:
    """Answer one user message: stream, call a tool with approval, stream
    again; stop a message when the user cancels it."""
    async with Agent(chat, create=True) as agent:
        ready.set()
        turn = await agent.receive()                     # the user's message
        await agent.state("thinking")
        first = await agent.stream(model.first_answer(turn.text), reply_to=turn.id)
        if first.cancelled:
            return
        call = await agent.tool_call("tide_table", {"port": "Brest"}, run=tide_table,
                                     approval=True, message=first.id)
        if not call.ok:
            await agent.stream([f"I could not read the tide table ({call.outcome})."])
            return
        second = await agent.stream(model.second_answer(call.result), reply_to=turn.id)
        await agent.state("idle", f"{second.tokens} tokens in {second.records} records")


async def run_user(chat: client.Session) -> None:
    """The user's device: ask, approve the tool call, cancel the second answer."""
    await chat.send_message("What is the tide at Brest today?")
    async with chat.conversation() as convo:
        view = await convo.wait(lambda v: v.pending_approvals)
        await chat.approve(view.pending_approvals[0].id)
        # Let the second answer get going, then stop it.
        view = await convo.wait(lambda v: len(v.messages) == 3 and len(v.messages[2].data) > 40)
        await chat.cancel("that is enough, thanks", ref=view.messages[2].id)
        await convo.wait(lambda v: not v.messages[2].open)


def transcript(view: Any) -> list[str]:
    """The conversation as lines of text."""
    lines = []
    for item in view.items:
        if hasattr(item, "role"):
            head = item.role if item.role == "user" else f"{item.role} [{item.outcome}]"
            lines.append(f"{head}: {item.text.strip()}")
        else:
            result = json.loads(item.result) if item.result is not None else None
            lines.append(f"tool {item.name} {item.args.decode()} approved={item.approved} "
                         f"[{item.outcome}] -> {json.dumps(result, separators=(',', ':'))}")
    return lines


async def main(url: str = URL, name: str | None = None, delay: float = 0.01) -> list[str]:
    name = name or f"chat/demo-{secrets.token_hex(4)}"
    ready = anyio.Event()
    async with client.connect(url, client_id="agent") as agent_client, \
            client.connect(url, client_id="phone") as user_client, \
            client.connect(url, client_id="laptop") as watcher_client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_agent, agent_client.session(name), ScriptedModel(delay), ready)
            await ready.wait()
            tg.start_soon(run_user, user_client.session(name))
        # Everyone is done; a late reader gets the same conversation whole.
        async with watcher_client.session(name).conversation() as convo:
            view = await convo.wait(lambda v: v.state is not None and v.state.state == "idle")
    return transcript(view)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    backend = "trio" if "--trio" in sys.argv else "asyncio"
    for line in anyio.run(main, args[0] if args else URL, backend=backend):
        print(line)

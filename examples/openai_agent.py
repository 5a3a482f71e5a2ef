"""Where a real model plugs into the agent helper: OpenAI's streaming SDK.

With a key, the agent answers with a real model::

    pip install openai
    broker serve &
    OPENAI_API_KEY=sk-... python examples/openai_agent.py [ws://127.0.0.1:4437/v1/ws]

Without one it runs the same code against a fake model that yields objects
shaped like OpenAI's chunks, so it runs anywhere (the test suite runs it).

The one line that matters is in ``answer``::

    reply = await agent.stream(stream, text=openai_text, reply_to=turn.id)

``stream`` is what ``client.chat.completions.create(..., stream=True)``
returns (an async iterator of ``ChatCompletionChunk``), and ``openai_text``
takes ``choices[0].delta.content`` out of each chunk (it also reads the
Responses API's ``response.output_text.delta`` events).  For Anthropic, pass
``client.messages.stream(...)``'s events with ``text=anthropic_text``, or its
``text_stream`` as it is.  The agent batches the text into delta records,
stops the stream when a user cancels, and ends the message with its outcome.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio

from broker import client
from broker.agent import Agent, openai_text

URL = "ws://127.0.0.1:4437/v1/ws"
MODEL = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")


async def model_stream(history: list[dict[str, str]]) -> AsyncIterator[Any]:
    """The model's answer as a stream of chunks: OpenAI's if there is a key."""
    if os.environ.get("OPENAI_API_KEY"):
        from openai import AsyncOpenAI       # only needed with a key

        stream: AsyncIterator[Any] = await AsyncOpenAI().chat.completions.create(
            model=MODEL, messages=history, stream=True)   # type: ignore[arg-type]
        return stream
    return _fake_chunks("The tide at Brest turns about every six hours, twice a day.")


# ------------------------------------------------------------------ the agent

async def answer(agent: Agent, history: list[dict[str, str]]) -> str:
    """Wait for the user's next message and answer it, with ``history`` as
    the model's context; returns how the reply ended, and its text."""
    turn = await agent.receive()
    history.append({"role": "user", "content": turn.text})
    await agent.state("thinking")
    stream = await model_stream(history)
    reply = await agent.stream(stream, text=openai_text, reply_to=turn.id)
    history.append({"role": "assistant", "content": reply.text})
    return f"{reply.outcome}: {reply.text.strip()}"


async def run_agent(chat: client.Session, turns: int, ready: anyio.Event,
                    out: list[str]) -> None:
    history = [{"role": "system", "content": "You are a helpful sailing assistant."}]
    async with Agent(chat, create=True) as agent:
        ready.set()
        for _ in range(turns):
            out.append(await answer(agent, history))


async def main(url: str = URL, name: str | None = None) -> list[str]:
    """The agent answers one question from a user's device."""
    name = name or f"chat/openai-{secrets.token_hex(4)}"
    ready = anyio.Event()
    out: list[str] = []
    async with client.connect(url, client_id="openai-agent") as agent_client, \
            client.connect(url, client_id="phone") as user_client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_agent, agent_client.session(name), 1, ready, out)
            await ready.wait()
            await user_client.session(name).send_message("When does the tide turn at Brest?")
    return out


# ------------------------------------------------------------------ the fake model

@dataclass
class _Delta:
    content: str | None


@dataclass
class _Choice:
    delta: _Delta


@dataclass
class _Chunk:
    """What a ChatCompletionChunk looks like to ``openai_text``."""

    choices: list[_Choice]


async def _fake_chunks(text: str) -> AsyncIterator[_Chunk]:
    yield _Chunk([_Choice(_Delta(None))])               # the role chunk carries no text
    for word in text.split(" "):
        await anyio.sleep(0.005)
        yield _Chunk([_Choice(_Delta(word + " "))])
    yield _Chunk([])                                    # a usage chunk has no choices


if __name__ == "__main__":
    for line in anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else URL):
        print(line)

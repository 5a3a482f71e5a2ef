"""The agent's side of an AI session: stream replies, run tools, stop on cancel.

::

    from broker import client
    from broker.agent import Agent

    async with client.connect("ws://127.0.0.1:4437/v1/ws", client_id="agent-7") as c:
        async with Agent(c.session("chat/7"), create=True) as agent:
            turn = await agent.receive()                       # a user's message or input
            reply = await agent.stream(model_tokens(turn.text), reply_to=turn.id)
            if reply.outcome == "complete":
                call = await agent.tool_call("search", {"q": turn.text}, run=search,
                                             approval=True)

It runs under Trio and asyncio alike (it is written on anyio, as the client is).

Theory of operation
-------------------
Everything the agent writes is a record of the message model (docs/ai.md),
built by ``_convo.Encoder`` for the session's payload rule and published
through the Session's pipeline: each record carries the client's producer
stamp, so it lands exactly once however the connection is cut, and in the
order it was written.  A reply is a ``MessageStream`` (``start``, batched
``delta``s, an ``end`` with its outcome); a tool call is a ``tool_call``
record, an optional wait for a decision, the caller's function, and a
``tool_result``; the agent says what it is doing with ``state`` records.

One background task, the *watch*, reads the session's signals and message
starts (kinds 1 and 2) from where the agent attached, and routes each:

* ``cancel`` with a ``ref`` cancels the cancel scope of that message or tool
  call, if it is still running here; without one it cancels every item
  running here (not one started later).  The interrupted code ends its item
  with outcome ``cancelled``, so every device sees the same end in the log.
* ``approve`` / ``reject`` wake the tool call waiting for that decision.
* ``input`` signals, other signal types, and whole messages written by
  someone else go to the inbox that ``receive`` reads.

Each record is read by the fold's own rules (``_convo.Conversation``, on
that record alone), so a record a device's view would skip (a malformed
meta, text against the payload rule) is not acted on either.

Promptness.  A cancel is a record pushed to the watch as soon as it is
readable: nothing polls.  The watch cancels the scope at once, the stream
stops taking tokens at its next checkpoint (it checkpoints once per token),
closes the model's stream, and puts what the coalescer still holds into the
``end`` record.  So after the cancel's offset the log holds at most the
delta batch that was already on its way, then the end.

Starting.  ``async with Agent(...)`` returns once the watch is attached, so
no signal sent after that is missed; ``since`` resumes the watch from a saved
offset instead of "now".  The watch uses the client's one subscription to
the session: read the conversation (``Session.conversation``) on another
client.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel

from . import _convo
from ._convo import CANCELLED, COMPLETE, ERROR, Kind
from .client import (
    ClientError,
    Cursor,
    Record,
    Session,
    Subscription,
    _describe,
    _signal_reader,
)

__all__ = [
    "Agent", "Incoming", "Reply", "ToolResult", "anthropic_text", "openai_text", "plain_text",
]

TextOf = Callable[[Any], str | bytes | None]
"""Takes one item of a model's stream and returns its text (None or "" for none)."""


# ------------------------------------------------------------------ token text

def plain_text(token: Any) -> str | bytes | None:
    """The text of a token that is already text: ``str`` or ``bytes`` (None skips)."""
    if token is None or isinstance(token, (str, bytes)):
        return token
    raise TypeError(f"a token must be str or bytes, not {type(token).__name__}: pass "
                    "text= (openai_text, anthropic_text or your own) to take the text "
                    "out of SDK events")


def openai_text(event: Any) -> str | None:
    """The text of an OpenAI stream item: a Chat Completions chunk
    (``choices[0].delta.content``) or a Responses API event
    (``response.output_text.delta``); None for the others."""
    if isinstance(event, str):
        return event
    choices = getattr(event, "choices", None)
    if choices is not None:
        delta = getattr(choices[0], "delta", None) if choices else None
        content = getattr(delta, "content", None)
        return content if isinstance(content, str) else None
    if getattr(event, "type", None) == "response.output_text.delta":
        delta = getattr(event, "delta", None)
        return delta if isinstance(delta, str) else None
    return None


def anthropic_text(event: Any) -> str | None:
    """The text of an Anthropic Messages stream event (a ``content_block_delta``
    holding a ``text_delta``); None for the others.  ``stream.text_stream``
    already yields ``str``, which passes through."""
    if isinstance(event, str):
        return event
    if getattr(event, "type", None) == "content_block_delta":
        delta = getattr(event, "delta", None)
        if getattr(delta, "type", None) == "text_delta":
            text = getattr(delta, "text", None)
            return text if isinstance(text, str) else None
    return None


# ------------------------------------------------------------------ results

@dataclass(frozen=True, slots=True)
class Incoming:
    """Something the agent should answer, from ``receive``.

    ``type`` is ``"message"`` (a whole message someone else wrote: a
    ``start`` with an outcome), ``"input"`` (an input signal), or the type of
    any other signal the agent does not act on itself."""

    type: str
    text: str
    offset: int
    publisher: str | None
    id: str | None              # the message's id, or the signal's
    ref: str | None             # what it answers: a signal's ref, a message's reply_to
    role: str | None = None     # a message's role
    record: Record | None = None

    @property
    def is_message(self) -> bool:
        return self.type == "message"


@dataclass(frozen=True, slots=True)
class Reply:
    """How a streamed message ended (``Agent.stream``)."""

    id: str
    outcome: str                # complete, cancelled or error
    text: str                   # what was published, whole
    error: str | None
    cancel: int | None          # offset of the cancel signal that stopped it
    tokens: int                 # items of text taken from the model's stream
    records: int                # records the message took: start, deltas, end
    offsets: tuple[range | None, ...]

    @property
    def cancelled(self) -> bool:
        return self.outcome == CANCELLED


@dataclass(frozen=True, slots=True)
class ToolResult:
    """How a tool call ended (``Agent.tool_call``)."""

    id: str
    name: str
    outcome: str                # complete, cancelled (cancelled or rejected) or error
    result: Any                 # what ``run`` returned (None unless complete)
    error: str | None
    approved: bool | None       # the decision, for a call that asked for one
    cancel: int | None          # offset of the cancel signal that stopped it
    exception: BaseException | None = None    # what ``run`` raised, for outcome error
    note: str = ""              # the text of the approve or reject: a reason, say

    @property
    def ok(self) -> bool:
        return self.outcome == COMPLETE


class _Item:
    """A message or tool call running here: what a cancel signal cancels."""

    __slots__ = ("scope", "cancel", "decided", "approved", "note")

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.cancel: int | None = None           # offset of the cancel that reached it
        self.decided = anyio.Event()             # set by approve/reject (tool calls)
        self.approved: bool | None = None
        self.note = ""


# ------------------------------------------------------------------ the agent

class Agent:
    """An agent on one session (see the module's theory of operation).

    ``window`` is how long deltas are gathered into one record (30 ms) and
    ``max_bytes`` the most one record gathers.  ``since`` is where the watch
    reads signals and messages from: ``"now"`` (the default), or an offset
    saved earlier (a turn's ``offset + 1`` once it is answered), to answer
    what came while the agent was away.
    ``create`` creates the session (as a binary session) if it does not
    exist.  ``text`` takes the text out of each item of a model's stream
    (``plain_text``: ``str``/``bytes``; ``openai_text``; ``anthropic_text``);
    ``stream`` may override it."""

    def __init__(self, session: Session, *, window: float = 0.030, max_bytes: int = 16 << 10,
                 since: int | str | Cursor = "now", create: bool = False,
                 text: TextOf = plain_text) -> None:
        _convo.Coalescer(window, max_bytes)          # checks both, here in the caller
        self.session = session
        self.window = window
        self.max_bytes = max_bytes
        self.text = text
        self._since = since
        self._create = create
        self._encoder = _convo.Encoder()
        self._items: dict[str, _Item] = {}        # running here, by id
        self._inbox: deque[Incoming] = deque()
        self._arrived = anyio.Event()
        self._sub: Subscription[Record] | None = None
        self._scope = anyio.CancelScope()         # the watch's
        self._failure: BaseException | None = None   # why the watch stopped
        self._entered = False
        self._exited = False

    def __repr__(self) -> str:
        return f"<Agent on {self.session.name!r}, {len(self._items)} running>"

    async def __aenter__(self) -> Agent:
        if self._entered:
            raise RuntimeError("an Agent runs once")
        self._entered = True
        client = self.session.client
        sub = self.session.subscribe(self._since, kinds=(Kind.SIGNAL.value, Kind.START.value),
                                     create=self._create)
        self._sub = sub
        try:
            await sub.attached()
            self._encoder = _convo.Encoder(json=await self.session.is_json())
        except BaseException:
            with anyio.CancelScope(shield=True):
                await sub.aclose()
            raise
        assert client._tg is not None
        client._tg.start_soon(self._watch, sub)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._exited = True
        self._scope.cancel()
        if self._sub is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._sub.aclose()
        if et is None:
            await self.state("idle")
        elif not issubclass(et, anyio.get_cancelled_exc_class()):
            # Say why the agent stopped, without waiting: the caller's error goes on.
            self._enqueue(self._encoder.state("error", _describe(e)))

    # ------------------------------------------------------------ what it hears

    async def receive(self) -> Incoming:
        """The next message written by someone else, input signal, or other
        signal the agent does not act on itself, in log order."""
        while not self._inbox:
            self._check()
            self._arrived = anyio.Event()
            await self._arrived.wait()
        return self._inbox.popleft()

    # ------------------------------------------------------------ what it writes

    async def state(self, state: str, detail: str = "", *, ref: str | None = None) -> None:
        """Publish what the agent is doing (docs/ai.md, "Agent state"):
        ``thinking``, ``writing``, ``tool``, ``awaiting_approval``,
        ``awaiting_input``, ``idle``, ``error``, or your own.  Returns once
        it is durable."""
        await self._publish(self._encoder.state(state, detail, ref=ref))

    async def stream(self, tokens: AsyncIterable[Any] | Iterable[Any], *,
                     role: str = "assistant", id: str | None = None,
                     reply_to: str | None = None, text: TextOf | None = None) -> Reply:
        """Publish a model's stream as one message and return how it ended.

        Each item of ``tokens`` goes through ``text`` (the agent's by
        default); its text is appended, and deltas are batched over the
        agent's window.  A cancel signal for this message (or the whole run)
        stops it: the model's stream is closed and the message ends
        ``cancelled``.  If the stream raises, the message ends ``error`` and
        the exception goes on to the caller.  Returns once every record of
        the message is durable."""
        self._check()
        take = text or self.text
        mid = id if id is not None else _convo.new_id("m")
        item = self._track(mid)
        m = self.session.stream_message(role=role, id=mid, reply_to=reply_to,
                                        window=self.window, max_bytes=self.max_bytes)
        source = tokens if isinstance(tokens, AsyncIterable) else _Tokens(tokens)
        appended = 0
        try:
            with item.scope:
                async with m:
                    self._enqueue(self._encoder.state("writing", ref=mid))
                    async for token in source:
                        piece = take(token)
                        if piece:
                            await m.append(piece)
                            appended += 1
                        # Lets the watch and the batch timer run, and a cancel
                        # land, however fast the model's stream is.
                        await anyio.lowlevel.checkpoint()
        finally:
            del self._items[mid]
            await _close(tokens)
        if m.outcome is None:
            # A run's cancel came before the message started: nothing was published.
            return Reply(mid, CANCELLED, "", None, item.cancel, 0, 0, ())
        await m.wait()
        return Reply(mid, m.outcome, m.text, m.error, item.cancel, appended, m.records,
                     tuple(m.offsets))

    async def tool_call(self, name: str, args: Any = None, *,
                        run: Callable[[Any], Any], approval: bool = False,
                        id: str | None = None, message: str | None = None) -> ToolResult:
        """Make a tool call: publish it, wait for ``approve``/``reject`` if
        ``approval``, call ``run(args)`` (a plain or an async function), and
        publish its result.

        ``args`` is any JSON value (as given, it is also what ``run`` gets).
        A rejected call is not run and ends ``cancelled`` (the view shows
        ``approved: false``); a cancel signal for the call or the run ends it
        ``cancelled``, interrupting ``run`` at its next await; an exception
        from ``run`` ends it ``error`` and is returned in ``exception``, not
        raised, so the agent can tell the model.  What ``run`` returns must
        be a JSON value, else the call ends ``error``.  ``message`` names the
        message the call was made in."""
        self._check()
        cid = id if id is not None else _convo.new_id("c")
        call = self._encoder.tool_call(cid, name, args, approval=approval, message=message)
        item = self._track(cid)
        outcome, result, error, raised = CANCELLED, None, None, None
        try:
            await self._publish(call)
        except BaseException:
            del self._items[cid]
            raise
        try:
            with item.scope:
                if approval:
                    await self.state("awaiting_approval", ref=cid)
                    await item.decided.wait()
                    self._check()                # woken because the watch stopped
                if item.approved is not False:
                    await self.state("tool", ref=cid)
                    try:
                        value = run(args)
                        if inspect.isawaitable(value):
                            value = await value
                        done = self._encoder.tool_result(cid, value)
                        outcome, result = COMPLETE, value
                    except Exception as exc:     # the tool's failure is the model's to hear
                        outcome, error, raised = ERROR, _describe(exc), exc
            if outcome != COMPLETE:
                done = self._encoder.tool_result(cid, outcome=outcome, error=error)
        except BaseException:
            # Cut short from outside (the agent is shutting down, or stopped
            # watching): close the call in the log without waiting, and go on.
            self._enqueue(self._encoder.tool_result(cid, outcome=CANCELLED))
            raise
        finally:
            del self._items[cid]
        await self._publish(done)
        return ToolResult(cid, name, outcome, result, error, item.approved, item.cancel, raised,
                          item.note)

    # ------------------------------------------------------------ the watch

    async def _watch(self, sub: Subscription[Record]) -> None:
        """Route signals and others' messages (see the theory of operation).
        Runs in the client's task group, so it never raises: a failure is
        kept and raised to the agent's next call."""
        me = self.session.client.client_id
        fresh = _signal_reader()                 # drops a signal id seen before
        with self._scope:
            try:
                async for record in sub:
                    if record.kind == Kind.SIGNAL and fresh(record) is not None:
                        self._on_signal(record)
                    elif record.kind == Kind.START and record.publisher != me:
                        self._on_message(record)
                self._failure = ClientError("session_closed", "the session was closed",
                                            self.session.name)
            except Exception as exc:
                self._failure = exc
            finally:
                self._arrived.set()
                for item in self._items.values():
                    item.decided.set()           # wakes a waiting call, which sees the failure

    def _read(self, record: Record) -> _convo.View | None:
        """The record as the fold reads it, alone; None if the fold would
        skip it (a malformed meta, text against the payload rule): what a
        device's view does not show, the agent does not act on either."""
        fold = _convo.Conversation(json=self._encoder.json)
        code = fold.apply(record.offset, record.kind, record.publisher, record.meta,
                          record.payload)
        return fold.view() if code in (None, "unknown_ref") else None

    def _on_signal(self, record: Record) -> None:
        view = self._read(record)
        if view is None:
            return
        (signal,) = view.signals
        item = None if signal.ref is None else self._items.get(signal.ref)
        if signal.type == "cancel":
            # No ref: the whole run, so everything running here.
            victims = list(self._items.values()) if signal.ref is None else [item] if item else []
            for victim in victims:
                if victim.cancel is None:
                    victim.cancel = signal.offset
                victim.scope.cancel()
        elif signal.type in ("approve", "reject"):
            # The first decision stands, as in the fold.
            if item is not None and not item.decided.is_set():
                item.approved, item.note = signal.approved, signal.text
                item.decided.set()
        else:
            self._deliver(Incoming(signal.type, signal.text, signal.offset, signal.publisher,
                                   signal.id, signal.ref, record=record))

    def _on_message(self, record: Record) -> None:
        view = self._read(record)
        if view is None:
            return
        (m,) = view.messages
        if m.outcome is not None:                # a whole message, not one being written
            self._deliver(Incoming("message", m.text, m.offset, m.publisher, m.id, m.reply_to,
                                   m.role, record))

    def _deliver(self, incoming: Incoming) -> None:
        self._inbox.append(incoming)
        self._arrived.set()

    # ------------------------------------------------------------ plumbing

    def _check(self) -> None:
        if not self._entered or self._exited:
            raise RuntimeError("an Agent works inside its `async with` block")
        if self._failure is not None:
            raise self._failure.with_traceback(None)

    def _track(self, id: str) -> _Item:
        if id in self._items:
            raise ValueError(f"{id!r} is already running")
        item = self._items[id] = _Item()
        return item

    async def _publish(self, draft: _convo.Draft) -> None:
        await self.session.publish([draft.payload], kind=draft.kind, meta=[draft.meta])

    def _enqueue(self, draft: _convo.Draft) -> None:
        """Queue a record without waiting for it (not even for room): for
        what is said while unwinding.  It still lands exactly once."""
        try:
            entry = self.session._entry([draft.payload], draft.kind, [draft.meta], False)
            self.session.client._pipe(self.session.name).enqueue(entry)
        except ClientError:
            pass                                 # the client is closed: nothing to tell


class _Tokens:
    """A plain iterable of tokens as an async iterator (not an async
    generator, which would have to be closed when the stream is cut short)."""

    def __init__(self, tokens: Iterable[Any]) -> None:
        self._it = iter(tokens)

    def __aiter__(self) -> _Tokens:
        return self

    async def __anext__(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            raise StopAsyncIteration from None


async def _close(tokens: Any) -> None:
    """Close a model's stream that was left early (SDK streams hold an HTTP
    response open): ``aclose`` (async generators) or ``close`` (SDK streams)."""
    close = getattr(tokens, "aclose", None) or getattr(tokens, "close", None)
    if close is None:
        return
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        done = close()
        if inspect.isawaitable(done):
            await done

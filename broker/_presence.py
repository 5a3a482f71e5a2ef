"""Presence: who is attached to each session right now (docs/protocol.md, "Presence").

Theory of operation
-------------------
Presence is ephemeral: it lives in this process's memory, never in a session's
log, and a restart forgets it (every client reconnects and shows up again).
One ``Registry`` per broker (``Broker.presence``) holds, per session, its
*members*: frozen ``Member`` values (_frames.py) with a member id, the client
id, the transport, when it joined and a small info map.  The transports put
members in and take them out over their own lifetimes:

* a WebSocket connection attached to a session is a member (unless it
  attached ``hidden``) from its ``attached`` until the subscription ends,
  however it ends: detach, an event, the connection closing or dropping, a
  heartbeat timeout, the token's expiry, server shutdown.  The member id is
  the connection id; a connection attaches a session at most once;
* an open SSE response is a member until the response ends;
* a long-poll reader has no connection to follow, only requests, so it is
  keyed by (session, client id): a poll *holds* it and its end *releases*
  it, and once no poll holds it, it lingers until a deadline, then leaves.
  The next poll, arriving within the linger, keeps the same member.

Everything here but ``run`` is sans-IO: callers pass the times (Trio time for
deadlines; the member carries its wall-clock ``since``), and nothing awaits.
``run`` is the one Trio loop: it sleeps until the earliest linger deadline
and expires what is due; the broker runs it for its lifetime.

Watchers.  A subscriber that asked for presence registers a *watcher*, a
callable run synchronously on every join and leave of its session, which
must not block.  The WebSocket side gives each watcher a ``Feed``: not a
queue of events but the *net* change per member id since the last send,
plus a flag that says "send the whole set instead".  A join and a leave of
the same member cancel out; a leave and a join become one join (which
replaces the member the client holds under that id); past ``limit``
pending changes the feed gives up on events and asks for the whole set,
which is read from the registry when the frame is built.  So a reconnect
storm or a reader that stopped reading costs each watcher at most ``limit``
entries, and building up nothing that grows with time.
"""

from __future__ import annotations

import heapq
import itertools
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

from ._frames import Member

__all__ = ["Feed", "Registry", "Watcher", "JOIN", "LEAVE"]

JOIN: Final = "join"
LEAVE: Final = "leave"

# Called with JOIN or LEAVE and the member, on the task that changed presence.
Watcher = Callable[[str, Member], None]


@dataclass(slots=True)
class _Entry:
    member: Member
    poll_key: str | None = None   # long-poll: the client id it is keyed by
    holds: int = 0                # long-poll: polls running now
    until: float = math.inf       # long-poll: leaves at this Trio time unless polled again
    queued: bool = False          # long-poll: has an entry in the linger heap


class Registry:
    """The members of every session, and who watches them.  See the module."""

    def __init__(self) -> None:
        self._sessions: dict[str, dict[str, _Entry]] = {}      # session -> member id -> entry
        self._watchers: dict[str, dict[Watcher, None]] = {}    # session -> watchers, in order
        self._polls: dict[tuple[str, str], str] = {}           # (session, client) -> member id
        # (until, tie-break, session, member id): at most one per lingering
        # member; a member polled again meanwhile is pushed back when its
        # first deadline comes, rather than pushed twice.
        self._lingering: list[tuple[float, int, str, str]] = []
        self._order = itertools.count()
        self._tag = secrets.token_hex(3)
        self._ids = itertools.count(1)
        self._wake: trio.Event | None = None
        self._scope = trio.CancelScope()

    # ------------------------------------------------------------ reading

    def members(self, session: str) -> list[Member]:
        """The session's members now, in the order they joined."""
        entries = self._sessions.get(session)
        return [] if entries is None else [e.member for e in entries.values()]

    def __len__(self) -> int:
        """Members of all sessions."""
        return sum(map(len, self._sessions.values()))

    @property
    def empty(self) -> bool:
        """Nothing held at all: no member, no watcher, no long-poll key."""
        return not (self._sessions or self._watchers or self._polls)

    def new_id(self, prefix: str) -> str:
        """A member id for an HTTP member (``sse``, ``lp``): unique in this
        process, and never the shape of a WebSocket connection id."""
        return f"{prefix}-{self._tag}-{next(self._ids)}"

    # ------------------------------------------------------------ members

    def join(self, session: str, member: Member) -> None:
        """``member`` joins ``session`` (replacing one with the same id)."""
        self._sessions.setdefault(session, {})[member.id] = _Entry(member)
        self._tell(session, JOIN, member)

    def leave(self, session: str, member_id: str) -> None:
        """The member leaves, if it is there."""
        entries = self._sessions.get(session)
        entry = None if entries is None else entries.pop(member_id, None)
        if entry is None:
            return
        if not entries:
            del self._sessions[session]
        if entry.poll_key is not None:
            self._polls.pop((session, entry.poll_key), None)
        self._tell(session, LEAVE, entry.member)

    # ------------------------------------------------------------ long-poll readers

    def hold(self, session: str, member: Member) -> str:
        """A poll of ``member.client`` on ``session`` begins: the reader is
        present until the matching ``release`` and its linger.  ``member``
        joins only if the client has no poll member there yet (its info and
        id are then those of the first poll); returns the member id."""
        key = (session, member.client)
        member_id = self._polls.get(key)
        if member_id is None:
            self.join(session, member)
            entry = self._sessions[session][member.id]
            entry.poll_key = member.client
            self._polls[key] = member_id = member.id
        else:
            entry = self._sessions[session][member_id]
        entry.holds += 1
        entry.until = math.inf
        return member_id

    def release(self, session: str, client: str, until: float) -> None:
        """A poll ends: once no poll holds the reader, it leaves at ``until``
        (Trio time) unless a poll comes first."""
        member_id = self._polls.get((session, client))
        if member_id is None:
            return
        entry = self._sessions[session][member_id]
        entry.holds = max(0, entry.holds - 1)
        if entry.holds:
            return
        entry.until = until
        if entry.queued:
            # Its heap entry is due first (one linger, so every release is
            # later than the one queued); ``expire`` pushes it back then.
            return
        entry.queued = True
        first = not self._lingering or until < self._lingering[0][0]
        heapq.heappush(self._lingering, (until, next(self._order), session, member_id))
        if first and self._wake is not None:
            self._wake.set()

    def expire(self, now: float) -> float:
        """Let every reader whose linger passed by ``now`` leave; returns the
        next deadline (inf if none)."""
        heap = self._lingering
        while heap and heap[0][0] <= now:
            _, _, session, member_id = heapq.heappop(heap)
            entry = self._sessions.get(session, {}).get(member_id)
            if entry is None:
                continue
            entry.queued = False
            if entry.holds:
                continue          # polling again: its release queues it anew
            if entry.until > now:
                entry.queued = True
                heapq.heappush(heap, (entry.until, next(self._order), session, member_id))
                continue
            self.leave(session, member_id)
        return heap[0][0] if heap else math.inf

    # ------------------------------------------------------------ watchers

    def watch(self, session: str, watcher: Watcher) -> None:
        """Call ``watcher`` on every join and leave of ``session`` from now on."""
        self._watchers.setdefault(session, {})[watcher] = None

    def unwatch(self, session: str, watcher: Watcher) -> None:
        watchers = self._watchers.get(session)
        if watchers is not None:
            watchers.pop(watcher, None)
            if not watchers:
                del self._watchers[session]

    def _tell(self, session: str, kind: str, member: Member) -> None:
        watchers = self._watchers.get(session)
        if watchers:
            # A copy: a watcher may unwatch (its connection ending) as it is told.
            for watcher in tuple(watchers):
                watcher(kind, member)

    # ------------------------------------------------------------ the clock (Trio)

    async def run(self) -> None:
        """Expire lingering readers on time, until ``close``."""
        with self._scope:
            while True:
                self._wake = trio.Event()
                deadline = self.expire(trio.current_time())
                with trio.move_on_at(deadline):
                    await self._wake.wait()

    def close(self) -> None:
        """Stop ``run`` (the broker is shutting down)."""
        self._scope.cancel()


class Feed:
    """What one watcher has not been sent yet, coalesced (see the module).

    ``add`` is the watcher's half, ``take`` the sender's.  A new feed starts
    with ``resync`` set: the first thing a watcher gets is the whole set."""

    __slots__ = ("pending", "resync", "limit")

    def __init__(self, limit: int = 256) -> None:
        # member id -> (JOIN or LEAVE, the member, whether the client held
        # that id before the pending changes)
        self.pending: dict[str, tuple[str, Member, bool]] = {}
        self.resync = True
        self.limit = limit

    def add(self, kind: str, member: Member) -> None:
        if self.resync:
            return              # the whole set is read when it is sent
        before = self.pending.get(member.id)
        # A leave of an id with nothing pending is of a member the client
        # holds (from the set, or a join sent); a first join is of one it
        # does not, unless a leave is pending for that id.
        known = before[2] if before is not None else kind == LEAVE
        if kind == LEAVE and not known:
            del self.pending[member.id]        # joined and left between two sends
            return
        self.pending[member.id] = (kind, member, known)
        if len(self.pending) > self.limit:
            self.pending.clear()
            self.resync = True

    def take(self) -> tuple[bool, list[tuple[str, Member]]]:
        """(send the whole set?, else the changes to send), and start afresh."""
        resync, pending = self.resync, self.pending
        self.resync, self.pending = False, {}
        if resync:
            return True, []
        return False, [(kind, member) for kind, member, _ in pending.values()]

    @property
    def due(self) -> bool:
        """Whether there is anything to send."""
        return self.resync or bool(self.pending)

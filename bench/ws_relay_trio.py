"""The naive relay of shared/BENCH.md on trio-websocket: a peer for bench/ws_bench.sh.

    python bench/ws_relay_trio.py [--port 0]

It prints ``listening on http://127.0.0.1:PORT`` on stderr, as ``broker serve``
does, and serves the subset of broker's WebSocket protocol (docs/protocol.md)
that bench/ws_load.py uses, in the same msgpack frame shapes:

* ``hello`` -> ``welcome``;
* ``attach`` (any offset is taken as ``"now"``) -> ``attached``, ``up_to_date``;
* ``publish`` -> one ``data`` frame holding the publish's records, sent to
  every subscriber of the session, then ``ack`` (offset of the first record,
  count) to the publisher.

Theory of operation: what a first WebSocket relay looks like.  One Trio task
per connection reads messages with ``get_message``; a publish is handled in
the publisher's task: the data frame is packed once and sent with one
``await send_message`` per subscriber, in turn, then the ack.  So a slow
subscriber holds up the publisher (and every other subscriber behind it), and
nothing is batched beyond what the publisher put in one publish.  There is no
storage: offsets are a counter in memory, nothing is durable, and a
subscriber sees only what is published while it is attached.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from typing import Any

import msgpack
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

SUBPROTOCOL = "broker.v1"
MAX_MESSAGE = 16 << 20


class Session:
    __slots__ = ("subs", "next")

    def __init__(self) -> None:
        self.subs: set[WebSocketConnection] = set()
        self.next = 0                      # offset of the next record


sessions: dict[str, Session] = {}
conn_ids = itertools.count(1)


def _session(name: str) -> Session:
    s = sessions.get(name)
    if s is None:
        s = sessions[name] = Session()
    return s


async def handler(request: WebSocketRequest) -> None:
    ws = await request.accept(subprotocol=SUBPROTOCOL)
    attached: list[Session] = []
    pack = msgpack.packb
    try:
        while True:
            m: dict[str, Any] = msgpack.unpackb(await ws.get_message())
            t = m.get("t")
            if t == "publish":
                name = m["s"]
                s = _session(name)
                first = s.next
                ts = time.time_ns() // 1000
                records = [[first + i, ts, 0, None, p] for i, p in enumerate(m["r"])]
                s.next += len(records)
                data = pack({"t": "data", "s": name, "r": records})
                for sub in list(s.subs):
                    try:
                        await sub.send_message(data)
                    except ConnectionClosed:
                        s.subs.discard(sub)
                await ws.send_message(pack({"t": "ack", "id": m["id"], "s": name,
                                            "offset": first, "count": len(records)}))
            elif t == "attach":
                name = m["s"]
                s = _session(name)
                s.subs.add(ws)
                attached.append(s)
                await ws.send_message(pack({"t": "attached", "id": m["id"], "s": name,
                                            "epoch": 0, "offset": s.next, "next": s.next,
                                            "closed": False}))
                await ws.send_message(pack({"t": "up_to_date", "s": name, "next": s.next}))
            elif t == "hello":
                n = next(conn_ids)
                await ws.send_message(pack({"t": "welcome", "v": 1,
                                            "client": m.get("client") or f"anon-{n}",
                                            "conn": str(n), "heartbeat": 25.0,
                                            "max_message": MAX_MESSAGE}))
            elif t == "ping":
                await ws.send_message(pack({"t": "pong", "id": m.get("id")}))
            # anything else (pong, credit, ...) is ignored
    except ConnectionClosed:
        pass
    finally:
        for s in attached:
            s.subs.discard(ws)


async def main(port: int) -> None:
    async with trio.open_nursery() as nursery:
        serve = functools.partial(serve_websocket, max_message_size=MAX_MESSAGE)
        server = await nursery.start(serve, handler, "127.0.0.1", port, None)
        print(f"listening on http://127.0.0.1:{server.port}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    try:
        trio.run(main, ap.parse_args().port)
    except KeyboardInterrupt:
        pass

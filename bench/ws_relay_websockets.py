"""The naive relay of shared/BENCH.md on the `websockets` library (asyncio): a
peer for bench/ws_bench.sh.

    python bench/ws_relay_websockets.py [--port 0]

The same relay as bench/ws_relay_trio.py (read its docstring for the frames it
serves), on ``websockets.asyncio.server.serve`` with the default asyncio event
loop: one handler coroutine per connection, and a publish sent with one
``await send`` per subscriber, in turn, then the ack.  No storage, nothing
durable.  (``websockets.asyncio.server.broadcast`` would write to every
subscriber without awaiting each; the naive relay does not use it.)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from typing import Any

import msgpack
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

SUBPROTOCOL = Subprotocol("broker.v1")
MAX_MESSAGE = 16 << 20


class Session:
    __slots__ = ("subs", "next")

    def __init__(self) -> None:
        self.subs: set[ServerConnection] = set()
        self.next = 0                      # offset of the next record


sessions: dict[str, Session] = {}
conn_ids = itertools.count(1)


def _session(name: str) -> Session:
    s = sessions.get(name)
    if s is None:
        s = sessions[name] = Session()
    return s


async def handler(ws: ServerConnection) -> None:
    attached: list[Session] = []
    pack = msgpack.packb
    try:
        async for raw in ws:
            m: dict[str, Any] = msgpack.unpackb(raw)
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
                        await sub.send(data)
                    except ConnectionClosed:
                        s.subs.discard(sub)
                await ws.send(pack({"t": "ack", "id": m["id"], "s": name, "offset": first,
                                    "count": len(records)}))
            elif t == "attach":
                name = m["s"]
                s = _session(name)
                s.subs.add(ws)
                attached.append(s)
                await ws.send(pack({"t": "attached", "id": m["id"], "s": name, "epoch": 0,
                                    "offset": s.next, "next": s.next, "closed": False}))
                await ws.send(pack({"t": "up_to_date", "s": name, "next": s.next}))
            elif t == "hello":
                n = next(conn_ids)
                await ws.send(pack({"t": "welcome", "v": 1,
                                    "client": m.get("client") or f"anon-{n}",
                                    "conn": str(n), "heartbeat": 25.0,
                                    "max_message": MAX_MESSAGE}))
            elif t == "ping":
                await ws.send(pack({"t": "pong", "id": m.get("id")}))
    except ConnectionClosed:
        pass
    finally:
        for s in attached:
            s.subs.discard(ws)


async def main(port: int) -> None:
    async with serve(handler, "127.0.0.1", port, subprotocols=[SUBPROTOCOL],
                     compression=None, max_size=MAX_MESSAGE) as server:
        sock = next(iter(server.sockets))
        print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}", file=sys.stderr,
              flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    try:
        asyncio.run(main(ap.parse_args().port))
    except KeyboardInterrupt:
        pass

"""SIGKILL `broker serve` while an agent publishes over WebSocket.

Each round starts a real `broker serve` on the same data directory, publishes
pipelined batches (a window of publishes in flight) and records every ack,
then kills the server with SIGKILL at a random moment.  At the end, every
acknowledged record must be on disk at its acknowledged offset, byte for
byte, and offsets must have no holes.  BROKER_CRASH_SEED replays a seed.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import broker
from broker import _frames

from _wsraw import RawWs

SESSION = "agent/run"


async def _start(data: Path, err: Path) -> tuple[trio.Process, int]:
    with open(err, "wb") as f:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "broker", "serve", "--port", "0", "--data-dir", str(data)],
            stderr=f)
    with trio.fail_after(30):
        while True:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", err.read_text())
            if m:
                return proc, int(m.group(1))
            await trio.sleep(0.02)


@pytest.mark.slow
async def test_sigkill_loses_no_record_acknowledged_over_websocket(tmp_path: Path) -> None:
    seed = int(os.environ.get("BROKER_CRASH_SEED") or random.randrange(1 << 32))
    rng = random.Random(seed)
    data = tmp_path / "data"
    acked: dict[int, bytes] = {}
    for rnd in range(6):
        proc, port = await _start(data, tmp_path / f"serve{rnd}.err")
        ws = await RawWs.connect(port, client=f"round{rnd}")
        sent: dict[int, tuple[bytes, ...]] = {}
        try:
            with trio.move_on_after(rng.uniform(0.05, 0.6)):
                request_id = 0
                in_flight = 0
                while True:
                    while in_flight < 16:
                        request_id += 1
                        payloads = tuple(b"r%d-p%d-%d-" % (rnd, request_id, i)
                                         + os.urandom(rng.randrange(0, 200))
                                         for i in range(rng.randrange(1, 50)))
                        sent[request_id] = payloads
                        await ws.send(_frames.Publish(request_id, SESSION, payloads,
                                                      create=True))
                        in_flight += 1
                    ack = await ws.frame()
                    assert isinstance(ack, _frames.Ack), ack
                    assert ack.offset is not None
                    in_flight -= 1
                    for i, p in enumerate(sent.pop(ack.id)):
                        acked[ack.offset + i] = p
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await ws.aclose()
    assert acked, f"nothing was acknowledged (BROKER_CRASH_SEED={seed})"
    async with broker.open_broker(data) as b:
        info = await b.info(SESSION)
        stored: list[bytes] = []
        offset = 0
        while offset < info.next_offset:
            batch = await b.read(SESSION, offset)
            stored.extend(batch.payloads())
            offset = batch.next_offset
    for offset, payload in acked.items():
        assert stored[offset] == payload, f"offset {offset} (BROKER_CRASH_SEED={seed})"
    assert len(stored) >= max(acked) + 1

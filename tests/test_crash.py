"""Crash safety: SIGKILL a real broker process mid-append, and torn tails.

The crash test runs tests/_crash_child.py in a separate process, kills it with
SIGKILL at random moments over several rounds on the same data directory, and
then checks that every append the child saw acknowledged is on disk exactly
once, in order, byte for byte.  Set BROKER_CRASH_SEED to replay a seed (the
kill timing still varies).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import trio

import broker
from broker import _core

from _disk import HEADER, parse_segment, read_all, segment_files

CHILD = Path(__file__).with_name("_crash_child.py")
_spec = importlib.util.spec_from_file_location("_crash_child", CHILD)
assert _spec is not None and _spec.loader is not None
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)



# ------------------------------------------------------------------- helpers

class _Lines:
    """Whole lines from a trio stream; a partial last line is never returned."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = b""
        self.eof = False

    async def next(self) -> str | None:
        while b"\n" not in self._buf:
            if self.eof:
                return None
            chunk = await self._stream.receive_some(1 << 16)
            if not chunk:
                self.eof = True
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()


# ------------------------------------------------------------ SIGKILL rounds

ROUNDS = ["acks", "time", "early", "acks", "time", "early", "time", "acks"]


@pytest.mark.slow
async def test_sigkill_loses_no_acknowledged_append(tmp_path: Path) -> None:
    seed = int(os.environ.get("BROKER_CRASH_SEED") or random.randrange(1 << 32))
    rng = random.Random(seed)
    ctx = f"BROKER_CRASH_SEED={seed}"
    data = tmp_path / "data"
    acked: dict[int, tuple[int, int, int, int]] = {}    # offset -> (round, task, seq, size)
    ready: dict[int, int] = {}                          # round -> next_offset at its start

    for rnd, mode in enumerate(ROUNDS):
        err_path = tmp_path / f"child{rnd}.err"
        with open(err_path, "wb") as err:
            proc = await trio.lowlevel.open_process(
                [sys.executable, str(CHILD), str(data), str(rnd), str(rng.randrange(1 << 30))],
                stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        lines = _Lines(proc.stdout)
        acks_this_round = 0

        def handle(line: str) -> None:
            nonlocal acks_this_round
            kind, *fields = line.split()
            if kind == "ready":
                ready[rnd] = int(fields[0])
                return
            assert kind == "ack", line
            offset, *ident = map(int, fields)
            assert ident[0] == rnd
            assert offset not in acked, f"{ctx}: offset {offset} acknowledged twice"
            acked[offset] = (ident[0], ident[1], ident[2], ident[3])
            acks_this_round += 1

        async def pump(until_acks: float = float("inf")) -> None:
            while acks_this_round < until_acks:
                line = await lines.next()
                if line is None:
                    return          # the child died on its own: caught below
                handle(line)

        try:
            with trio.fail_after(60):       # a wedged child fails the test, never hangs it
                if mode == "early":         # maybe still recovering, maybe appending
                    with trio.move_on_after(rng.uniform(0.05, 0.5)):
                        await pump()
                else:
                    while rnd not in ready and not lines.eof:
                        line = await lines.next()
                        if line is not None:
                            handle(line)
                    if mode == "time":
                        with trio.move_on_after(rng.uniform(0.2, 1.0)):
                            await pump()
                    else:
                        await pump(until_acks=rng.randint(1, 400))
        finally:
            proc.kill()
            with trio.move_on_after(30):
                await pump()                # lines written before the kill are acks too
            await proc.wait()
            await proc.stdout.aclose()
        assert proc.returncode == -signal.SIGKILL, (
            f"{ctx}: child exited with {proc.returncode} in round {rnd}:\n"
            + err_path.read_text())
        if mode != "early":
            assert rnd in ready and acks_this_round > 0, f"{ctx}: round {rnd} appended nothing"
        # The next round starts from what this one left: nothing acknowledged lost.
        if rnd in ready and acked:
            earlier = [o for o, ident in acked.items() if ident[0] < rnd]
            assert not earlier or ready[rnd] > max(earlier), ctx

    session_dir = data / "sessions" / child.SESSION
    assert len(segment_files(session_dir)) > 3, "segments should have rolled"

    async with broker.open_broker(data, segment_bytes=child.SEGMENT_BYTES) as b:
        records = await read_all(b, child.SESSION)

        # Every record on disk, acknowledged or not, is whole and appears once.
        idents = []
        for offset, p in enumerate(records):
            ident = child.parse(p)
            assert p == child.payload(*ident), f"{ctx}: offset {offset} damaged"
            idents.append(ident)
        assert len(set(idents)) == len(idents), f"{ctx}: a record is stored twice"

        # Every acknowledged record is at the offset it was acknowledged with.
        for offset, ident in sorted(acked.items()):
            assert offset < len(records), f"{ctx}: acknowledged offset {offset} lost"
            assert idents[offset] == ident, f"{ctx}: offset {offset} holds {idents[offset]}"

        # In order: rounds follow each other; each writer's records are its
        # sequence 0, 1, 2, ... (a prefix: the last unacknowledged append may or
        # may not have reached the file), and at most one append per writer
        # per round is on disk without an acknowledgement.
        rounds = [i[0] for i in idents]
        assert rounds == sorted(rounds), ctx
        seqs: dict[tuple[int, int], list[int]] = defaultdict(list)
        for r, t, s, _ in idents:
            seqs[r, t].append(s)
        for (r, t), ss in seqs.items():
            assert ss == list(range(len(ss))), f"{ctx}: round {r} writer {t}: {ss[:20]}"
        for rnd in range(len(ROUNDS)):
            on_disk = sum(1 for i in idents if i[0] == rnd)
            acked_n = sum(1 for i in acked.values() if i[0] == rnd)
            assert acked_n <= on_disk <= acked_n + child.TASKS * child.MAX_BATCH, ctx
            if rnd in ready:
                assert ready[rnd] == sum(1 for i in idents if i[0] < rnd), ctx

        # And the session takes appends at the next offset.
        n = len(records)
        assert await b.append(child.SESSION, b"after the crashes") == n
    async with broker.open_broker(data, segment_bytes=child.SEGMENT_BYTES) as b:
        assert (await b.read(child.SESSION, n)).payloads() == [b"after the crashes"]


# ------------------------------------------------------------------ torn tail

def _tear(path: Path, last: tuple[int, int, bytes], how: str) -> int:
    """Damage the end of the active segment as a crash mid-write would.

    Returns the size the file should be cut back to by recovery.
    """
    pos, offset, payload = last
    size = path.stat().st_size
    if how.startswith("cut:"):              # the last record only partly reached the disk
        keep = {"header": 10, "payload": HEADER.size + len(payload) // 2,
                "crc": HEADER.size + len(payload) + 1}[how[4:]]
        os.truncate(path, pos + keep)
        return pos
    with open(path, "ab") as f:
        if how == "half-record":            # the start of one more record, then nothing
            f.write(_core.encode(offset + 1, 0, [b"n" * 500])[:HEADER.size + 100])
        elif how == "zeros":                # the file grew, its data never landed
            f.write(bytes(4096))
        else:
            raise AssertionError(how)
    return size


@pytest.mark.parametrize("how", ["cut:header", "cut:payload", "cut:crc", "half-record",
                                 "zeros"])
async def test_torn_tail_is_truncated_and_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str) -> None:
    payloads = [b"record %d " % i * (i % 7 + 1) for i in range(60)]
    async with broker.open_broker(tmp_path, segment_bytes=1024, ring_bytes=512) as b:
        await b.create("s")
        for i in range(0, 40):
            assert await b.append("s", payloads[i]) == i
        assert await b.append_many("s", payloads[40:]) == range(40, 60)
    segs = segment_files(tmp_path / "sessions" / "s")
    assert len(segs) >= 3
    active = segs[-1]
    records = parse_segment(active)
    assert records[-1][1] == 59
    cut_to = _tear(active, records[-1], how)
    torn = 59 if how.startswith("cut:") else 60     # first offset that is not whole
    dropped = active.stat().st_size - cut_to
    assert dropped > 0

    caplog.set_level(logging.INFO, logger="broker.log")
    async with broker.open_broker(tmp_path, segment_bytes=1024, ring_bytes=512) as b:
        info = await b.info("s")
        assert (info.start_offset, info.next_offset) == (0, torn)
        assert await read_all(b, "s") == payloads[:torn]
        warnings = [r for r in caplog.records
                    if r.name == "broker.log" and r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        msg = warnings[0].getMessage()
        assert str(active) in msg and f"truncated {dropped} bytes" in msg, msg
        assert active.stat().st_size == cut_to
        # Appends carry on at the first offset that was lost.
        assert await b.append("s", b"new") == torn
        assert await b.append_many("s", [b"x", b"y"]) == range(torn + 1, torn + 3)
        assert (await b.read("s", torn)).payloads() == [b"new", b"x", b"y"]
        assert (await read_all(b, "s"))[torn - 1:] == [payloads[torn - 1], b"new", b"x", b"y"]

    caplog.clear()
    async with broker.open_broker(tmp_path, segment_bytes=1024, ring_bytes=512) as b:
        assert await read_all(b, "s") == payloads[:torn] + [b"new", b"x", b"y"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

"""The child process of tests/test_crash.py: append until killed.

    python _crash_child.py DATA_DIR ROUND SEED

Opens a broker on DATA_DIR with the default fsync policy (group commit) and
small segments, creates (or reopens) the session ``crash`` and prints
``ready <next_offset>``.  Then a few concurrent writer tasks append forever,
single records and append_many batches of varied sizes, and print one line
per record *after* the append call returned (the record is acknowledged)::

    ack <offset> <round> <task> <seq> <size>

Every payload is ``payload(round, task, seq, size)``: it names itself, so the
parent can check any record it finds on disk byte for byte, acknowledged or not.
The parent imports this module for ``payload`` and the constants.
"""

from __future__ import annotations

import hashlib
import random
import sys

SESSION = "crash"
SEGMENT_BYTES = 64 * 1024
TASKS = 3               # concurrent writers: appends share group commits
MAX_BATCH = 12          # records in one append_many


def payload(round_: int, task: int, seq: int, size: int) -> bytes:
    """The payload of record ``seq`` of writer ``task`` in round ``round_``."""
    head = b"%d.%d.%d.%d|" % (round_, task, seq, size)
    n = max(0, size - len(head))
    fill = hashlib.sha256(head).digest()
    return head + (fill * (n // len(fill) + 1))[:n]


def parse(data: bytes) -> tuple[int, int, int, int]:
    """(round, task, seq, size) named by a payload."""
    head = data[: data.index(b"|")]
    r, t, s, n = (int(x) for x in head.split(b"."))
    return r, t, s, n


def _size(rng: random.Random) -> int:
    x = rng.random()
    if x < 0.6:
        return rng.randint(0, 300)          # chat-message sized
    if x < 0.95:
        return rng.randint(300, 8 * 1024)
    return rng.randint(16 * 1024, 40 * 1024)  # a good part of a segment


async def _main(data_dir: str, round_: int, seed: int) -> None:
    import trio

    import broker

    out = sys.stdout
    async with broker.open_broker(data_dir, segment_bytes=SEGMENT_BYTES,
                                  ring_bytes=16 * 1024) as b:
        await b.create(SESSION)
        info = await b.info(SESSION)
        out.write(f"ready {info.next_offset}\n")
        out.flush()

        async def writer(task: int) -> None:
            rng = random.Random(f"{seed}-{round_}-{task}")
            seq = 0
            while True:
                k = 1 if rng.random() < 0.6 else rng.randint(2, MAX_BATCH)
                sizes = [_size(rng) for _ in range(k)]
                batch = [payload(round_, task, seq + i, n) for i, n in enumerate(sizes)]
                if k == 1 and rng.random() < 0.5:
                    first = await b.append(SESSION, batch[0])
                    offsets = range(first, first + 1)
                else:
                    offsets = await b.append_many(SESSION, batch)
                if len(offsets) != k:
                    raise AssertionError(f"append_many of {k} returned {offsets}")
                # One write per acknowledged call, after it returned.
                out.write("".join(f"ack {o} {round_} {task} {seq + i} {sizes[i]}\n"
                                  for i, o in enumerate(offsets)))
                out.flush()
                seq += k

        async with trio.open_nursery() as nursery:
            for task in range(TASKS):
                nursery.start_soon(writer, task)


if __name__ == "__main__":
    import trio

    trio.run(_main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

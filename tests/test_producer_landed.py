"""Where an idempotent producer's appends landed, across restarts.

A retry that the session recognises as a duplicate is answered with the
offsets where the original landed, so a publisher whose ack was lost still
learns them.  The session keeps them in memory (the last 64 appends of each
producer) and rebuilds them when it is opened: the first record of every
producer append carries the APPEND_START flag and its last one the stamp, so
the pair gives the range.  What is read back for that is bounded (the
records after the producer snapshot, which recovery reads anyway, and a few
thousand before it); a retry of something older is still a duplicate,
answered without offsets.  Each test runs a broker on a temporary data
directory, closes it and opens it again.
"""

from __future__ import annotations

from pathlib import Path
import pytest

import broker
from broker import _session
from broker._session import ProduceResult


async def produce(b: broker.Broker, payloads: list[bytes], seq: int,
                  publisher: str | None = None, producer: str = "p") -> ProduceResult:
    return await b.produce("s", payloads, producer=producer, epoch=0, seq=seq,
                           publisher=publisher)


async def test_duplicates_after_a_restart_are_answered_with_their_offsets(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with broker.open_broker(data) as b:
        await b.create("s")
        assert (await produce(b, [b"a"], 0)).offsets == range(0, 1)
        await b.append_many("s", [b"plain"])
        assert (await produce(b, [b"b", b"c", b"d"], 1)).offsets == range(2, 5)
        # Another publisher's producer of the same id, over the publish path
        # with a kind and meta (as a WebSocket publish, or HTTP with a token).
        got = await b.publish("s", [b"e", b"f"], kind=1, publisher="alice",
                              metas=[{"x": 1}, None], producer=("p", 0, 0))
        assert isinstance(got, ProduceResult) and got.offsets == range(5, 7)
    async with broker.open_broker(data) as b:
        for payloads, seq, offsets in (([b"a"], 0, range(0, 1)), ([b"b", b"c", b"d"], 1,
                                                                   range(2, 5))):
            dup = await produce(b, payloads, seq)
            assert (dup.status, dup.offsets) == ("duplicate", offsets)
        dup = await produce(b, [b"e", b"f"], 0, publisher="alice")
        assert (dup.status, dup.offsets) == ("duplicate", range(5, 7))
        # The producer table came back too: the next seq is accepted, a gap is not.
        assert (await produce(b, [b"g"], 3)).status == "sequence_gap"
        assert (await produce(b, [b"g"], 2)).offsets == range(7, 8)
        assert (await b.info("s")).next_offset == 8


@pytest.mark.parametrize("size", [1, 300])      # 300: more than one chunk read back
async def test_landings_before_the_snapshot_are_read_back(tmp_path: Path, size: int) -> None:
    """The snapshot taken on close is past every append: the records before
    it are read back for where they landed."""
    data = tmp_path / "data"
    payloads = [b"r%d" % i for i in range(size)]
    async with broker.open_broker(data) as b:
        await b.create("s")
        await b.append_many("s", [b"x"] * 10)
        assert (await produce(b, payloads, 0)).offsets == range(10, 10 + size)
        await b.close_session("s")
    async with broker.open_broker(data) as b:
        snapshot = (await b.info("s")).extra["producers"]["at"]
        assert snapshot == 10 + size
        dup = await produce(b, payloads, 0)
        assert (dup.status, dup.offsets, dup.closed) == ("duplicate", range(10, 10 + size), True)


@pytest.mark.parametrize("what", ["records", "bytes"])
async def test_what_is_read_back_is_bounded(tmp_path: Path, what: str) -> None:
    """An append further back than the bound, before the snapshot, is still a
    duplicate, answered without offsets; the producer table is whole."""
    data = tmp_path / "data"
    async with broker.open_broker(data) as b:
        await b.create("s")
        assert (await produce(b, [b"a"], 0)).offsets == range(0, 1)
        if what == "records":
            await b.append_many("s", [b"x"] * (_session._LANDED_TAIL_RECORDS + 1))
        else:
            big = b"x" * (1 << 20)
            for _ in range(_session._LANDED_TAIL_BYTES // len(big) + 1):
                await b.append_many("s", [big])
        await b.close_session("s")
    async with broker.open_broker(data) as b:
        dup = await produce(b, [b"a"], 0)
        assert (dup.status, dup.offsets) == ("duplicate", None)
        assert (await produce(b, [b"b"], 2)).status == "sequence_gap"


async def test_appends_written_without_the_start_flag(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Logs written before the flag existed: their duplicates are answered
    without offsets, and the producer table is rebuilt as before."""
    data = tmp_path / "data"
    with monkeypatch.context() as m:
        m.setattr(_session, "APPEND_START", 0)       # as an older broker wrote
        async with broker.open_broker(data) as b:
            await b.create("s")
            await produce(b, [b"a", b"b"], 0)
            await produce(b, [b"c"], 1)
    async with broker.open_broker(data) as b:
        dup = await produce(b, [b"c"], 1)
        assert (dup.status, dup.offsets) == ("duplicate", None)
        assert (await produce(b, [b"d", b"e"], 2)).offsets == range(3, 5)
        dup = await produce(b, [b"d", b"e"], 2)
        assert (dup.status, dup.offsets) == ("duplicate", range(3, 5))


async def test_the_start_flag_is_not_shown_as_a_kind(tmp_path: Path) -> None:
    async with broker.open_broker(tmp_path / "data") as b:
        await b.create("s")
        await b.publish("s", [b"a", b"b"], kind=1, producer=("p", 0, 0))
        batch = await b.read("s")
        kinds = [(batch.flags(i) >> broker._core.KIND_SHIFT) & _session.MAX_KIND
                 for i in range(len(batch))]
        assert kinds == [1, 1]
        assert batch.flags(0) & _session.APPEND_START and not batch.flags(1) & _session.APPEND_START

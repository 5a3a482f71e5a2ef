"""The broker through its public API: lifecycle, durability policy, reads, actors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

import broker
from broker import FsyncPolicy


async def test_create_is_idempotent_and_conflicts_on_difference(b: broker.Broker) -> None:
    info, created = await b.create("s", content_type="text/plain", ttl_s=60)
    assert created and info.next_offset == 0 and info.epoch >= 1
    again, created = await b.create("s", content_type="text/plain", ttl_s=60)
    assert not created and again.epoch == info.epoch
    with pytest.raises(broker.SessionExists) as e:
        await b.create("s", content_type="application/json", ttl_s=60)
    assert e.value.code == "session_conflict"


@pytest.mark.parametrize("op", ["append", "read", "info", "close", "delete"])
async def test_unknown_session_is_a_clear_error(b: broker.Broker, op: str) -> None:
    calls = {
        "append": lambda: b.append("nope", b"x"),
        "read": lambda: b.read("nope"),
        "info": lambda: b.info("nope"),
        "close": lambda: b.close_session("nope"),
        "delete": lambda: b.delete("nope"),
    }
    with pytest.raises(broker.SessionNotFound) as e:
        await calls[op]()
    assert e.value.code == "session_not_found" and "nope" in str(e.value)


@pytest.mark.parametrize("name", ["", "a\x00b"])
async def test_bad_names_are_refused(b: broker.Broker, name: str) -> None:
    with pytest.raises(broker.InvalidSessionName):
        await b.create(name)


@pytest.mark.parametrize("name", ["..", "../../etc/passwd", "/abs", "a/b/../c", "é/ü", "x" * 900])
async def test_names_that_could_escape_are_refused(tmp_path: Path, name: str) -> None:
    # The full list, over every transport, is in test_names.py.
    data = tmp_path / "data"
    async with broker.open_broker(data) as b:
        with pytest.raises(broker.InvalidSessionName):
            await b.create(name)
    assert {p.name for p in tmp_path.iterdir()} == {"data"}


@pytest.mark.parametrize("name", ["a", "chat/u1/run-7", "x.y~z:1@2+3=4,5", "x" * 255])
async def test_names_stay_inside_the_data_dir(tmp_path: Path, name: str) -> None:
    data = tmp_path / "data"
    async with broker.open_broker(data) as b:
        await b.create(name)
        await b.append(name, b"v")
        assert (await b.read(name)).payloads() == [b"v"]
    inside = {p.resolve() for p in data.rglob("*")}
    assert all(str(p).startswith(str(data.resolve())) for p in inside)
    assert {p.name for p in tmp_path.iterdir()} == {"data"}


async def test_append_read_offsets_and_sentinels(b: broker.Broker) -> None:
    await b.create("s")
    assert await b.append("s", b"a") == 0
    assert await b.append_many("s", [b"b", b"c", b""]) == range(1, 4)
    assert (await b.read("s", broker.START)).payloads() == [b"a", b"b", b"c", b""]
    assert (await b.read("s", 2)).payloads() == [b"c", b""]
    tail = await b.read("s", broker.NOW)
    assert len(tail) == 0 and tail.next_offset == 4
    with pytest.raises(broker.OffsetOutOfRange):
        await b.read("s", 5)
    batch = await b.read("s", 0, max_records=2)
    assert batch.payloads() == [b"a", b"b"] and batch.next_offset == 2


async def test_reads_come_from_disk_once_out_of_the_ring(b: broker.Broker) -> None:
    await b.create("s")
    payloads = [bytes([i % 256]) * 300 for i in range(200)]   # 60 kB: many segments
    for i in range(0, 200, 10):
        await b.append_many("s", payloads[i:i + 10])
    got: list[bytes] = []
    offset = 0
    while offset < 200:
        batch = await b.read("s", offset, max_records=7)
        got.extend(batch.payloads())
        offset = batch.next_offset
    assert got == payloads


async def test_close_refuses_appends_and_ends_followers(b: broker.Broker) -> None:
    await b.create("s")
    await b.append_many("s", [b"1", b"2"])
    seen: list[bytes] = []

    async def follow() -> None:
        async for batch in b.follow("s", 0):
            seen.extend(batch.payloads())

    async with trio.open_nursery() as n:
        n.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        await b.append("s", b"3")
        info = await b.close_session("s")
        assert info.closed
    assert seen == [b"1", b"2", b"3"]
    with pytest.raises(broker.SessionClosed):
        await b.append("s", b"4")


async def test_delete_tells_followers_and_recreate_changes_epoch(b: broker.Broker) -> None:
    info, _ = await b.create("s")
    await b.append("s", b"old")
    async with b.subscribe("s", broker.NOW) as sub:
        async with trio.open_nursery() as n:
            async def wait_next() -> None:
                with pytest.raises(broker.SessionDeleted):
                    await sub.next()
            n.start_soon(wait_next)
            await trio.testing.wait_all_tasks_blocked()
            await b.delete("s")
    assert not (Path(b.data_dir) / "sessions" / "s").exists()      # files removed
    with pytest.raises(broker.SessionNotFound):
        await b.read("s")
    new, created = await b.create("s")
    assert created and new.epoch > info.epoch and new.next_offset == 0
    with pytest.raises(broker.EpochChanged):
        async with b.subscribe("s", 0, epoch=info.epoch):
            pass


async def test_create_with_initial_records_and_closed(b: broker.Broker) -> None:
    info, created = await b.create("s", content_type="text/plain; charset=utf-8",
                                   initial=[b"a", b"b"], closed=True)
    assert created and info.closed and info.next_offset == 2
    assert (await b.read("s")).payloads() == [b"a", b"b"]
    again, created = await b.create("s", content_type="Text/Plain", closed=True,
                                    initial=[b"ignored"])
    assert not created and again.next_offset == 2      # same media type: idempotent
    with pytest.raises(broker.SessionExists):
        await b.create("s", content_type="text/plain")  # differs: not closed
    with pytest.raises(broker.SessionClosed):
        await b.append("s", b"c")


async def test_ttl_is_a_sliding_window(tmp_path: Path) -> None:
    async with broker.open_broker(tmp_path) as b:
        await b.create("s", ttl_s=3600)
        actor = b._actors["s"]
        actor.last_access -= 3000          # used 50 minutes ago: still alive
        await b.append("s", b"x")          # and this use restarts the window
        assert actor.last_access > actor.meta.created_at  # type: ignore[union-attr]
        actor.last_access -= 3601          # idle for over an hour: gone
        with pytest.raises(broker.SessionNotFound):
            await b.read("s")


async def test_expired_session_is_gone(b: broker.Broker) -> None:
    await b.create("short", expires_at=1.0)      # long past
    with pytest.raises(broker.SessionNotFound):
        await b.append("short", b"x")


async def test_retention_drops_old_segments_and_reports_earliest(tmp_path: Path) -> None:
    async with broker.open_broker(tmp_path, segment_bytes=1024, retention_bytes=2048) as b:
        await b.create("s")
        for i in range(100):
            await b.append_many("s", [b"%03d" % i * 10])
        info = await b.info("s")
        assert info.start_offset > 0
        with pytest.raises(broker.OffsetTooOld) as e:
            await b.read("s", 0)
        assert e.value.earliest == info.start_offset
        batch = await b.read("s", broker.START)
        assert batch.first_offset == info.start_offset
        assert batch.payloads()[0] == b"%03d" % info.start_offset * 10


@pytest.mark.parametrize("policy", ["always", "group:50ms:100000", "never"])
async def test_concurrent_appends_share_fsyncs(tmp_path: Path, policy: str) -> None:
    async with broker.open_broker(tmp_path, fsync=FsyncPolicy.parse(policy)) as b:
        await b.create("s")
        offsets: list[int] = []

        async def publish(i: int) -> None:
            offsets.append(await b.append("s", b"%d" % i))

        async with trio.open_nursery() as n:
            for i in range(200):
                n.start_soon(publish, i)
        assert sorted(offsets) == list(range(200))
        syncs = b._actors["s"].log.syncs      # type: ignore[union-attr]
        if policy == "never":
            assert syncs == 0
        else:
            assert 1 <= syncs < 200          # many appends per fsync


async def test_group_commit_flushes_on_record_count(tmp_path: Path) -> None:
    # A one-hour interval: only the record threshold can trigger the fsync.
    async with broker.open_broker(tmp_path, fsync=FsyncPolicy("group", 3_600_000, 10)) as b:
        await b.create("s")
        assert await b.append_many("s", [b"x"] * 10) == range(0, 10)


async def test_acknowledged_means_readable_after_reopen(tmp_path: Path) -> None:
    async with broker.open_broker(tmp_path) as b:
        await b.create("s", content_type="text/plain")
        await b.append_many("s", [b"%d" % i for i in range(1000)])
        await b.close_session("s")
    async with broker.open_broker(tmp_path) as b:
        info = await b.info("s")
        assert (info.next_offset, info.closed, info.content_type) == (1000, True, "text/plain")
        got = []
        async for batch in b.follow("s"):
            got.extend(batch.payloads())
        assert got == [b"%d" % i for i in range(1000)]


async def test_one_broker_per_directory(tmp_path: Path) -> None:
    async with broker.open_broker(tmp_path):
        with pytest.raises(broker.BrokerError, match="in use"):
            async with broker.open_broker(tmp_path):
                pass


async def test_idle_actors_are_reaped_and_files_closed(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    async with broker.open_broker(tmp_path, idle_timeout_s=5, fsync=FsyncPolicy("always")) as b:
        for i in range(20):
            await b.create(f"s{i}")
            await b.append(f"s{i}", b"x")
        assert b.active_sessions == 20 and b.open_files >= 20
        mock_clock.jump(6)
        await trio.testing.wait_all_tasks_blocked()
        assert b.active_sessions == 0 and b.open_files == 0
        assert (await b.read("s3")).payloads() == [b"x"]    # comes back on use


async def test_a_subscriber_keeps_its_actor(tmp_path: Path,
                                            mock_clock: trio.testing.MockClock) -> None:
    async with broker.open_broker(tmp_path, idle_timeout_s=1, fsync=FsyncPolicy("always")) as b:
        await b.create("s")
        async with b.subscribe("s", broker.NOW) as sub:
            mock_clock.jump(10)
            await trio.testing.wait_all_tasks_blocked()
            assert b.active_sessions == 1
            await b.append("s", b"late")
            assert (await sub.next()).payloads() == [b"late"]


@pytest.mark.slow
async def test_open_files_stay_bounded_with_many_sessions(tmp_path: Path) -> None:
    """10,000 sessions on disk, 1,000 active: descriptors stay far below 1,024."""
    cfg = broker.BrokerConfig(fsync=FsyncPolicy("never"), max_open_files=256)
    async with broker.open_broker(tmp_path, cfg) as b:
        for i in range(10_000):
            await b.create(f"s{i}")
        for i in range(0, 10_000, 10):
            await b.append(f"s{i}", b"x")
        assert b.open_files <= 256
        fds = len(os.listdir("/proc/self/fd"))
        assert fds < 512, fds
        assert b.active_sessions >= 1000
        for i in range(0, 10_000, 10):
            assert (await b.read(f"s{i}")).payloads() == [b"x"]
        assert b.open_files <= 256


async def test_oversized_record_is_refused_and_nothing_else_is_disturbed(tmp_path: Path) -> None:
    async with broker.open_broker(tmp_path, max_record_bytes=100) as b:
        await b.create("s")
        await b.append("s", b"ok")
        with pytest.raises(broker.RecordTooLarge) as e:
            await b.append_many("s", [b"fine", b"x" * 101])
        assert e.value.code == "record_too_large" and e.value.limit == 100
        assert await b.append("s", b"after") == 1       # the refused batch took no offsets
        assert (await b.read("s")).payloads() == [b"ok", b"after"]


async def test_writer_sequence_must_rise_and_survives_restart(tmp_path: Path) -> None:
    async with broker.open_broker(tmp_path) as b:
        await b.create("s")
        await b.append_many("s", [b"a"], seq="09")
        await b.append_many("s", [b"b"], seq="10")
        for stale in ("10", "09", "1"):
            with pytest.raises(broker.SequenceConflict):
                await b.append_many("s", [b"x"], seq=stale)
    async with broker.open_broker(tmp_path) as b:
        with pytest.raises(broker.SequenceConflict):
            await b.append_many("s", [b"x"], seq="10")
        assert await b.append_many("s", [b"c"], seq="11") == range(2, 3)
        assert (await b.read("s")).payloads() == [b"a", b"b", b"c"]


async def test_idempotent_producer_dedupes_and_survives_restart(tmp_path: Path) -> None:
    async with broker.open_broker(tmp_path) as b:
        await b.create("s")
        r = await b.produce("s", [b"a", b"b"], producer="p", epoch=0, seq=0)
        assert (r.status, r.offsets) == ("accepted", range(0, 2))
        dup = await b.produce("s", [b"a", b"b"], producer="p", epoch=0, seq=0)
        assert (dup.status, dup.last_seq) == ("duplicate", 0)
        gap = await b.produce("s", [b"x"], producer="p", epoch=0, seq=5)
        assert (gap.status, gap.expected_seq, gap.received_seq) == ("sequence_gap", 1, 5)
        assert (await b.produce("s", [b"c"], producer="p", epoch=0, seq=1)).status == "accepted"
        assert (await b.produce("s", [b"n"], producer="new", epoch=3, seq=1)).status \
            == "sequence_gap"
    # Restarted: the table comes back from the snapshot plus the stamps after it.
    async with broker.open_broker(tmp_path) as b:
        again = await b.produce("s", [b"c"], producer="p", epoch=0, seq=1)
        assert (again.status, again.last_seq) == ("duplicate", 1)
        bumped = await b.produce("s", [b"d"], producer="p", epoch=1, seq=0)
        assert bumped.status == "accepted"
        stale = await b.produce("s", [b"z"], producer="p", epoch=0, seq=2)
        assert (stale.status, stale.epoch) == ("stale_epoch", 1)
        assert (await b.produce("s", [b"z"], producer="p", epoch=2, seq=3)).status \
            == "invalid_epoch_seq"
        closing = await b.produce("s", [b"e"], producer="p", epoch=1, seq=1, close=True)
        assert closing.status == "accepted" and closing.closed
        assert (await b.info("s")).closed
        retry = await b.produce("s", [b"e"], producer="p", epoch=1, seq=1, close=True)
        assert (retry.status, retry.closed) == ("duplicate", True)
        assert (await b.produce("s", [b"f"], producer="p", epoch=1, seq=2)).status == "closed"
        assert (await b.read("s")).payloads() == [b"a", b"b", b"c", b"d", b"e"]


def _headers(batch: broker._core.Batch) -> list[tuple[int, object]]:
    import msgpack
    return [(batch.flags(i) >> broker._core.KIND_SHIFT,
             msgpack.unpackb(m) if (m := batch.meta(i)) is not None else None)
            for i in range(len(batch))]


async def test_published_headers_survive_ring_disk_and_restart(tmp_path: Path) -> None:
    want = [(0, ["agent"]), (0, ["agent", {"n": 1}]), (1, ["user", "cancel"]),
            (0, [None, None, ["p", 0, 0]]), (0, None)]
    async with broker.open_broker(tmp_path) as b:
        await b.create("s")
        assert await b.publish("s", [b"a", b"b"], publisher="agent", metas=[None, {"n": 1}]) \
            == range(0, 2)
        assert await b.publish("s", [b"stop"], kind=1, publisher="user",
                               metas=["cancel"]) == range(2, 3)
        r = await b.publish("s", [b"p"], producer=("p", 0, 0))
        assert isinstance(r, broker.ProduceResult) and r.offsets == range(3, 4)
        await b.append("s", b"plain")
        assert _headers(await b.read("s")) == want          # from the ring
        with pytest.raises(ValueError):
            await b.publish("s", [b"x"], kind=64)
    async with broker.open_broker(tmp_path) as b:
        assert _headers(await b.read("s")) == want          # from disk
        dup = await b.publish("s", [b"p"], producer=("p", 0, 0))
        assert isinstance(dup, broker.ProduceResult) and dup.status == "duplicate"


async def test_a_session_with_meta_keyed_by_numbers_reopens(tmp_path: Path) -> None:
    # Recovery reads every header after the producer snapshot; a meta map
    # with non-text keys (any msgpack value is allowed) once stopped it.
    async with broker.open_broker(tmp_path) as b:
        await b.create("s")
        await b.publish("s", [b"a"], publisher="p", producer=("pid", 0, 0))
        await b.publish("s", [b"x"], publisher="p", metas=[{1: "one"}])
        await b.publish("s", [b"y"], publisher="p", producer=("pid", 0, 1))
    async with broker.open_broker(tmp_path) as b:
        assert (await b.read("s")).payloads() == [b"a", b"x", b"y"]
        dup = await b.publish("s", [b"y"], publisher="p", producer=("pid", 0, 1))
        assert isinstance(dup, broker.ProduceResult) and dup.status == "duplicate"


async def test_pipelined_publishes_are_acked_in_order(tmp_path: Path) -> None:
    async with broker.open_broker(tmp_path, fsync=FsyncPolicy.parse("always")) as b:
        await b.create("s")
        acked: list[range] = []
        done = trio.Event()

        def on_done(reply: broker.Reply) -> None:
            acked.append(reply.value)
            if len(acked) == 300:
                done.set()

        for i in range(300):
            await b.submit_publish("s", [b"%d" % i] * 3, on_done=on_done)
        await done.wait()
        assert acked == [range(3 * i, 3 * i + 3) for i in range(300)]
        assert b._actors["s"].log.syncs < 300     # type: ignore[union-attr]


@pytest.mark.parametrize("policy", ["always", "group"])
async def test_a_failed_fsync_fails_its_appends_and_the_session_recovers(
        tmp_path: Path, policy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import broker._session as session_mod

    real = session_mod.fsync_all

    def failing(fds: list[int], directory: str | None) -> None:
        raise OSError(5, "Input/output error (injected)")

    async with broker.open_broker(tmp_path, fsync=FsyncPolicy.parse(policy)) as b:
        await b.create("s")
        await b.create("other")
        assert await b.append("s", b"kept") == 0
        monkeypatch.setattr(session_mod, "fsync_all", failing)
        with pytest.raises(broker.StorageError) as e:
            await b.append("s", b"lost")
        assert "fsync failed" in str(e.value)
        monkeypatch.setattr(session_mod, "fsync_all", real)
        # The failed actor stopped; the next use recovers the session from disk.
        assert await b.append("s", b"after") >= 1
        assert (await b.read("s")).payloads()[0] == b"kept"
        assert await b.append("other", b"fine") == 0

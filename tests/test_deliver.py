"""When readers see a record, and what a machine crash does to what they saw.

Readers see a record once it is written, before the fsync its append's ack
waits for (``BrokerConfig.deliver = "written"``, the default).  A process
crash loses nothing written; a machine crash may, so a session written in a
run that a machine crash cut short gets a new epoch (broker/_run.py).

A machine crash is played by the test: ``BROKER_BOOT_ID`` names the boot, the
server is killed with SIGKILL, and the segment file is cut back to what was
durable (what power loss could leave) before a restart under another boot id.
The group-commit window is a minute, so an append is synced only when the
session's next command or a full group forces it: what is durable at each step
is decided by the test, not by timing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
import trio.testing

from broker import BrokerConfig, open_broker
from broker._config import FsyncPolicy
from broker._errors import EpochChanged, StorageError
from broker._frames import Ack, Attach, Attached, Data, Event, Publish
from broker._log import LOG_SUFFIX
from broker._run import BrokerState

from _serveproc import serving
from _wsraw import RawWs

SLOW_GROUP = FsyncPolicy("group", interval_ms=60_000, max_records=4)


async def _acked(task: list[int | None], broker: object, name: str, payload: bytes) -> None:
    task.append(await broker.append(name, payload))  # type: ignore[attr-defined]


async def test_a_reader_sees_a_record_before_its_append_is_acknowledged(tmp_path: Path) -> None:
    async with open_broker(tmp_path, BrokerConfig(fsync=SLOW_GROUP)) as b:
        await b.create("s")
        first: list[int | None] = []
        async with trio.open_nursery() as n:
            n.start_soon(_acked, first, b, "s", b"one")
            await trio.testing.wait_all_tasks_blocked()
            await b.sync("s")
        assert first == [0]
        sub = await b.open_subscription("s", 1)
        second: list[int | None] = []
        async with trio.open_nursery() as n:
            n.start_soon(_acked, second, b, "s", b"two")
            batch = await sub.next()
            # Shown to the reader, not yet acknowledged: its fsync is a minute away.
            assert [bytes(p) for p in batch.payloads()] == [b"two"]
            assert second == []
            await b.sync("s")
        assert second == [1]
        sub.close()


async def test_deliver_durable_shows_a_record_only_once_it_is_acknowledged(
        tmp_path: Path) -> None:
    async with open_broker(tmp_path, BrokerConfig(fsync=SLOW_GROUP, deliver="durable")) as b:
        await b.create("s")
        acked: list[int | None] = []
        async with trio.open_nursery() as n:
            n.start_soon(_acked, acked, b, "s", b"one")
            await trio.testing.wait_all_tasks_blocked()
            assert acked == []
            assert len(await b.read("s", 0)) == 0
            await b.sync("s")
        assert acked == [0]
        assert [bytes(p) for p in (await b.read("s", 0)).payloads()] == [b"one"]


def test_deliver_must_be_written_or_durable() -> None:
    from broker._cli import resolve_options

    with pytest.raises(ValueError, match="deliver"):
        BrokerConfig(deliver="eventually")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="deliver"):
        resolve_options({"deliver": "eventually"}, {})
    assert resolve_options({}, {"BROKER_DELIVER": "durable"}).deliver == "durable"
    assert resolve_options({}, {}).deliver == "written"


def test_runs_are_numbered_and_only_an_unclean_run_on_another_boot_is_lost(
        tmp_path: Path) -> None:
    path = str(tmp_path / "broker.json")
    s = BrokerState(path, True, "boot-a")
    assert (s.run, s.lost_runs, s.deliver_written) == (1, frozenset(), True)
    s.close()
    # A clean shutdown, then another boot: nothing was shown unsynced at the end.
    s = BrokerState(path, True, "boot-b")
    assert (s.run, s.lost_runs) == (2, frozenset())
    # Run 2 is killed (no close); a restart on the same boot: the page cache
    # kept every written record.
    s = BrokerState(path, True, "boot-b")
    assert (s.run, s.lost_runs) == (3, frozenset())
    # Run 3 is killed and the machine restarts: run 3 is lost, for good.
    s = BrokerState(path, True, "boot-c")
    assert (s.run, s.lost_runs) == (4, frozenset({3}))
    assert s.lost(3) and not s.lost(2) and not s.lost(None) and not s.lost("3")
    s.close()
    s = BrokerState(path, True, "boot-d")
    assert (s.run, s.lost_runs) == (5, frozenset({3}))
    epoch = s.new_epoch()
    assert BrokerState(path, True, "boot-d").new_epoch() > epoch   # never reused
    saved = json.loads(Path(path).read_bytes())
    assert saved["clean"] is False and saved["lost_runs"] == [3]


def test_without_a_boot_id_records_are_shown_only_once_durable(tmp_path: Path) -> None:
    path = str(tmp_path / "broker.json")
    s = BrokerState(path, True, None)
    assert not s.deliver_written
    # Killed without a boot id: it showed nothing unsynced, so nothing is lost.
    assert BrokerState(path, True, "boot-a").lost_runs == frozenset()


async def _next(ws: RawWs, kind: type) -> object:
    while True:
        frame = await ws.frame()
        if isinstance(frame, kind):
            return frame
        assert not isinstance(frame, (Event,)), frame


def _segment(data: Path) -> Path:
    [seg] = (data / "sessions").glob(f"*/*{LOG_SUFFIX}")
    return seg


@pytest.mark.parametrize("machine_crash", [False, True])
async def test_a_machine_crash_gives_a_session_that_showed_unsynced_records_a_new_epoch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, machine_crash: bool) -> None:
    data = tmp_path / "data"
    monkeypatch.setenv("BROKER_BOOT_ID", "boot-a")
    with serving(data, "--fsync", "group:60000ms:4") as (proc, port):
        pub = await RawWs.connect(port, client="agent")
        # Four records fill a group: fsynced and acknowledged at once.
        await pub.send(Publish(1, "chat", (b"r0", b"r1", b"r2", b"r3"), create=True))
        ack = await _next(pub, Ack)
        assert isinstance(ack, Ack) and (ack.offset, ack.count) == (0, 4)
        durable_size = _segment(data).stat().st_size
        reader = await RawWs.connect(port, client="reader")
        await reader.send(Attach(1, "chat", offset=0))
        attached = await _next(reader, Attached)
        assert isinstance(attached, Attached)
        # Two more: written and shown, their fsync a minute away.
        await pub.send(Publish(2, "chat", (b"r4", b"r5")))
        seen: list[bytes] = []
        while len(seen) < 6:
            frame = await _next(reader, Data)
            assert isinstance(frame, Data)
            seen += [r.payload for r in frame.records]
        assert seen == [b"r0", b"r1", b"r2", b"r3", b"r4", b"r5"]
        proc.kill()
        proc.wait()
        await pub.aclose()
        await reader.aclose()
    if machine_crash:
        # What power loss may leave: the page cache is gone, only the fsynced part is on disk.
        with open(_segment(data), "r+b") as f:
            f.truncate(durable_size)
        monkeypatch.setenv("BROKER_BOOT_ID", "boot-b")
    with serving(data) as (proc, port):
        reader = await RawWs.connect(port, client="reader")
        if machine_crash:
            # The reader resumes where it was, in the epoch it knew, and is told to reset.
            await reader.send(Attach(1, "chat", offset=6, epoch=attached.epoch))
            event = await reader.frame()
            assert isinstance(event, Event) and event.event == "epoch_changed"
            assert event.epoch is not None and event.epoch != attached.epoch
            await reader.send(Attach(2, "chat", offset=0))
            again = await _next(reader, Attached)
            assert isinstance(again, Attached)
            assert (again.epoch, again.next) == (event.epoch, 4)
        else:
            # Killed on the same boot: nothing written was lost, the epoch stands,
            # and the unacknowledged records are there at the offsets it saw.
            await reader.send(Attach(1, "chat", offset=4, epoch=attached.epoch))
            again = await _next(reader, Attached)
            assert isinstance(again, Attached)
            assert (again.epoch, again.next) == (attached.epoch, 6)
            frame = await _next(reader, Data)
            assert isinstance(frame, Data)
            assert [r.payload for r in frame.records] == [b"r4", b"r5"]
        await reader.aclose()


async def test_a_failed_fsync_after_a_record_was_shown_gives_the_session_a_new_epoch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import broker._session as session_mod

    real = session_mod.fsync_all

    def failing(fds: list[int], directory: str | None) -> None:
        raise OSError(5, "Input/output error (injected)")

    async with open_broker(tmp_path, BrokerConfig(fsync=SLOW_GROUP)) as b:
        info, _ = await b.create("s")
        await b.append_many("s", [b"a", b"b", b"c", b"d"])   # a full group: synced at once
        sub = await b.open_subscription("s", 4)
        failed: list[BaseException] = []

        async def doomed() -> None:
            with pytest.raises(StorageError) as e:
                await b.append("s", b"shown, then not durable")
            failed.append(e.value)

        async with trio.open_nursery() as n:
            n.start_soon(doomed)
            batch = await sub.next()
            assert [bytes(p) for p in batch.payloads()] == [b"shown, then not durable"]
            monkeypatch.setattr(session_mod, "fsync_all", failing)
            with pytest.raises(StorageError):
                await b.sync("s")
        monkeypatch.setattr(session_mod, "fsync_all", real)
        assert failed
        # What the reader saw may not be on disk: the next actor starts a new epoch.
        after = await b.info("s")
        assert after.epoch != info.epoch
        with pytest.raises(EpochChanged):
            await b.open_subscription("s", 5, epoch=info.epoch)
        sub.close()


async def test_a_clean_shutdown_is_recorded_and_a_reopen_starts_the_next_run(
        tmp_path: Path) -> None:
    async with open_broker(tmp_path) as b:
        await b.create("s")
        assert await b.append("s", b"x") == 0
        assert json.loads((tmp_path / "broker.json").read_bytes())["clean"] is False
        run = b.state.run
    saved = json.loads((tmp_path / "broker.json").read_bytes())
    assert saved["clean"] is True and saved["run"] == run
    async with open_broker(tmp_path) as b:
        assert b.state.run == run + 1
        assert (await b.info("s")).extra["run"] == run   # written in the last run, not since

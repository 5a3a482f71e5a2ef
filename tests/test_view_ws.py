"""Attaching with a view over the WebSocket (docs/protocol.md, docs/ai.md "Views").

A device that attaches with ``view: true`` gets ``attached``, one ``view``
frame (the conversation as a snapshot, exact at ``next``), then the records
from ``next`` on.  The tests hold every device to the log: a late joiner
ends with the transcript of a device that watched live from offset 0, having
received one frame and no record for everything before it joined; a view at
any offset plus the records after it is the full replay; and thousands of
cuts (detach, dropped connections; attach again with a view or from the
offset reached) leave every device with the log's transcript.  Devices are
raw sockets (conftest.RawWs) that count what they receive.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
import trio

from _wsraw import RawWs
from broker import _frames, client
from broker._convo import Conversation, Encoder, View as ConvoView
from broker._frames import Attach, Attached, Data, Detach, Detached, Error, Event, UpToDate, View
from broker._session import START
from conftest import serve_in_process
from test_view_store import NEVER, WAIT, Rec, fold, publish, script

ALL_AI = (1, 2, 3, 4, 5, 6, 7)


class Device:
    """A client that folds what it reads, and counts what reading cost it."""

    def __init__(self, json: bool = False) -> None:
        self.conv: Conversation | None = None
        self.json = json
        self.epoch: int | None = None
        self.frames = 0            # view and data frames received
        self.records = 0           # records received in data frames
        self.views = 0
        self.trail: list[tuple[int, int]] = []     # (frames so far, conv.next) after each

    def take(self, frame: _frames.Frame) -> None:
        if isinstance(frame, Attached):
            self.epoch = frame.epoch
            if self.conv is None:
                self.conv = Conversation(json=self.json)
            return
        if isinstance(frame, View):
            self.conv = Conversation.from_snapshot(frame.view)
            self.views += 1
        elif isinstance(frame, Data):
            assert self.conv is not None
            for r in frame.records:
                self.conv.apply_record(r)
            self.records += len(frame.records)
        elif isinstance(frame, UpToDate):
            assert self.conv is not None
            if frame.next > self.conv.next:
                self.conv.advance(frame.next)
            return
        else:
            raise AssertionError(f"unexpected {frame}")
        self.frames += 1
        self.trail.append((self.frames, self.conv.next))

    def transcript(self, end: int) -> ConvoView:
        assert self.conv is not None
        if self.conv.next < end:
            self.conv.advance(end)
        return self.conv.view()


async def next_frame(ws: RawWs) -> _frames.Frame:
    """The next frame that is not a heartbeat."""
    while True:
        frame = await ws.frame()
        if not isinstance(frame, (_frames.Ping, _frames.Pong)):
            return frame


async def read_until(ws: RawWs, dev: Device, end: int) -> None:
    """Read data until the device has folded everything below ``end``."""
    with trio.fail_after(WAIT):
        while dev.conv is None or dev.conv.next < end:
            dev.take(await next_frame(ws))


async def attach_view(ws: RawWs, dev: Device, request_id: int, name: str = "chat",
                      **kw: Any) -> tuple[Attached, View]:
    await ws.send(Attach(request_id, name, view=True, **kw))
    attached, view = await next_frame(ws), await next_frame(ws)
    assert isinstance(attached, Attached) and attached.id == request_id, attached
    assert isinstance(view, View) and view.next == attached.offset, view
    dev.take(attached)
    dev.take(view)
    return attached, view


# ---------------------------------------------------------------- late joiners

@pytest.mark.parametrize("join", [0.0, 0.5, 1.0])
async def test_a_late_joiner_sees_what_a_live_watcher_saw_from_one_frame(
        tmp_path: Path, raw: Any, join: float) -> None:
    recs = script(11, turns=12)
    end, cut = len(recs), int(len(recs) * join)
    async with serve_in_process(tmp_path, fsync=NEVER) as s:
        await s.broker.create("chat")
        watcher, live = await raw(s.port, client="live"), Device()
        await watcher.send(Attach(1, "chat", 0))
        live.take(await next_frame(watcher))
        late = Device()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_until, watcher, live, end)
            await publish(s.broker, "chat", recs[:cut], each=True)
            joiner = await raw(s.port, client="late")
            attached, view = await attach_view(joiner, late, 1)
            assert attached.offset == view.next == cut
            await publish(s.broker, "chat", recs[cut:], each=True)
            await read_until(joiner, late, end)

    expected = fold(recs, end=end).view()
    assert late.transcript(end) == live.transcript(end) == expected
    # Everything before the join came as one frame and no record...
    assert (late.views, late.records) == (1, end - cut)
    assert late.trail[0] == (1, cut)
    # ... where the watcher needed a data frame per publish.
    live_frames_to_cut = next((f for f, n in live.trail if n >= cut), 0)
    print(f"join at {cut}/{end}: late joiner 1 frame, 0 records; "
          f"live watcher {live_frames_to_cut} frames, {cut} records")
    if cut:
        assert live_frames_to_cut >= min(cut, 50) > 1


async def test_a_view_at_any_offset_then_the_records_after_it_is_a_replay(
        tmp_path: Path, raw: Any) -> None:
    rng = random.Random(12)
    recs = script(12)
    cuts = sorted(rng.sample(range(len(recs) + 1), 30)) + [len(recs)]
    async with serve_in_process(tmp_path, fsync=NEVER) as s:
        await s.broker.create("chat")
        ws = await raw(s.port)
        views: list[View] = []
        done, ids = 0, itertools.count(1)
        for cut in cuts:
            await publish(s.broker, "chat", recs[done:cut])
            done = cut
            _, view = await attach_view(ws, Device(), next(ids))
            assert view.next == cut
            views.append(view)
            await ws.send(Detach(next(ids), "chat"))
            while not isinstance(await next_frame(ws), Detached):
                pass
        replay = Device()
        await ws.send(Attach(next(ids), "chat", START))
        records: list[_frames.Record] = []
        with trio.fail_after(WAIT):
            while len(records) < len(recs):
                frame = await next_frame(ws)
                replay.take(frame)
                if isinstance(frame, Data):
                    records += frame.records
    full = replay.transcript(len(recs))
    assert full == fold(recs).view()
    for view in views:
        conv = Conversation.from_snapshot(view.view)
        for r in records[view.next:]:
            conv.apply_record(r)
        assert conv.view() == full, view.next


# ---------------------------------------------------------------- attach rules

@pytest.mark.parametrize("attach", [
    Attach(7, "chat", view=True, kinds=(1,)),
    Attach(7, "chat", view=True, kinds=(0, 2, 3, 4, 5, 6, 7)),
    Attach(7, "chat", 0, view=True),
    Attach(7, "chat", START, view=True),
], ids=["signals_only", "no_signals", "from_0", "from_start"])
async def test_a_view_that_cannot_be_exact_is_refused(tmp_path: Path, raw: Any,
                                                      attach: Attach) -> None:
    async with serve_in_process(tmp_path, fsync=NEVER) as s:
        await s.broker.create("chat")
        ws = await raw(s.port)
        await ws.send(attach)
        err = await next_frame(ws)
        assert isinstance(err, Error) and (err.code, err.session, err.id) == ("bad_view", "chat", 7)
        # Not attached, and the connection carries on.
        await attach_view(ws, Device(), 8, kinds=(0, *ALL_AI))


async def test_a_view_with_ai_kinds_only_skips_the_rest_of_the_tail(tmp_path: Path,
                                                                    raw: Any) -> None:
    recs = script(14)
    async with serve_in_process(tmp_path, fsync=NEVER) as s:
        await s.broker.create("chat")
        await publish(s.broker, "chat", recs[:50])
        ws, dev = await raw(s.port), Device()
        await attach_view(ws, dev, 1, kinds=ALL_AI)
        await publish(s.broker, "chat", recs[50:])
        with trio.fail_after(WAIT):
            while dev.records < sum(1 for _, d in recs[50:] if d.kind):
                frame = await next_frame(ws)
                dev.take(frame)
                if isinstance(frame, Data):
                    assert all(r.kind in ALL_AI for r in frame.records)
    assert dev.transcript(len(recs)) == fold(recs).view()


async def test_views_of_missing_closed_and_renewed_sessions(tmp_path: Path, raw: Any) -> None:
    async with serve_in_process(tmp_path, fsync=NEVER) as s:
        ws = await raw(s.port)
        await ws.send(Attach(1, "nope", view=True))
        err = await next_frame(ws)
        assert isinstance(err, Error) and (err.code, err.id) == ("session_not_found", 1)

        dev = Device()
        attached, view = await attach_view(ws, dev, 2, "new", create=True)
        assert view.next == 0 and view.view == Conversation().to_snapshot()
        assert isinstance(await next_frame(ws), UpToDate)

        info, _ = await s.broker.create("chat")
        await ws.send(Attach(3, "chat", view=True, epoch=info.epoch + 1))
        event = await next_frame(ws)
        assert isinstance(event, Event) and (event.event, event.epoch) == (
            "epoch_changed", info.epoch)

        await publish(s.broker, "chat", script(15)[:30])
        await s.broker.close_session("chat")
        attached, view = await attach_view(ws, Device(), 4, epoch=info.epoch)
        assert attached.closed and view.next == 30
        assert isinstance(await next_frame(ws), UpToDate)
        event = await next_frame(ws)
        assert isinstance(event, Event) and event.event == "closed"


async def test_the_python_client_passes_view_through(tmp_path: Path) -> None:
    recs = script(16)
    enc = Encoder()
    async with serve_in_process(tmp_path, fsync=NEVER) as s:
        await s.broker.create("chat")
        await publish(s.broker, "chat", recs)
        async with client.open_connection(s.ws_url, client_id="late") as c:
            att = await c.attach("chat", view=True)
            frame = await att.next_frame()
            assert isinstance(frame, View) and att.offset == frame.next == len(recs)
            conv = Conversation.from_snapshot(frame.view)
            d = enc.message("u9", "user", "and now?")
            await s.broker.publish("chat", [d.payload], kind=d.kind, publisher="alice",
                                   metas=[d.meta])
            with trio.fail_after(WAIT):
                record = await att.__anext__()
            conv.apply_record(record)
    assert conv.view() == fold([*recs, ("alice", d)]).view()


# ---------------------------------------------------------------- cuts and reconnects

class Pace:
    """Counts cuts; the publisher waits for them, so the conversation is
    spread over every device's cuts."""

    def __init__(self) -> None:
        self.cuts = 0
        self._changed = trio.Event()

    def cut(self) -> None:
        self.cuts += 1
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, n: int) -> None:
        while self.cuts < n:
            await self._changed.wait()


async def _device(port: int, dev: Device, seed: int, end: int, pace: Pace,
                  published: trio.Event) -> None:
    """Attach (with a view, or from the offset reached), read a few frames,
    then detach or drop the connection; again and again until the device
    has read the whole conversation after the publisher finished."""
    rng = random.Random(seed)
    ids = itertools.count(1)
    ws = await RawWs.connect(port, client=f"device-{seed}")
    try:
        while True:
            finished = published.is_set()
            kinds = rng.choice([None, ALL_AI, (0, *ALL_AI)])
            if dev.conv is None or rng.random() < 0.4:
                await attach_view(ws, dev, next(ids), kinds=kinds)
            else:
                assert dev.conv is not None
                await ws.send(Attach(next(ids), "chat", dev.conv.next, epoch=dev.epoch,
                                     kinds=kinds))
                dev.take(await next_frame(ws))
            budget = rng.randint(0, 4)
            while budget:                  # some frames, or up to the tail
                frame = await next_frame(ws)
                dev.take(frame)
                if isinstance(frame, UpToDate):
                    break
                budget -= 1
            assert dev.conv is not None
            if finished and dev.conv.next >= end:
                return
            if rng.random() < 0.15:        # the connection drops
                await ws.aclose()
                ws = await RawWs.connect(port, client=f"device-{seed}")
            else:
                await ws.send(Detach(next(ids), "chat"))
                while not isinstance(frame := await next_frame(ws), Detached):
                    dev.take(frame)        # what was sent before the detach still counts
            pace.cut()
    finally:
        await ws.aclose()


async def test_thousands_of_cuts_and_reconnects_end_on_the_logs_transcript(
        tmp_path: Path, raw: Any) -> None:
    recs: list[Rec] = script(17, turns=8)
    end, total = len(recs), 3000
    devices = [Device() for _ in range(3)]
    pace, published = Pace(), trio.Event()
    async with serve_in_process(tmp_path, fsync=NEVER) as s:
        await s.broker.create("chat")

        async def publisher() -> None:
            for i, (p, d) in enumerate(recs):
                await pace.until(i * total // end)
                await s.broker.publish("chat", [d.payload], kind=d.kind, publisher=p,
                                       metas=[d.meta])
            published.set()

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(publisher)
                for seed, dev in enumerate(devices):
                    nursery.start_soon(_device, s.port, dev, seed, end, pace, published)

        ws, replay = await raw(s.port), Device()
        await ws.send(Attach(1, "chat", START))
        replay.take(await next_frame(ws))
        await read_until(ws, replay, end)
    the_log = replay.transcript(end)
    print(f"{pace.cuts} cuts over {end} records; views per device "
          f"{[d.views for d in devices]}, records {[d.records for d in devices]}")
    assert the_log == fold(recs).view()
    assert pace.cuts >= total * (end - 1) // end      # the last record waited for these
    for dev in devices:
        assert dev.transcript(end) == the_log
        assert dev.views > 100

"""Conversation views on the server: the session actor's lazy fold and its
snapshot file (broker/_session.py, docs/ai.md "Views").

The fold must cost a publish nothing (no view asked: no record folded, no
file), read only what is new at each view, survive a restart through
``convo.snap`` (the new actor folds only the records past the snapshot's
offset), ignore a snapshot that is corrupt or stale (another epoch, past
the log's end, another payload rule) and fold the log again, and say what
it is when retention deleted the log's start.  Every view is compared with
a fold of the records from scratch.

The scripted conversation (``script``) and the helpers here are shared with
test_view_ws.py and test_view_http.py.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest

import broker
from broker._config import FsyncPolicy
from broker._convo import CANCELLED, COMPLETE, ERROR, Conversation, Draft, Encoder
from broker._errors import SessionNotFound
from broker._meta import dir_name
from broker._session import CONVO_FILE, convo_file, read_convo_file

WAIT = 20             # seconds: a bound on waits that should take milliseconds
NEVER = FsyncPolicy("never")

Rec = tuple[str | None, Draft]          # (publisher, record)


# ---------------------------------------------------------------- the script

def script(seed: int, *, turns: int = 5, json: bool = False) -> list[Rec]:
    """A scripted conversation: per turn a user's question, the agent's
    streamed answer (10-40 deltas) with tool calls (some waiting for an
    approval from the user), states, a cancel now and then, records of kind
    0 in between, and a few records the fold skips (a delta from someone
    else, a delta to an unknown message)."""
    rng = random.Random(seed)
    enc = Encoder(json=json)
    out: list[Rec] = []
    noise = b'"noise"' if json else b"noise"
    for t in range(turns):
        uid, mid = f"u{t}", f"m{t}"
        out.append(("alice", enc.message(uid, "user", f"question {t}: \u00bfqu\u00e9 tal?")))
        out.append(("agent", enc.state("thinking")))
        out.append(("agent", enc.start(mid, "assistant", "", reply_to=uid)))
        out.append(("agent", enc.state("writing", ref=mid)))
        cancelled = False
        for k in range(rng.randint(10, 40)):
            out.append(("agent", enc.delta(mid, f"w{k}\u00e9 ")))
            r = rng.random()
            if r < 0.06:
                cid = f"c{t}_{k}"
                approval = rng.random() < 0.5
                out.append(("agent", enc.tool_call(cid, "search", {"q": k, "t": "\u2603"},
                                                    approval=approval, message=mid)))
                if approval:
                    out.append(("agent", enc.state("awaiting_approval", ref=cid)))
                    out.append(("alice", enc.approve(cid, rng.random() < 0.7)))
                out.append(("tool", enc.tool_result(cid, {"hits": [k, t]},
                                                    outcome=rng.choice([COMPLETE, ERROR]))))
            elif r < 0.10:
                out.append(("alice", Draft(0, {"app": k}, noise)))
            elif r < 0.12:
                out.append(("mallory", enc.delta(mid, "not yours")))      # wrong_publisher
            elif r < 0.13:
                out.append(("agent", enc.delta("nobody", "lost")))        # unknown_id
            elif r < 0.15 and not cancelled:
                out.append(("alice", enc.cancel(mid if rng.random() < 0.5 else None, "stop")))
                cancelled = True
        out.append(("agent", enc.end(mid, ".", outcome=CANCELLED if cancelled else COMPLETE)))
        out.append(("agent", enc.state("idle")))
        if rng.random() < 0.5:
            out.append(("alice", enc.input("thanks", ref=mid)))
    return out


def fold(records: Sequence[Rec], *, json: bool = False, start: int = 0,
         end: int | None = None) -> Conversation:
    """The records from ``start`` folded from scratch (``end``: advance to it)."""
    conv = Conversation(json=json, start=start)
    for offset, (publisher, d) in enumerate(records[start:], start):
        conv.apply(offset, d.kind, publisher, d.meta, d.payload)
    if end is not None and end > conv.next:
        conv.advance(end)
    return conv


async def publish(br: broker.Broker, name: str, records: Sequence[Rec],
                  *, each: bool = False) -> None:
    """Publish ``records`` in order, as their publishers.  ``each``: one
    publish at a time, each awaited (a live watcher then sees many frames);
    else pipelined, as fast as the broker takes them."""
    if not each:
        replies = [await br.submit_publish(name, [d.payload], kind=d.kind, publisher=p,
                                           metas=[d.meta]) for p, d in records]
        for reply in replies:
            await reply.wait()
        return
    for p, d in records:
        await br.publish(name, [d.payload], kind=d.kind, publisher=p, metas=[d.meta])


def session_dir(br: broker.Broker, name: str) -> Path:
    return Path(br.data_dir) / "sessions" / dir_name(name)


def actor(br: broker.Broker, name: str) -> Any:
    return br._actors[name]


# ---------------------------------------------------------------- lazy and incremental

async def test_publishing_folds_nothing_until_a_view_then_the_fold_follows_the_records(
        tmp_path: Path) -> None:
    recs = script(1)
    async with broker.open_broker(tmp_path, fsync=NEVER) as br:
        await br.create("chat")
        await publish(br, "chat", recs[:100])
        a = actor(br, "chat")
        assert a.folded == 0 and a._convo is None
        assert not (session_dir(br, "chat") / CONVO_FILE).exists()

        v = await br.view("chat")
        assert (v.next, a.folded) == (100, 100)
        assert v.snapshot == fold(recs[:100]).to_snapshot()

        await publish(br, "chat", recs[100:])
        # Viewed once, the fold follows the records as the actor writes them,
        # so the next view has nothing left to read.
        assert a.folded == len(recs) and a._convo is not None
        assert a._convo.next == len(recs)
        v = await br.view("chat")
        assert (v.next, a.folded) == (len(recs), len(recs))
        assert v.snapshot == fold(recs).to_snapshot()
        again = await br.view("chat", text=True)
        assert a.folded == len(recs)                 # nothing new: nothing read
        assert again.snapshot == fold(recs).to_snapshot(text=True)


async def test_a_view_is_of_what_is_visible_and_read_your_writes(tmp_path: Path) -> None:
    async with broker.open_broker(tmp_path) as br:
        with pytest.raises(SessionNotFound):
            await br.view("nope")
        info, _ = await br.create("chat")
        empty = await br.view("chat")
        assert (empty.epoch, empty.next) == (info.epoch, 0)
        assert Conversation.from_snapshot(empty.snapshot).view().items == ()
        enc = Encoder()
        d = enc.message("u1", "user", "hi")
        offsets = await br.publish("chat", [d.payload], kind=d.kind, publisher="alice",
                                   metas=[d.meta])
        v = await br.view("chat")
        assert v.next == offsets.stop == 1
        (msg,) = Conversation.from_snapshot(v.snapshot).view().messages
        assert (msg.text, msg.publisher, msg.outcome) == ("hi", "alice", COMPLETE)


async def test_a_json_session_folds_by_the_json_payload_rule(tmp_path: Path) -> None:
    recs = script(2, json=True)
    async with broker.open_broker(tmp_path, fsync=NEVER) as br:
        await br.create("chat", content_type="application/json")
        await publish(br, "chat", recs)
        v = await br.view("chat")
    assert v.snapshot == fold(recs, json=True).to_snapshot()
    assert v.snapshot["json"] is True
    assert "bad_payload" not in dict(Conversation.from_snapshot(v.snapshot).view().anomalies)


async def test_a_long_log_is_folded_in_chunks_and_saved_as_it_goes(tmp_path: Path) -> None:
    """Past _CONVO_SAVE_RECORDS the view saves convo.snap at once (not only on exit)."""
    enc = Encoder()
    start = enc.start("m1", "assistant")
    deltas = [enc.delta("m1", "x") for _ in range(12_000)]
    async with broker.open_broker(tmp_path, fsync=NEVER) as br:
        await br.create("chat")
        await br.publish("chat", [start.payload], kind=start.kind, publisher="agent",
                         metas=[start.meta])
        await br.publish("chat", [d.payload for d in deltas], kind=3, publisher="agent",
                         metas=[d.meta for d in deltas])
        path = session_dir(br, "chat") / CONVO_FILE
        v = await br.view("chat")
        assert v.next == 12_001 and actor(br, "chat").folded == 12_001
        epoch, saved = read_convo_file(path.read_bytes())
        assert (epoch, saved.next) == (v.epoch, 12_001)
        assert saved.view().messages[0].text == "x" * 12_000


# ---------------------------------------------------------------- persistence

async def test_a_restart_resumes_from_the_snapshot(tmp_path: Path) -> None:
    recs = script(3)
    cut = len(recs) // 2
    snap = tmp_path / "sessions" / "chat" / CONVO_FILE
    async with broker.open_broker(tmp_path) as br:
        await br.create("chat")
        await publish(br, "chat", recs[:cut])
        first = await br.view("chat")
        await publish(br, "chat", recs[cut:])
    # Viewed once, the fold followed the records; the actor saved it on exit.
    epoch, saved = read_convo_file(snap.read_bytes())
    assert (epoch, saved.next) == (first.epoch, len(recs))
    # A snapshot behind the log (as one saved before a crash would be):
    snap.write_bytes(convo_file(epoch, fold(recs[:cut])))

    async with broker.open_broker(tmp_path) as br:
        v = await br.view("chat")
        # Only the records past the snapshot were read: it was used.
        assert actor(br, "chat").folded == len(recs) - cut
        assert v.snapshot == fold(recs).to_snapshot() and v.epoch == first.epoch
    async with broker.open_broker(tmp_path) as br:
        assert (await br.view("chat")).snapshot == fold(recs).to_snapshot()
        assert actor(br, "chat").folded == 0


def _other_epoch(epoch: int, conv: Conversation, data: bytes) -> bytes:
    return convo_file(epoch + 1, conv)


def _past_the_end(epoch: int, conv: Conversation, data: bytes) -> bytes:
    conv.advance(conv.next + 5)
    return convo_file(epoch, conv)


def _json_rule(epoch: int, conv: Conversation, data: bytes) -> bytes:
    return convo_file(epoch, Conversation(json=True))


def _flipped(epoch: int, conv: Conversation, data: bytes) -> bytes:
    return data[:-7] + bytes([data[-7] ^ 0x10]) + data[-6:]


def _not_a_snapshot(epoch: int, conv: Conversation, data: bytes) -> bytes:
    body = msgpack.packb({"v": 99})
    crc = zlib.crc32(body, zlib.crc32(epoch.to_bytes(8, "big")))
    return struct.pack(">4sQI", b"BKC1", epoch, crc) + body


@pytest.mark.parametrize("doctor", [
    _other_epoch, _past_the_end, _json_rule, _flipped, _not_a_snapshot,
    lambda epoch, conv, data: data[:10],
    lambda epoch, conv, data: b"XXXX" + data[4:],
    lambda epoch, conv, data: b"",
], ids=["other_epoch", "past_the_end", "json_rule", "flipped_bit", "not_a_snapshot",
        "truncated", "bad_magic", "empty"])
async def test_a_corrupt_or_stale_snapshot_is_ignored_and_rebuilt(tmp_path: Path,
                                                                  doctor: Any) -> None:
    recs = script(4)
    async with broker.open_broker(tmp_path) as br:
        await br.create("chat")
        await publish(br, "chat", recs)
        await br.view("chat")
    path = tmp_path / "sessions" / "chat" / CONVO_FILE
    data = path.read_bytes()
    epoch, conv = read_convo_file(data)
    path.write_bytes(doctor(epoch, conv, data))
    async with broker.open_broker(tmp_path) as br:
        v = await br.view("chat")
        assert actor(br, "chat").folded == len(recs)         # the whole log, again
        assert v.snapshot == fold(recs).to_snapshot()
        await publish(br, "chat", recs[:1])                  # move it: it is saved on exit
        v = await br.view("chat")
    epoch, conv = read_convo_file(path.read_bytes())        # rebuilt, and whole again
    assert (epoch, conv.next) == (v.epoch, len(recs) + 1)


async def test_a_snapshot_past_a_log_that_lost_its_tail_is_ignored(tmp_path: Path) -> None:
    """A machine crash can take back records a snapshot already covers; the
    log then ends before the snapshot's offset, and the snapshot is stale."""
    recs = script(5)
    async with broker.open_broker(tmp_path) as br:
        await br.create("chat")
        await publish(br, "chat", recs)
        await br.view("chat")
    segment = tmp_path / "sessions" / "chat" / "00000000000000000000.log"
    with open(segment, "r+b") as f:
        f.truncate(os.path.getsize(segment) - 40)          # tears the last record
    async with broker.open_broker(tmp_path) as br:
        end = (await br.info("chat")).next_offset
        assert end == len(recs) - 1
        v = await br.view("chat")
        assert actor(br, "chat").folded == end
        assert v.snapshot == fold(recs[:end]).to_snapshot()


async def test_a_deleted_session_takes_its_snapshot_along(tmp_path: Path) -> None:
    recs = script(6)
    async with broker.open_broker(tmp_path) as br:
        await br.create("chat")
        await publish(br, "chat", recs[:20])
        old = await br.view("chat")
        await br.delete("chat")
        with pytest.raises(SessionNotFound):
            await br.view("chat")
        await br.create("chat")
        new = await br.view("chat")
        assert new.epoch != old.epoch and new.next == 0
        assert new.snapshot == Conversation().to_snapshot()
    assert not (tmp_path / "sessions" / "chat" / CONVO_FILE).exists()


# ---------------------------------------------------------------- retention

RETAIN = {"segment_bytes": 4096, "retention_bytes": 8192, "fsync": NEVER}


async def test_a_view_kept_up_stays_whole_when_retention_deletes_the_start(
        tmp_path: Path) -> None:
    """The snapshot compacts the log: what it has folded outlives the segments."""
    recs = script(7, turns=12)
    async with broker.open_broker(tmp_path, **RETAIN) as br:
        await br.create("chat")
        for i in range(0, len(recs), 10):
            await publish(br, "chat", recs[i:i + 10])
            await br.view("chat")                    # keeps the fold ahead of retention
        info = await br.info("chat")
        assert info.start_offset > 0                 # retention did delete the start
        v = await br.view("chat")
        assert "start" not in v.snapshot
        assert v.snapshot == fold(recs).to_snapshot()
    async with broker.open_broker(tmp_path, **RETAIN) as br:     # and from the snapshot
        assert (await br.view("chat")).snapshot == fold(recs).to_snapshot()


@pytest.mark.parametrize("early_view", [False, True])
async def test_a_fold_that_retention_overtook_starts_at_the_oldest_record(
        tmp_path: Path, early_view: bool) -> None:
    """Records deleted before the fold read them are lost to it: the view is
    then the fold of the records from the oldest one left (its ``start``),
    which is what a replay from ``-1`` gives.  A session viewed early keeps
    its fold up with the records, so retention does not overtake it."""
    recs = script(8, turns=12)
    async with broker.open_broker(tmp_path, **RETAIN) as br:
        await br.create("chat")
        if early_view:
            await publish(br, "chat", recs[:10])
            assert (await br.view("chat")).next == 10
            await publish(br, "chat", recs[10:])
        else:
            await publish(br, "chat", recs)
        start = (await br.info("chat")).start_offset
        assert start > 10
        v = await br.view("chat")
        if early_view:
            # Viewed early, the fold followed the records before retention
            # deleted them: the view stays whole, from offset 0.
            assert v.snapshot == fold(recs).to_snapshot()
            return
        assert v.snapshot["start"] == start
        assert Conversation.from_snapshot(v.snapshot).view().start == start
        # A replay from -1 reads the records from ``start``: the same fold.
        assert v.snapshot == fold(recs, start=start).to_snapshot()

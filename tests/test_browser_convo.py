"""The JavaScript fold (broker.js ``Conversation``) agrees with the Python one.

Random record lists, malformed records included, are folded by
``broker._convo.Conversation`` and, in node, by broker.js; the two must count
the same code for every record and end in the same snapshot (text form).
The same lists are cut in two: a Python snapshot of the first part, in both
wire forms (msgpack as a WebSocket ``view`` frame carries it, and the JSON
text form of ``?view=conversation``), is restored by the JavaScript fold,
which folds the rest and must end where the whole fold ends.

Records are handed to the JavaScript fold as broker.js delivers them: the
JSON value in a JSON session, bytes (a Uint8Array) in a binary one.  node is
needed (it is installed by .ci/run); without it the module is skipped.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgpack
import pytest

from broker._convo import Conversation, Encoder

NODE = shutil.which("node")
if NODE is None:
    pytest.skip("the JS fold tests need node", allow_module_level=True)

JS = Path(__file__).parent.parent / "broker" / "static" / "broker.js"

RUNNER = r"""
import { readFileSync } from "node:fs";
import { Conversation, decode } from "./broker.mjs";
const cases = JSON.parse(readFileSync(process.argv[2], "utf8"));
const data = (r) => (r.b64 !== undefined ? new Uint8Array(Buffer.from(r.b64, "base64")) : r.d);
const fold = (conv, records) => records.map((r) => conv.apply(r.o, r.k, r.p, r.m, data(r)));
const out = cases.map((c) => {
  const whole = new Conversation({ json: c.json });
  const codes = fold(whole, c.records);
  const rest = c.records.slice(c.cut);
  const fromText = Conversation.fromSnapshot(c.view_text);
  fold(fromText, rest);
  const fromBin = Conversation.fromSnapshot(decode(Buffer.from(c.view_msgpack, "base64")));
  fold(fromBin, rest);
  return { codes, whole: whole.toSnapshot(), text: fromText.toSnapshot(), msgpack: fromBin.toSnapshot() };
});
process.stdout.write(JSON.stringify(out));
"""

IDS = ["m1", "m2", "t1", "t2", "x", ""]
PUBLISHERS = ["agent", "alice", None]
WORDS = ["Hel", "lo", " wörld", " ☃", " 🦀", "", "\n", " \"quoted\""]


def _meta(rng: random.Random, kind: int) -> Any:
    """Mostly a valid meta for the kind, sometimes a broken one."""
    roll = rng.random()
    if roll < 0.04:
        return rng.choice([None, [], "id", 7])
    meta: dict[str, Any] = {}

    def pick() -> str:
        return rng.choice(IDS)
    if kind in (2, 3, 4, 5, 6):
        meta["id"] = pick()
    if kind == 2:
        meta["role"] = rng.choice(["user", "assistant", ""])
        if rng.random() < 0.3:
            meta["outcome"] = rng.choice(["complete", "cancelled", "error", "done"])
        if rng.random() < 0.2:
            meta["reply_to"] = pick()
    if kind in (4, 6) and rng.random() < 0.5:
        meta["outcome"] = rng.choice(["complete", "cancelled", "error", "nope"])
    if kind in (2, 4, 6) and rng.random() < 0.2:
        meta["error"] = rng.choice(["boom", 3])
    if kind == 5:
        meta["name"] = rng.choice(["search", "rm", ""])
        if rng.random() < 0.5:
            meta["approval"] = rng.choice([True, False, 1])
        if rng.random() < 0.2:
            meta["message"] = pick()
    if kind == 7:
        meta["state"] = rng.choice(["idle", "writing", "tool", ""])
        if rng.random() < 0.5:
            meta["ref"] = pick()
    if kind == 1:
        meta["signal"] = rng.choice(["cancel", "approve", "reject", "input", "other", ""])
        if rng.random() < 0.6:
            meta["ref"] = pick()
        if rng.random() < 0.6:
            meta["approved"] = rng.choice([True, False, 0])
        if rng.random() < 0.7:
            meta["id"] = rng.choice(["s1", "s2", "s3", "s4", "s5"])
    if rng.random() < 0.05 and meta:
        meta.pop(rng.choice(sorted(meta)))
    if rng.random() < 0.03:
        meta["id"] = "i" * 257
    return meta


def _payload(rng: random.Random, kind: int, json_session: bool) -> bytes:
    enc = Encoder(json=json_session)
    if kind in (5, 6):
        value = rng.choice([None, {"q": "broker ☃"}, [1, 2, True], "text", 42])
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    if json_session and rng.random() < 0.08:
        return rng.choice([b"1", b"null", b'{"a":"b"}', b"[]"])     # not a JSON string
    return enc.text("".join(rng.choice(WORDS) for _ in range(rng.randrange(3))))


def _case(seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    json_session = seed % 2 == 0
    conv = Conversation(json=json_session)
    records, codes, offset = [], [], 0
    cut = rng.randrange(0, 60)
    view_text = view_msgpack = None
    for n in range(60):
        if n == cut:
            view_text = conv.to_snapshot(text=True)
            view_msgpack = msgpack.packb(conv.to_snapshot())
        offset += rng.choice([1, 1, 1, 2])              # gaps: records a filter left out
        kind = rng.choice([0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 5, 6, 6, 7, 9])
        meta = _meta(rng, kind)
        payload = _payload(rng, kind, json_session)
        publisher = rng.choice(PUBLISHERS)
        codes.append(conv.apply(offset, kind, publisher, meta, payload))
        record: dict[str, Any] = {"o": offset, "k": kind, "p": publisher, "m": meta}
        if json_session:
            record["d"] = json.loads(payload)
        else:
            record["b64"] = base64.b64encode(payload).decode()
        records.append(record)
    if view_text is None:
        view_text = conv.to_snapshot(text=True)
        view_msgpack = msgpack.packb(conv.to_snapshot())
    assert view_msgpack is not None
    return {"json": json_session, "records": records, "cut": min(cut, len(records)),
            "view_text": view_text, "view_msgpack": base64.b64encode(view_msgpack).decode(),
            "expected_codes": codes, "expected": conv.to_snapshot(text=True)}


def _run_node(tmp_path: Path, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    shutil.copy(JS, tmp_path / "broker.mjs")           # an ES module to node by its name
    (tmp_path / "run.mjs").write_text(RUNNER)
    vectors = tmp_path / "vectors.json"
    vectors.write_text(json.dumps(cases))
    assert NODE is not None
    out = subprocess.run([NODE, str(tmp_path / "run.mjs"), str(vectors)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result: list[dict[str, Any]] = json.loads(out.stdout)
    return result


def test_js_fold_matches_python_fold(tmp_path: Path) -> None:
    cases = [_case(seed) for seed in range(300)]
    results = _run_node(tmp_path, cases)
    anomalies: set[str] = set()
    for seed, (case, got) in enumerate(zip(cases, results)):
        expected = json.loads(json.dumps(case["expected"]))
        assert got["codes"] == case["expected_codes"], f"seed {seed}"
        assert got["whole"] == expected, f"seed {seed}"
        assert got["text"] == expected, f"seed {seed}: restored from the text form"
        assert got["msgpack"] == expected, f"seed {seed}: restored from msgpack"
        anomalies.update(code for code in case["expected_codes"] if code)
    # The vectors reach every rule of the fold, or they prove little.
    assert anomalies == {"bad_meta", "bad_payload", "duplicate_id", "unknown_id",
                         "wrong_publisher", "after_end", "duplicate_signal", "unknown_ref",
                         "reserved_kind"}

"""The fuzz harnesses, briefly, and hypothesis over the same invariants.

Each harness runs as its own command for about two seconds, exactly as a
longer run would (``python tests/fuzz_http.py --seconds 600``), so the command
line, the seed report and the faulthandler backstop are exercised too.  The
hypothesis tests drive the same one-case checks with inputs hypothesis can
shrink.  docs/security.md ("Hostile input") says how to run them for longer
and under atheris.
"""

from __future__ import annotations

import importlib.util
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fuzz_frames
import fuzz_http
import fuzz_segment

HERE = Path(__file__).resolve().parent
HARNESSES = ["fuzz_http.py", "fuzz_segment.py", "fuzz_frames.py"]


@pytest.mark.parametrize("harness", HARNESSES)
def test_harness_runs_briefly(harness: str) -> None:
    proc = subprocess.run([sys.executable, str(HERE / harness), "--seconds", "2",
                           "--seed", "20261122"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no failure" in proc.stdout and proc.stderr == ""


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
@pytest.mark.parametrize("harness", HARNESSES)
def test_atheris_mode_starts(harness: str) -> None:
    proc = subprocess.run([sys.executable, str(HERE / harness), "--atheris", "--seconds", "1",
                           "--seed", "7", "-runs=200"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^Done \d+ runs", proc.stderr, re.M), proc.stderr[-2000:]


# ------------------------------------------------------------------ HTTP

cuts = st.lists(st.integers(0, 5000), max_size=20)
# Seeds, not st.randoms(), for generators that draw a lot (random payloads):
# hypothesis caps how much entropy one example may use.
seeds = st.integers(0, 2**32 - 1).map(random.Random)


@given(st.binary(max_size=300), cuts, cuts)
@example(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n\x00garbage\r\n\r\n", [29], [])
@example(b"GET /v1/ws HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\nrest",
         [10], [70])
def test_http_any_bytes(data: bytes, one: list[int], two: list[int]) -> None:
    fuzz_http.check(data, [min(c, len(data)) for c in one], [min(c, len(data)) for c in two])


@given(seeds, cuts)
def test_http_valid_streams_in_any_split(rng: random.Random, one: list[int]) -> None:
    data, want, after = fuzz_http.valid_stream(rng)
    every_byte = list(range(1, len(data))) if len(data) < 2000 else []
    fuzz_http.check(data, [min(c, len(data)) for c in one], every_byte, (want, after))


@given(seeds, cuts, cuts)
def test_http_mangled_streams(rng: random.Random, one: list[int], two: list[int]) -> None:
    data = fuzz_http.mutate(rng, fuzz_http.valid_stream(rng)[0])
    fuzz_http.check(data, [min(c, len(data)) for c in one], [min(c, len(data)) for c in two])


@pytest.mark.parametrize("line", fuzz_http.HOSTILE, ids=lambda b: repr(b[:30]))
def test_http_each_hostile_line(line: bytes) -> None:
    head = b"POST /x HTTP/1.1\r\nhost: localhost\r\n"
    for data in (head + line + b"\r\nbody", head + b"content-length: 4\r\n" + line + b"\r\nbody"):
        fuzz_http.check(data, [len(head)], list(range(0, len(data), 97)))


# ------------------------------------------------------------------ segments

@given(st.binary(max_size=400), st.randoms(use_true_random=False))
def test_segment_scan_and_decode_any_bytes(data: bytes, rng: random.Random) -> None:
    fuzz_segment.check_bytes(data, rng)


@given(seeds)
def test_segment_scan_and_decode_damaged(rng: random.Random) -> None:
    data = fuzz_segment.damage(rng, fuzz_segment.valid_segment(rng, rng.choice([0, 9])))
    fuzz_segment.check_bytes(data, rng)


@given(st.binary(max_size=80), st.sampled_from([0, 7, 1 << 40]), st.sampled_from([0, 50, 1 << 20]))
def test_segment_index_any_bytes(data: bytes, base: int, limit: int) -> None:
    fuzz_segment.check_index(data, base, limit)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600) | seeds.map(
    lambda r: fuzz_segment.damage(r, fuzz_segment.valid_segment(r, 0))))
def test_segment_recovery_of_any_active_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as root, fuzz_segment.quiet():
        fuzz_segment.check_active_file(data, root, 64)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seeds)
def test_segment_recovery_of_damaged_logs(rng: random.Random) -> None:
    with tempfile.TemporaryDirectory() as root, fuzz_segment.quiet():
        fuzz_segment.files_case(rng, root)


# ------------------------------------------------------------------ frames

@given(st.binary(max_size=200))
def test_frames_any_bytes(data: bytes) -> None:
    fuzz_frames.check(data)


@given(st.sampled_from(fuzz_frames.WIRES), st.randoms(use_true_random=False))
def test_frames_mangled_fields(wire: dict[str, object], rng: random.Random) -> None:
    fuzz_frames.check(msgpack.packb(fuzz_frames.mangle_fields(rng, wire), use_bin_type=True))


@pytest.mark.parametrize("seed", range(10))
def test_frames_hostile_headers_stay_small(seed: int) -> None:
    fuzz_frames.check(fuzz_frames.hostile(random.Random(seed)), measure=True)


def test_every_frame_type_is_fuzzed() -> None:
    from broker import _frames
    assert {type(f) for f in fuzz_frames.FRAMES} == set(_frames._WIRE), \
        "a frame type is missing from fuzz_frames._builders"


"""What every fuzz harness shares (tests/fuzz_*.py): the byte mutator, the
timed loop, and the command line.

    python tests/fuzz_x.py --seconds 60 [--seed N]
    python tests/fuzz_x.py --atheris --seconds 600 [libFuzzer flags] [corpus | crash file]

A harness gives ``run(seconds, seed) -> cases`` (the random mode, which runs
anywhere) and, for ``--atheris``, its one-input check, the modules to
instrument and a way to make seed inputs.  Atheris is imported only in that
mode, so the random mode runs where atheris does not install.
"""

from __future__ import annotations

import argparse
import faulthandler
import inspect
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any


def mutate(rng: random.Random, data: bytes, *, steps: int = 3, span: int = 16,
           head_bias: bool = False, extra: Callable[[random.Random, bytearray], None] | None
           = None, extra_weight: int = 0) -> bytes:
    """``data`` with 1 to ``steps`` random edits: a flipped bit (with
    ``head_bias``, half of them in the first 16 bytes, where headers are), a
    truncation, up to ``span`` random bytes inserted or dropped, or a splice of
    two copies; ``extra`` is a harness's own edit, drawn ``extra_weight``
    times in ``5 + extra_weight`` (and in place of an edit an empty buffer
    cannot take)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, steps)):
        kind = rng.randrange(5 + extra_weight)
        if kind == 0 and buf:
            head = head_bias and rng.random() < 0.5
            i = rng.randrange(min(len(buf), 16) if head else len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif kind == 1 and buf:
            del buf[rng.randrange(len(buf)):]
        elif kind == 2:
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, span))
        elif kind == 3 and buf:
            i = rng.randrange(len(buf))
            del buf[i:i + rng.randint(1, span)]
        elif kind == 4 or extra is None:
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = buf[rng.randrange(len(buf) + 1):]
        else:
            extra(rng, buf)
    return bytes(buf)


def repeat(one_case: Callable[[random.Random], None], seconds: float, seed: int) -> int:
    """Run ``one_case`` for about ``seconds`` from ``seed``; the number of cases."""
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    cases = 0
    while time.monotonic() < deadline:
        one_case(rng)
        cases += 1
    return cases


def instrument(atheris: Any, *modules: ModuleType) -> None:
    """Coverage for the Python under test only (instrument_all takes half a
    minute); compiled code (httptools, msgpack, _core) is not instrumented."""
    for module in modules:
        for obj in vars(module).values():
            for f in [obj, *vars(obj).values()] if inspect.isclass(obj) else [obj]:
                if inspect.isfunction(f) and f.__module__ == module.__name__:
                    atheris.instrument_func(f)


def run_atheris(name: str, seconds: float, seed: int, extra: list[str],
                one_input: Callable[[bytes], None], modules: Iterable[ModuleType],
                seeds: Callable[[random.Random], Iterable[bytes]]) -> None:
    import atheris
    inputs = [a for a in extra if not a.startswith("-")]
    if not inputs:          # no files to replay or corpus directories given: a fresh corpus
        corpus = tempfile.mkdtemp(prefix=f"{name}-corpus-")
        for i, data in enumerate(seeds(random.Random(seed))):
            Path(corpus, f"seed{i}").write_bytes(data)
        print(f"corpus in {corpus}", flush=True)
        inputs = [corpus]
    instrument(atheris, *modules)
    atheris.Setup([sys.argv[0], f"-max_total_time={int(seconds)}", f"-seed={seed}",
                   *(a for a in extra if a.startswith("-")), *inputs], one_input)
    atheris.Fuzz()


def main(doc: str | None, run: Callable[[float, int], int],
         atheris_mode: Callable[[float, int, list[str]], None] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    extra: list[str] = []
    if atheris_mode is None:
        args = ap.parse_args()
    else:
        ap.add_argument("--atheris", action="store_true",
                        help="coverage-guided, with libFuzzer")
        args, extra = ap.parse_known_args()
        if extra and not args.atheris:
            ap.error(f"unknown arguments {extra} (libFuzzer's go with --atheris)")
    # A backstop: a run that overruns its time by a minute dumps every thread.
    faulthandler.dump_traceback_later(args.seconds + 60, exit=True)
    print(f"seed {args.seed}", flush=True)
    if atheris_mode is not None and args.atheris:
        atheris_mode(args.seconds, args.seed, extra)
    cases = run(args.seconds, args.seed)
    print(f"{cases} cases, no failure")
    return 0

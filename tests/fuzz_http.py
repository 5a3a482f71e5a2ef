"""Fuzz the sans-IO HTTP/1.1 request reader (broker/_http.py).

    python tests/fuzz_http.py --seconds 60 [--seed N]
    python tests/fuzz_http.py --atheris --seconds 600 [libFuzzer flags] [corpus | crash file]

Each case is a stream of pipelined requests, valid or mangled (bit flips,
truncations, splices, oversized heads and bodies, broken chunked framing,
smuggling-style header pairs), fed to ``RequestReader`` twice, cut at two
random sets of points.  The contract checked on every case:

* only ``BadRequest`` (with a 4xx status and a code) or requests come out,
  never another exception;
* every request that comes out is well formed: a method, a target, header
  names in lower case, and head and body within the reader's limits;
* the cuts do not matter: both feeds give the same requests and end in the
  same error (or none), since requests completed before garbage come out
  first and the error is kept for after them; after an upgrade the bytes that
  follow it are the same;
* a valid stream gives back exactly the requests it was built from, whatever
  the cuts, and a valid upgrade request leaves exactly the bytes after it.

A case is bounded by its input, so the run cannot hang; as a backstop, the
command-line run dumps every thread and exits if it overruns its time by a
minute.  ``--atheris`` hands the same one-input check to libFuzzer (coverage
guided; atheris is in the test extras on x86-64 Linux), seeded with valid
streams; extra arguments go to libFuzzer.  ``test_fuzz.py`` runs the random
mode for about two seconds.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _fuzzmain  # noqa: E402
from broker import _http  # noqa: E402
from broker._http import MAX_HEADER_BYTES, BadRequest, Request, RequestReader  # noqa: E402

# Small, so chunked bodies can pass it without the case taking a second.
MAX_BODY = 4096

Got = tuple[str, str, tuple[tuple[bytes, bytes], ...], bytes, bool, bool]


@dataclass
class Outcome:
    requests: list[Got] = field(default_factory=list)
    error: tuple[int, str] | None = None
    after_upgrade: bytes | None = None     # what followed an upgrade request


def summary(req: Request) -> Got:
    return (req.method, req.target, tuple(req.headers), bytes(req.body), req.keep_alive,
            req.upgrade)


def check_request(req: Request) -> None:
    assert type(req.method) is str and req.method, req
    assert type(req.target) is str and req.target, req
    assert all(type(k) is bytes and type(v) is bytes and k == k.lower() for k, v in req.headers)
    head = len(req.target) + sum(len(k) + len(v) for k, v in req.headers)
    assert head <= MAX_HEADER_BYTES, head
    assert len(req.body) <= MAX_BODY, len(req.body)


def feed(data: bytes, cuts: list[int]) -> Outcome:
    """Feed ``data`` cut at ``cuts``, as the server does: stop at an error or
    an upgrade.  Anything but BadRequest propagates, and fails the case."""
    reader = RequestReader(max_body_bytes=MAX_BODY)
    out = Outcome()
    bounds = [0, *sorted(cuts), len(data)]
    for a, b in zip(bounds, bounds[1:]):
        try:
            got = reader.feed(data[a:b])
        except BadRequest as exc:
            assert 400 <= exc.status < 500 and exc.code and str(exc), exc
            out.error = (exc.status, exc.code)
            return out
        for req in got:
            check_request(req)
            assert not req.upgrade or req is got[-1], "an upgrade must be the last request"
        out.requests += map(summary, got)
        if reader.error is not None:       # garbage after whole requests
            exc = reader.error
            assert 400 <= exc.status < 500 and exc.code and str(exc), exc
            out.error = (exc.status, exc.code)
            return out
        if got and got[-1].upgrade:
            out.after_upgrade = reader.leftover + data[b:]
            return out
        assert not reader.leftover
    return out


def check(data: bytes, cuts1: list[int], cuts2: list[int],
          want: tuple[list[Got], bytes | None] | None = None) -> None:
    one, two = feed(data, cuts1), feed(data, cuts2)
    assert one.error == two.error, (data[:200], cuts1, cuts2, one.error, two.error)
    # Every request completed before an error comes out, wherever the cuts fall.
    assert one.requests == two.requests, (data[:200], cuts1, cuts2)
    if one.error is None:
        assert one.after_upgrade == two.after_upgrade, (data[:200], cuts1, cuts2)
    if want is not None:
        for o in (one, two):
            assert o.error is None, (data[:200], o.error)
            assert (o.requests, o.after_upgrade) == want, (data[:200], o.requests, want)


# ------------------------------------------------------------ valid streams

TOKEN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"
PATH = "abcdefghijklmnopqrstuvwxyz0123456789-._~%/:@!$&'()*+,;="
VALUE = "".join(map(chr, range(0x21, 0x7F)))


def _text(rng: random.Random, alphabet: str, lo: int, hi: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def chunked(rng: random.Random, body: bytes) -> bytes:
    out, pos = [], 0
    while pos < len(body):
        n = rng.randint(1, max(1, len(body) - pos))
        size = f"{n:x}"
        if rng.random() < 0.3:
            size = size.upper()
        if rng.random() < 0.2:
            size += ";ext=" + _text(rng, TOKEN, 1, 5)
        out.append(f"{size}\r\n".encode() + body[pos:pos + n] + b"\r\n")
        pos += n
    return b"".join(out) + b"0\r\n\r\n"


def valid_request(rng: random.Random, last: bool) -> tuple[bytes, Got, bool]:
    """(wire bytes, the request the reader must give back, is an upgrade)."""
    upgrade = last and rng.random() < 0.15
    method = "GET" if upgrade else rng.choice(["GET", "PUT", "POST", "DELETE", "HEAD",
                                               "OPTIONS", "PATCH"])
    target = "/" + _text(rng, PATH, 0, 30)
    if rng.random() < 0.3:
        target += "?" + _text(rng, PATH + "?", 0, 20)
    headers = [("Host", "x")] + [
        (_text(rng, TOKEN, 1, 12), _text(rng, VALUE, 1, 1) + _text(rng, VALUE + " \t", 0, 30)
         + _text(rng, VALUE, 1, 1) if rng.random() < 0.8 else "")
        for _ in range(rng.randint(0, 6))]
    # Names the reader or llhttp treat specially are added below, on purpose.
    headers = [(k, v) for k, v in headers if k.lower() not in (
        "content-length", "transfer-encoding", "connection", "upgrade")]
    body = b""
    if not upgrade and rng.random() < 0.6:
        size = rng.choice([0, 1, 10, 500, MAX_BODY])
        body = rng.randbytes(size)
    # An upgrade request ends at its head: llhttp hands whatever follows,
    # body framing or not, to the new protocol.
    framing = ("none" if upgrade or not (body or rng.random() < 0.5)
               else rng.choice(["length", "chunked"]))
    extra: list[tuple[str, str]] = []
    if framing == "length":
        extra.append(("Content-Length", str(len(body))))
    elif framing == "chunked":
        extra.append(("Transfer-Encoding", "chunked"))
    keep_alive = True
    if upgrade:
        extra += [("Connection", "Upgrade"), ("Upgrade", "websocket")]
    elif last and rng.random() < 0.3:
        extra.append(("Connection", "close"))
        keep_alive = False
    for h in extra:
        headers.insert(rng.randint(0, len(headers)), h)
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    wire = head.encode() + b"\r\n" + (chunked(rng, body) if framing == "chunked" else body)
    got: Got = (method, target, tuple((k.lower().encode(), v.encode()) for k, v in headers),
                body, keep_alive, upgrade)
    return wire, got, upgrade


def valid_stream(rng: random.Random) -> tuple[bytes, list[Got], bytes | None]:
    n = rng.randint(1, 4)
    wires, want, after = [], [], None
    for i in range(n):
        wire, got, upgrade = valid_request(rng, i == n - 1)
        wires.append(wire)
        want.append(got)
        if upgrade:
            after = rng.randbytes(rng.randint(0, 20))
            wires.append(after)
    return b"".join(wires), want, after


# ---------------------------------------------------------------- mangling

HOSTILE = [
    b"x-big: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n",
    b"x-h: vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv\r\n" * (MAX_HEADER_BYTES // 30),
    b"content-length: 99999999999999999999\r\n",
    b"content-length: %d\r\n" % (MAX_BODY + 1),
    b"content-length: -1\r\n", b"content-length: 1e3\r\n", b"content-length: 0x10\r\n",
    b"content-length: 5\r\ncontent-length: 6\r\n",
    b"transfer-encoding: chunked\r\ncontent-length: 3\r\n",
    b"transfer-encoding: gzip, chunked\r\n", b"transfer-encoding: chunked, gzip\r\n",
    b"transfer-encoding: chunked\r\n\r\nffffffffffffffffffff\r\n",
    b"transfer-encoding: chunked\r\n\r\n%x\r\n" % (MAX_BODY + 1) + b"a" * (MAX_BODY + 1),
    b"transfer-encoding: chunked\r\n\r\nzz\r\n",
    b" folded continuation\r\n", b"x-bare-lf: 1\n", b"x-nul: a\x00b\r\n",
    b"x-obs: \xff\xfe\r\n", b"bad header name: 1\r\n", b": empty-name\r\n",
    b"connection: upgrade\r\nupgrade: websocket\r\n", b"\r\n\r\n", b"\r\n",
    b"GET / HTTP/1.1\r\n", b"GET http://evil/ HTTP/1.1\r\n", b"GET / HTTP/9.9\r\n",
    b"G\x00T / HTTP/1.1\r\n", b"GET /" + b"u" * (MAX_HEADER_BYTES + 1) + b" HTTP/1.1\r\n",
]


def _hostile_line(rng: random.Random, buf: bytearray) -> None:
    """A hostile line, at a line start."""
    starts = [0] + [i + 2 for i in range(len(buf) - 1) if buf[i:i + 2] == b"\r\n"]
    i = rng.choice(starts)
    buf[i:i] = rng.choice(HOSTILE)


def mutate(rng: random.Random, data: bytes) -> bytes:
    return _fuzzmain.mutate(rng, data, extra=_hostile_line, extra_weight=2)


def random_cuts(rng: random.Random, n: int) -> list[int]:
    k = rng.choice([0, 1, 3, 20, min(n, 2000)])
    return [rng.randint(0, n) for _ in range(k)]


def one_case(rng: random.Random) -> None:
    roll = rng.random()
    if roll < 0.05:
        data, want = rng.randbytes(rng.randint(0, 64)), None
    else:
        data, requests, after = valid_stream(rng)
        if roll < 0.35:
            want: tuple[list[Got], bytes | None] | None = (requests, after)
        else:
            data, want = mutate(rng, data), None
    check(data, random_cuts(rng, len(data)), random_cuts(rng, len(data)), want)


def one_input(data: bytes) -> None:
    """The atheris entry: the first byte seeds the cuts, the rest is the stream."""
    rng = random.Random(data[:1])
    body = data[1:]
    every_byte = list(range(1, len(body))) if len(body) < 1024 else random_cuts(rng, len(body))
    check(body, random_cuts(rng, len(body)), every_byte)


def run(seconds: float, seed: int) -> int:
    """Fuzz for about ``seconds``; return the number of cases."""
    return _fuzzmain.repeat(one_case, seconds, seed)


def run_atheris(seconds: float, seed: int, extra: list[str]) -> None:
    _fuzzmain.run_atheris("fuzz_http", seconds, seed, extra, one_input, [_http],
                          lambda rng: (b"\x00" + valid_stream(rng)[0] for _ in range(50)))


def main() -> int:
    return _fuzzmain.main(__doc__, run, run_atheris)


if __name__ == "__main__":
    sys.exit(main())

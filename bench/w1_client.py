"""Client side of bench/w1_http.sh: fill a stream, time a catch-up read, summarise.

    python bench/w1_client.py fill URL N SIZE [CONNS]   # N POSTs of SIZE bytes; prints seconds
    python bench/w1_client.py read URL N SIZE [k=v ...] # one catch-up read, JSON line
    python bench/w1_client.py wrk FILE [k=v ...]        # parse wrk --latency output, JSON line
    python bench/w1_client.py pyspy FILE [TOP [N]]      # top functions by own time
    python bench/w1_client.py report RESULTS.jsonl      # min/median/max and ratios

``k=v`` arguments are copied into the JSON line (numbers as numbers), so the
shell script can tag each result with its run and server.

Plain http.client with keep-alive, the same code against every server.  The
fill uses CONNS threads, one keep-alive connection each, so a server that
group-commits sees concurrent appends.  The read starts at offset -1 and
follows Stream-Next-Offset until a response carries Stream-Up-To-Date; it
counts the payload bytes and fails unless it got exactly what the fill wrote.
"""

from __future__ import annotations

import http.client
import json
import re
import statistics
import sys
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from typing import Any

Row = dict[str, Any]


def _conn(url: str) -> tuple[http.client.HTTPConnection, str]:
    u = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=60), u.path


def fill(url: str, n: int, size: int, conns: int = 32) -> None:
    body = b"r" * size
    per = [n // conns + (1 if i < n % conns else 0) for i in range(conns)]
    errors: list[str] = []

    def worker(count: int) -> None:
        c, path = _conn(url)
        headers = {"Content-Type": "application/octet-stream"}
        for _ in range(count):
            c.request("POST", path, body, headers)
            r = c.getresponse()
            r.read()
            if not 200 <= r.status < 300:
                errors.append(f"POST {path}: {r.status} {r.reason}")
                return
        c.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in per]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        sys.exit(f"fill failed: {errors[0]} ({len(errors)} connections failed)")
    print(f"{dt:.3f}")


def read(url: str) -> Row:
    c, path = _conn(url)
    offset = "-1"
    total = requests = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    while True:
        c.request("GET", f"{path}?offset={offset}")
        r = c.getresponse()
        data = r.read()
        requests += 1
        if r.status != 200:
            sys.exit(f"GET {path}?offset={offset}: {r.status} {r.reason} {data[:200]!r}")
        total += len(data)
        nxt = r.getheader("Stream-Next-Offset")
        if r.getheader("Stream-Up-To-Date") == "true":
            break
        if not nxt or nxt == offset:
            sys.exit(f"no progress at offset {offset}")
        offset = nxt
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    c.close()
    return {"bytes": total, "requests": requests, "seconds": dt, "client_cpu_s": cpu}


def parse_wrk(text: str) -> dict[str, float | int]:
    """Requests/sec, p50/p99 latency (ms), requests, non-2xx, socket errors."""
    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if not m:
            raise ValueError(f"no {label}% latency in wrk output")
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    secs = re.search(r"^\s*\d+ requests in ([\d.]+)(ms|s|m)", text, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    total = re.search(r"^\s*(\d+) requests in", text, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     text)
    if not rps or not total:
        raise ValueError("not wrk output:\n" + text)
    return {"rps": float(rps.group(1)), "p50_ms": ms("50"), "p99_ms": ms("99"),
            "requests": int(total.group(1)),
            "seconds": (float(secs.group(1)) * {"ms": 1e-3, "s": 1, "m": 60}[secs.group(2)]
                        if secs else float("nan")),
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0}


def pyspy_top(path: str, top: int = 10, expected: int = 0) -> None:
    """Top functions by own (leaf) samples from `py-spy record -f raw` output,
    then own samples per source file, and per thread when recorded with
    --threads.  ``expected`` (rate x seconds) is what one always-busy thread
    would give; py-spy drops the samples of idle threads."""
    own: Counter[str] = Counter()
    files: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        if frames[0].startswith("thread ("):
            threads[frames[0]] += n
        leaf = frames[-1]
        own[leaf] += n
        m = re.search(r"\(([^()]*)\)$", leaf)
        files[m.group(1) if m else leaf] += n
    if not total:
        print("no samples")
        return
    busy = f" ({100 * total / expected:.0f}% of one busy thread's {expected})" if expected else ""
    print(f"{total} non-idle samples{busy}")
    for name, n in threads.most_common():
        print(f"  {name}: {n}" + (f" ({100 * n / expected:.0f}% busy)" if expected else ""))
    print("top functions by own samples (share of the non-idle samples):")
    for name, n in own.most_common(top):
        print(f"{100 * n / total:5.1f}%  {n:6d}  {name}")
    print("by file or library:")
    for name, n in files.most_common(8):
        print(f"{100 * n / total:5.1f}%  {n:6d}  {name}")


def _fmt(xs: list[float], nd: int = 0) -> str:
    def f(x: float) -> str:
        return f"{x:,.{nd}f}"
    return f"{f(statistics.median(xs))} [{f(min(xs))}..{f(max(xs))}]"


def report(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    w1: dict[str, list[Row]] = defaultdict(list)
    cu: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        (w1 if r["kind"] == "w1" else cu)[r["server"]].append(r)
    servers = [s for s in ("broker", "ref-file", "ref-mem") if s in w1 or s in cu]
    refs = [s for s in servers if s != "broker"]

    def by_run(rs: list[Row], key: str) -> dict[int, float]:
        acc: dict[int, list[float]] = defaultdict(list)
        for r in rs:
            acc[r["run"]].append(r[key])
        return {k: statistics.median(v) for k, v in acc.items()}

    print("W1, POST 256 B, wrk -t1 -c16: median [min..max] over runs\n")
    print("| server | appends/s | p50 ms | p99 ms | non-2xx | server CPU us/append"
          " | server CPU % | wrk CPU % |")
    print("|---|---|---|---|---|---|---|---|")
    for s in servers:
        rs = w1.get(s)
        if not rs:
            continue
        cpu = [r["cpu_s"] * 1e6 / r["requests"] for r in rs]
        print(f"| {s} | {_fmt([r['rps'] for r in rs])} | {_fmt([r['p50_ms'] for r in rs], 2)}"
              f" | {_fmt([r['p99_ms'] for r in rs], 2)} | {sum(r['non2xx'] for r in rs)}"
              f" | {_fmt(cpu, 1)} | {_fmt([100 * r['cpu_s'] / r['seconds'] for r in rs])}"
              f" | {_fmt([100 * r['wrk_cpu_s'] / r['seconds'] for r in rs])} |")
    print("\nRatios broker / reference, computed per run, median [min..max] over runs\n")
    print("| reference | appends/s | p50 (lower is better) | p99 (lower is better)"
          " | catch-up records/s |")
    print("|---|---|---|---|---|")
    for ref in refs:
        cells = []
        for key, src in (("rps", w1), ("p50_ms", w1), ("p99_ms", w1), ("records_s", cu)):
            b, o = by_run(src.get("broker", []), key), by_run(src.get(ref, []), key)
            ratios = [b[k] / o[k] for k in b if k in o]
            cells.append(_fmt(ratios, 2) if ratios else "-")
        print(f"| {ref} | " + " | ".join(cells) + " |")
    if cu:
        print("\nCatch-up, one reader from offset -1 to Stream-Up-To-Date: median [min..max]"
              " over every read of every run\n")
        print("| server | records | records/s | MB/s (payload) | GETs per catch-up"
              " | reader CPU % of wall | fill s |")
        print("|---|---|---|---|---|---|---|")
        for s in servers:
            rs = cu.get(s)
            if not rs:
                continue
            ccpu = [100 * r["client_cpu_s"] / r["seconds"] for r in rs if "client_cpu_s" in r]
            print(f"| {s} | {rs[0]['records']:,} | {_fmt([r['records_s'] for r in rs])}"
                  f" | {_fmt([r['mb_s'] for r in rs], 1)} | {_fmt([r['requests'] for r in rs])}"
                  f" | {_fmt(ccpu) if ccpu else '-'}"
                  f" | {_fmt([r['fill_s'] for r in rs], 1)} |")


def _tags(args: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for a in args:
        k, _, v = a.partition("=")
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


def main(argv: list[str]) -> None:
    cmd = argv[0]
    if cmd == "fill":
        fill(argv[1], int(argv[2]), int(argv[3]), int(argv[4]) if len(argv) > 4 else 32)
    elif cmd == "read":
        n, size = int(argv[2]), int(argv[3])
        r = read(argv[1])
        if r["bytes"] != n * size:
            sys.exit(f"catch-up read {r['bytes']} bytes, expected {n} x {size} = {n * size}")
        secs = float(r["seconds"])
        r.update(records=n, records_s=n / secs, mb_s=n * size / secs / 1e6)
        print(json.dumps({**_tags(argv[4:]), **r}))
    elif cmd == "wrk":
        print(json.dumps({**_tags(argv[2:]), **parse_wrk(open(argv[1]).read())}))
    elif cmd == "pyspy":
        pyspy_top(argv[1], int(argv[2]) if len(argv) > 2 else 10,
                  int(argv[3]) if len(argv) > 3 else 0)
    elif cmd == "report":
        report(argv[1])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])

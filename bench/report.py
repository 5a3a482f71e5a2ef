"""Turn pytest-benchmark JSON files (one per run) into a compact ratio table.

    python bench/report.py RUN1.json [RUN2.json ...]

For every benchmark group, each row is one implementation:

* ``time/round``: median over rounds of one run, then the median over runs;
* ``rate``: work per round (``extra_info``: records, appends, bytes) divided by
  the round time: median of the runs' medians, and [min..max] over every round
  of every run (from the slowest and the fastest round);
* ``x baseline``: this row's median rate divided by the median rate of the
  group's ``baseline`` row *from the same run*; the median over runs, and
  [min..max] over runs when there is more than one.  Above 1 means faster.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from typing import Any


def _fmt_time(s: float) -> str:
    if s < 1e-6:
        return f"{s * 1e9:.0f} ns"
    if s < 1e-3:
        return f"{s * 1e6:.2f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt_rate(x: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _fmt_ratio(vals: list[float]) -> str:
    med = statistics.median(vals)
    if len(vals) == 1:
        return f"{med:.2f}"
    return f"{med:.2f} [{min(vals):.2f}..{max(vals):.2f}]"


def _unit(extra: dict[str, Any], group: str) -> tuple[str, str]:
    """Which figure a group is about: (extra_info key, label)."""
    if group.startswith("broker-append") or group.startswith("segment-append"):
        return "appends", "appends/s"
    return "records", "records/s"


def main(paths: list[str]) -> int:
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    # rows[(group, impl)] = list over runs of the benchmark dict
    rows: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    baselines: list[dict[str, dict[str, Any]]] = []   # per run: group -> baseline bench
    order: list[tuple[str, str]] = []
    for run_i, run in enumerate(runs):
        base: dict[str, dict[str, Any]] = {}
        for b in run["benchmarks"]:
            key = (b["group"], b["extra_info"]["impl"])
            if key not in rows:
                order.append(key)
            rows[key].append((run_i, b))
            if b["extra_info"]["role"] == "baseline":
                base[b["group"]] = b
        baselines.append(base)

    m = runs[0]["machine_info"]
    print(f"# {len(runs)} run(s), {runs[0]['datetime'][:10]}, "
          f"Python {m['python_version']}, {m.get('cpu', {}).get('count', '?')} CPUs, "
          f"{m.get('cpu', {}).get('brand_raw', '')}")
    print()
    print("| group | impl | role | time/round | rate, median [min..max] | MB/s (payload) "
          "| fsyncs/round (median) | x baseline |")
    print("|---|---|---|---|---|---|---|---|")
    order.sort(key=lambda k: k[0])   # stable: keeps impl order within a group
    for group, impl in order:
        benches = [b for _, b in rows[(group, impl)]]
        extra = benches[0]["extra_info"]
        key, label = _unit(extra, group)
        work = extra[key]
        medians = [b["stats"]["median"] for b in benches]
        rate_med = statistics.median(work / t for t in medians)
        rate_lo = work / max(b["stats"]["max"] for b in benches)
        rate_hi = work / min(b["stats"]["min"] for b in benches)
        mbps = statistics.median(extra["bytes"] / t / 1e6 for t in medians)
        ratios = []
        for run_i, b in rows[(group, impl)]:
            base = baselines[run_i].get(group)
            if base is not None:
                bw = base["extra_info"][key]
                ratios.append((work / b["stats"]["median"]) / (bw / base["stats"]["median"]))
        fsl = [b["extra_info"]["fsyncs"] for b in benches if "fsyncs" in b["extra_info"]]
        fs = None if not fsl else f"{statistics.median(fsl):g}"
        print(f"| {group} | {impl} | {extra['role']} | {_fmt_time(statistics.median(medians))} "
              f"| {_fmt_rate(rate_med)} [{_fmt_rate(rate_lo)}..{_fmt_rate(rate_hi)}] {label} "
              f"| {mbps:.0f} | {'' if fs is None else fs} "
              f"| {_fmt_ratio(ratios) if ratios else '-'} |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1:]))

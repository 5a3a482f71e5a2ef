#!/usr/bin/env bash
# Run every micro-benchmark RUNS times (default 3) and print the ratio table.
#
#   bash bench/run_all.sh                 # 3 runs, results in a fresh temp dir
#   RUNS=1 BENCH_OUT=/tmp/b bash bench/run_all.sh
#
# Each run is one pytest process; every ratio in the table compares figures
# from the same run (see docs/benchmarks.md and ../shared/BENCH.md).
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-3}"
out="${BENCH_OUT:-$(mktemp -d -t broker-bench-XXXXXX)}"
mkdir -p "$out"
for i in $(seq 1 "$runs"); do
    echo "run $i/$runs ..." >&2
    python -m pytest bench/ --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$out/run$i.json" \
        --benchmark-max-time=0.5 --benchmark-min-rounds=5 \
        --benchmark-columns=min,median,max,rounds --benchmark-sort=name \
        "$@" > "$out/run$i.log" 2>&1 || { cat "$out/run$i.log" >&2; exit 1; }
done
python bench/report.py "$out"/run*.json | tee "$out/table.md"
echo "raw results: $out" >&2

#!/usr/bin/env bash
# W1 (HTTP append) and HTTP catch-up: `broker serve` against the Durable Streams
# reference server (@durable-streams/server 0.3.7), file-backed and in memory,
# all in the same run.  See shared/BENCH.md for the rules, docs/benchmarks.md
# ("HTTP: W1 and catch-up against the reference server") for results.
#
#   bash bench/w1_http.sh                      # 3 runs, results in a fresh temp dir
#   RUNS=1 BENCH_OUT=/tmp/w1 bash bench/w1_http.sh
#
# Needs:
#   * wrk, from Debian's package: `apt-get update && apt-get install -y wrk`
#     (wrk 4.1.0-3+b2 when this was written).
#   * node and @durable-streams/server: bench/w1_ref_server.mjs loads it from
#     $DS_NODE_MODULES, default conformance/node_modules (`npm ci` there).
#   * curl; py-spy (`pip install py-spy`) only for the profile, skipped if absent.
#
# Which broker: by default whatever `import broker` finds outside this directory
# (the editable install, i.e. the work tree as it is when each server starts).
# BROKER_REV=HEAD (or any revision) benchmarks that commit instead: its broker/
# is exported with `git archive` into the output dir and put first on PYTHONPATH,
# with the compiled _core from broker/ (refused unless _core/ matches REV).
#
# Per run, for each server (broker with its default fsync policy, group commit;
# reference file-backed, which fdatasyncs every append; reference in memory),
# each on a fresh process, a free port and a fresh temp data dir:
#   W1:       PUT /v1/stream/bench (application/octet-stream), a WARMUP wrk pass,
#             then `wrk -t1 -c16 -d$DURATION --latency -s bench/w1_post.lua`:
#             appends/s, p50, p99, non-2xx, and the server's CPU time (/proc).
#   catch-up: a fresh stream filled with RECORDS POSTs of 100 bytes (32 keep-alive
#             connections), then READS catch-up reads from offset -1 following
#             Stream-Next-Offset until Stream-Up-To-Date (bench/w1_client.py).
# SERVERS and PHASES (default "w1 catchup") pick a subset; BROKER_FSYNC (read by
# `broker serve` itself) changes the broker's fsync policy for a diagnostic run.
# The server order rotates from run to run.  After the runs, one extra W1 pass
# on the broker is profiled with py-spy (PROFILE_S seconds of Python frames, then
# PROFILE_S with native frames); that pass is not in the figures.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS="${RUNS:-3}"
DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
RECORDS="${RECORDS:-100000}"
RECORD_BYTES=100
READS="${READS:-3}"
SERVERS="${SERVERS:-broker ref-file ref-mem}"
PHASES="${PHASES:-w1 catchup}"
PROFILE="${PROFILE:-1}"
PROFILE_S="${PROFILE_S:-5}"
OUT="${BENCH_OUT:-$(mktemp -d -t w1-http-XXXXXX)}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
CLIENT=(python bench/w1_client.py)
WRK=(wrk -t1 -c16 --latency -s bench/w1_post.lua)

command -v wrk >/dev/null || { echo "wrk not found: apt-get install -y wrk" >&2; exit 1; }

SERVER_PID=""
URL=""

cleanup() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# start_server NAME DIR: start NAME with its data under DIR; sets SERVER_PID, URL.
start_server() {
    local name="$1" dir="$2"
    mkdir -p "$dir"
    case "$name" in
        # run from $dir, so that `python -m` does not put the repo first on sys.path
        broker)   (cd "$dir" && exec python -m broker serve --port 0 --data-dir "$dir/data") \
                      >"$dir/server.log" 2>&1 & ;;
        ref-file) node bench/w1_ref_server.mjs --data-dir "$dir/data" >"$dir/server.log" 2>&1 & ;;
        ref-mem)  node bench/w1_ref_server.mjs >"$dir/server.log" 2>&1 & ;;
        *) echo "unknown server $name" >&2; exit 1 ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 200); do
        URL=$(grep -o -m1 'listening on http://[0-9.]*:[0-9]*' "$dir/server.log" \
              | sed 's/listening on //') || true
        [[ -n "$URL" ]] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "$name did not start:" >&2; cat "$dir/server.log" >&2; exit 1
}

stop_server() {
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || true
    SERVER_PID=""
}

# CPU seconds (user + system, all threads) the server process has used so far.
cpu_s() {
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print ($12 + $13) / hz }' \
        "/proc/$SERVER_PID/stat"
}

# CHILD_CPU := CPU seconds (user + system) of this shell's reaped children, so the
# difference across a wrk call is wrk's cost.  `times` must run in this shell, not
# in $(...) (a subshell has its own, empty, counts); hence the file and the global.
CHILD_CPU=0
child_cpu() {
    times >"$OUT/.times"
    CHILD_CPU=$(tail -n1 "$OUT/.times" | awk '{ t = 0; for (i = 1; i <= 2; i++) {
        split($i, a, "m"); sub(/s$/, "", a[2]); t += a[1] * 60 + a[2] }; print t }')
}

create_stream() {
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT \
           -H 'Content-Type: application/octet-stream' "$URL/v1/stream/$1")
    [[ "$code" == 201 ]] || { echo "PUT $URL/v1/stream/$1 answered $code" >&2; exit 1; }
}

w1() {  # w1 RUN SERVER
    local run="$1" name="$2" dir="$OUT/run$1/$2-w1"
    start_server "$name" "$dir"
    create_stream bench
    wrk -t1 -c16 -d"$WARMUP" -s bench/w1_post.lua "$URL/v1/stream/bench" >"$dir/warmup.txt"
    local c0 c1 w0 w1
    child_cpu; w0=$CHILD_CPU
    c0=$(cpu_s)
    "${WRK[@]}" -d"$DURATION" "$URL/v1/stream/bench" >"$dir/wrk.txt"
    c1=$(cpu_s)
    child_cpu; w1=$CHILD_CPU
    stop_server
    "${CLIENT[@]}" wrk "$dir/wrk.txt" kind=w1 run="$run" server="$name" \
        cpu_s="$(awk -v a="$c0" -v b="$c1" 'BEGIN { print b - a }')" \
        wrk_cpu_s="$(awk -v a="$w0" -v b="$w1" 'BEGIN { print b - a }')" | tee -a "$RESULTS"
}

catchup() {  # catchup RUN SERVER
    local run="$1" name="$2" dir="$OUT/run$1/$2-catchup" fill_s
    start_server "$name" "$dir"
    create_stream catchup
    fill_s=$("${CLIENT[@]}" fill "$URL/v1/stream/catchup" "$RECORDS" "$RECORD_BYTES" 32)
    for r in $(seq "$READS"); do
        "${CLIENT[@]}" read "$URL/v1/stream/catchup" "$RECORDS" "$RECORD_BYTES" \
            kind=catchup run="$run" read="$r" server="$name" fill_s="$fill_s" \
            | tee -a "$RESULTS"
    done
    stop_server
}

source bench/_broker_rev.sh            # the cwd is the repo root (see above)

read -r -a servers <<<"$SERVERS"
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "broker: $broker_desc; fsync ${BROKER_FSYNC:-default (group)}"
    echo "nproc: $(nproc); load: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "python: $(python --version 2>&1); node: $(node --version); $(wrk --version 2>&1 | head -1)"
    echo "RUNS=$RUNS DURATION=$DURATION WARMUP=$WARMUP RECORDS=$RECORDS READS=$READS" \
         "SERVERS='$SERVERS' PHASES='$PHASES'"
} | tee "$OUT/env.txt" >&2

for run in $(seq "$RUNS"); do
    # rotate the order so no server always goes first
    k=$(( (run - 1) % ${#servers[@]} ))
    order=("${servers[@]:$k}" "${servers[@]:0:$k}")
    echo "run $run/$RUNS: ${order[*]}" >&2
    if [[ " $PHASES " == *" w1 "* ]]; then for s in "${order[@]}"; do w1 "$run" "$s"; done; fi
    if [[ " $PHASES " == *" catchup "* ]]; then
        for s in "${order[@]}"; do catchup "$run" "$s"; done
    fi
done

if [[ "$PROFILE" == 1 && " ${servers[*]} " == *" broker "* ]]; then
    if command -v py-spy >/dev/null; then
        dir="$OUT/profile"
        start_server broker "$dir"
        create_stream bench
        "${WRK[@]}" -d$((2 * PROFILE_S + 4))s "$URL/v1/stream/bench" >"$dir/wrk.txt" &
        wrk_pid=$!
        sleep 2
        # Python frames per thread, then the same with native (C, Cython) frames.
        py-spy record -p "$SERVER_PID" -d "$PROFILE_S" -r 100 -f raw --nolineno --threads \
            -o "$dir/pyspy.raw" >"$dir/pyspy.log" 2>&1 || cat "$dir/pyspy.log" >&2
        py-spy record -p "$SERVER_PID" -d "$PROFILE_S" -r 100 -f raw --nolineno --native \
            -o "$dir/pyspy-native.raw" >>"$dir/pyspy.log" 2>&1 || cat "$dir/pyspy.log" >&2
        wait "$wrk_pid"
        stop_server
        {
            echo "py-spy on the broker under W1 (wrk -t1 -c16; this pass:" \
                 "$(grep Requests/sec "$dir/wrk.txt" | tr -s ' '), $(grep -o 'Non-2xx.*' "$dir/wrk.txt" || echo 'all 2xx'))"
            echo "--- Python frames, ${PROFILE_S}s at 100 Hz"
            "${CLIENT[@]}" pyspy "$dir/pyspy.raw" 10 $((100 * PROFILE_S))
            echo "--- with native frames (--native), the next ${PROFILE_S}s"
            "${CLIENT[@]}" pyspy "$dir/pyspy-native.raw" 10 $((100 * PROFILE_S))
        } | tee "$dir/top.txt" >&2
    else
        echo "py-spy not found (pip install py-spy): no profile" >&2
    fi
fi

echo "finished: $(date -u '+%H:%M:%S UTC'); load: $(cut -d' ' -f1-3 /proc/loadavg)" \
    | tee -a "$OUT/env.txt" >&2
"${CLIENT[@]}" report "$RESULTS" | tee "$OUT/table.md"
echo "raw results: $OUT" >&2

#!/usr/bin/env bash
# W2, W3 and W4 (shared/BENCH.md) over WebSocket: `broker serve` against two naive
# in-memory relays, trio-websocket (bench/ws_relay_trio.py) and websockets
# (bench/ws_relay_websockets.py), all in the same run, one load tool for all
# (bench/ws_load.py).  Results: docs/benchmarks.md, "WebSocket: W2, W3, W4".
#
#   bash bench/ws_bench.sh                       # 3 runs, results in a fresh temp dir
#   RUNS=1 BENCH_OUT=/tmp/ws bash bench/ws_bench.sh
#
# Needs trio-websocket and websockets (17.x) installed, numpy for the
# percentiles, and py-spy (`pip install py-spy`) for the profile (skipped if absent).
#
# Which broker: by default whatever `import broker` finds outside this directory
# (the editable install, i.e. the work tree as it is when each server starts).
# BROKER_REV=HEAD (or any revision) benchmarks that commit instead: its broker/
# is exported with `git archive` into the output dir and put first on PYTHONPATH,
# with the compiled _core from broker/ (refused unless _core/ matches REV).
# BROKER_FSYNC (read by `broker serve` itself) changes its fsync policy.
#
# Per run, for each server (the order rotates from run to run), each workload on
# a fresh server process (the broker with a fresh temp data dir):
#   W2:  one connection publishes W2_MESSAGES (1M) messages of 100 bytes to one
#        session, in publishes of each batch size in W2_BATCHES ("10 100 1000"),
#        at most WINDOW (32768) records unacked: messages/s acknowledged.
#   W3:  a publisher paced at 50% of this server's W2 rate at batch BATCH (100) in
#        this run, and one subscriber, for W3_SECONDS: publish-to-deliver latency;
#        then the same at the common rate W3_FIXED_RATE (10,000 msgs/s), so the
#        servers are also compared at one rate.
#   W4:  W4_SUBS (1,000) subscribers and one publisher in one client process: the
#        publisher as fast as acks allow (WINDOW) for W4_SECONDS: deliveries/s;
#        then paced at half of that (deliveries/s / subscribers / 2 messages/s), or
#        at W4_HALF_RATE messages/s if set: latency, on every 10th subscriber.
# PHASES ("w2 w3 w4") and SERVERS ("broker relay-trio relay-ws") pick a subset;
# SERVERS may add broker-durable (the broker with --deliver durable: readers see
# a record only once its fsync is done, as its publisher does).
# After the runs, the broker is profiled with py-spy under W2 and under W4 (the
# W4 maximum-rate phase): PROFILE_S seconds of Python frames, then PROFILE_S of
# native frames; those passes are not in the figures.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS="${RUNS:-3}"
SERVERS="${SERVERS:-broker relay-trio relay-ws}"
PHASES="${PHASES:-w2 w3 w4}"
W2_MESSAGES="${W2_MESSAGES:-1000000}"
W2_BATCHES="${W2_BATCHES:-10 100 1000}"
BATCH="${BATCH:-100}"
WINDOW="${WINDOW:-32768}"
W3_SECONDS="${W3_SECONDS:-8}"
W3_FIXED_RATE="${W3_FIXED_RATE:-10000}"
W4_SUBS="${W4_SUBS:-1000}"
W4_SECONDS="${W4_SECONDS:-6}"
W4_HALF_RATE="${W4_HALF_RATE:-}"
PROFILE="${PROFILE:-1}"
PROFILE_S="${PROFILE_S:-8}"
OUT="${BENCH_OUT:-$(mktemp -d -t ws-bench-XXXXXX)}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
LOAD=(python bench/ws_load.py)
RELAYS="$PWD/bench"

ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
(( $(ulimit -n) > W4_SUBS + 100 )) || { echo "ulimit -n is $(ulimit -n): too low" >&2; exit 1; }

SERVER_PID=""
URL=""

cleanup() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# start_server NAME DIR: start NAME with its files under DIR; sets SERVER_PID, URL.
start_server() {
    local name="$1" dir="$2"
    mkdir -p "$dir"
    case "$name" in
        # run from $dir, so that `python -m` does not put the repo first on sys.path
        broker)     (cd "$dir" && exec python -m broker serve --port 0 --data-dir "$dir/data") \
                        >"$dir/server.log" 2>&1 & ;;
        # the same broker, showing records to readers only once durable
        broker-durable) (cd "$dir" && exec python -m broker serve --port 0 --data-dir "$dir/data" \
                        --deliver durable) >"$dir/server.log" 2>&1 & ;;
        relay-trio) python "$RELAYS/ws_relay_trio.py" >"$dir/server.log" 2>&1 & ;;
        relay-ws)   python "$RELAYS/ws_relay_websockets.py" >"$dir/server.log" 2>&1 & ;;
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

# stop_server DIR: a server that died during the workload is an error worth seeing.
stop_server() {
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "the server died during the workload; its log ($1/server.log):" >&2
        tail -n 30 "$1/server.log" >&2
        SERVER_PID=""
        return 1
    fi
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || true
    SERVER_PID=""
    rm -rf "$1/data"                 # a W2 run leaves ~0.5 GB behind
}

w2() {  # w2 RUN SERVER
    local run="$1" name="$2" dir="$OUT/run$1/$2-w2" b
    start_server "$name" "$dir"
    for b in $W2_BATCHES; do
        "${LOAD[@]}" w2 "$URL" --messages "$W2_MESSAGES" --batch "$b" --window "$WINDOW" \
            --server-pid "$SERVER_PID" run="$run" server="$name" | tee -a "$RESULTS"
    done
    stop_server "$dir"
}

w3() {  # w3 RUN SERVER
    local run="$1" name="$2" dir="$OUT/run$1/$2-w3" max rate
    if max=$("${LOAD[@]}" rate "$RESULTS" "$run" "$name" "$BATCH" 2>/dev/null); then
        rate=$(( max / 2 ))
    else
        # no W2 in this run (PHASES without w2): measure it here
        start_server "$name" "$dir-w2"
        max=$("${LOAD[@]}" w2 "$URL" --messages "$W2_MESSAGES" --batch "$BATCH" \
              --window "$WINDOW" | python -c 'import json, sys; print(int(json.load(sys.stdin)["msgs_s"]))')
        stop_server "$dir-w2"
        rate=$(( max / 2 ))
    fi
    start_server "$name" "$dir"
    "${LOAD[@]}" w3 "$URL" --rate "$rate" --seconds "$W3_SECONDS" --batch "$BATCH" \
        --window "$WINDOW" --server-pid "$SERVER_PID" run="$run" server="$name" w2_rate="$max" \
        | tee -a "$RESULTS"
    "${LOAD[@]}" w3 "$URL" --rate "$W3_FIXED_RATE" --seconds "$W3_SECONDS" --batch "$BATCH" \
        --window "$WINDOW" --server-pid "$SERVER_PID" run="$run" server="$name" kind=w3fixed \
        | tee -a "$RESULTS"
    stop_server "$dir"
}

w4() {  # w4 RUN SERVER
    local run="$1" name="$2" dir="$OUT/run$1/$2-w4"
    start_server "$name" "$dir"
    "${LOAD[@]}" w4 "$URL" --subs "$W4_SUBS" --seconds "$W4_SECONDS" --batch "$BATCH" \
        --window "$WINDOW" ${W4_HALF_RATE:+--half-rate "$W4_HALF_RATE"} \
        --server-pid "$SERVER_PID" run="$run" server="$name" | tee -a "$RESULTS"
    stop_server "$dir"
}

source bench/_broker_rev.sh            # the cwd is the repo root (see above)

read -r -a servers <<<"$SERVERS"
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "broker: $broker_desc; fsync ${BROKER_FSYNC:-default (group)}"
    echo "nproc: $(nproc); load: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "python: $(python --version 2>&1); $(python -c 'import trio, trio_websocket, websockets, msgpack; print(f"trio {trio.__version__}, trio-websocket {trio_websocket.__version__}, websockets {websockets.__version__}, msgpack {msgpack.version}")')"
    echo "RUNS=$RUNS SERVERS='$SERVERS' PHASES='$PHASES' W2_MESSAGES=$W2_MESSAGES" \
         "W2_BATCHES='$W2_BATCHES' BATCH=$BATCH WINDOW=$WINDOW W3_SECONDS=$W3_SECONDS" \
         "W3_FIXED_RATE=$W3_FIXED_RATE W4_SUBS=$W4_SUBS W4_SECONDS=$W4_SECONDS" \
         "W4_HALF_RATE=${W4_HALF_RATE:-half of max}"
} | tee "$OUT/env.txt" >&2

for run in $(seq "$RUNS"); do
    k=$(( (run - 1) % ${#servers[@]} ))
    order=("${servers[@]:$k}" "${servers[@]:0:$k}")
    echo "run $run/$RUNS: ${order[*]} ($(date -u '+%H:%M:%S'))" >&2
    for s in "${order[@]}"; do
        if [[ " $PHASES " == *" w2 "* ]]; then w2 "$run" "$s"; fi
        if [[ " $PHASES " == *" w3 "* ]]; then w3 "$run" "$s"; fi
        if [[ " $PHASES " == *" w4 "* ]]; then w4 "$run" "$s"; fi
    done
done

# profile PHASE SECONDS_BEFORE LOAD-ARGS...: run the load in the background and
# record the broker with py-spy once it is under way.
profile() {
    local phase="$1" delay="$2" dir="$OUT/profile-$1" pid
    shift 2
    start_server broker "$dir"
    "${LOAD[@]}" "$1" "$URL" "${@:2}" --server-pid "$SERVER_PID" >"$dir/load.json" &
    pid=$!
    sleep "$delay"
    py-spy record -p "$SERVER_PID" -d "$PROFILE_S" -r 100 -f raw --nolineno --threads \
        -o "$dir/pyspy.raw" >"$dir/pyspy.log" 2>&1 || cat "$dir/pyspy.log" >&2
    py-spy record -p "$SERVER_PID" -d $(( PROFILE_S / 2 )) -r 100 -f raw --nolineno --native \
        -o "$dir/pyspy-native.raw" >>"$dir/pyspy.log" 2>&1 || cat "$dir/pyspy.log" >&2
    wait "$pid"
    stop_server "$dir"
    {
        echo "py-spy on the broker under $phase: $(cat "$dir/load.json")"
        echo "--- Python frames, ${PROFILE_S}s at 100 Hz"
        python bench/w1_client.py pyspy "$dir/pyspy.raw" 12 $(( 100 * PROFILE_S ))
        echo "--- native frames (--native), the next $(( PROFILE_S / 2 ))s"
        python bench/w1_client.py pyspy "$dir/pyspy-native.raw" 12 $(( 50 * PROFILE_S ))
    } | tee "$dir/top.txt" >&2
}

if [[ "$PROFILE" == 1 && " ${servers[*]} " == *" broker "* ]]; then
    if command -v py-spy >/dev/null; then
        # W2 long enough to cover both recordings; W4's maximum-rate phase likewise
        # (the profile starts after the subscribers are attached and the warm-up).
        profile w2 1 w2 --messages $(( W2_MESSAGES * 8 )) --batch "$BATCH" --window "$WINDOW"
        profile w4 4 w4 --subs "$W4_SUBS" --seconds $(( PROFILE_S * 2 )) --batch "$BATCH" \
            --window "$WINDOW"
    else
        echo "py-spy not found (pip install py-spy): no profile" >&2
    fi
fi

echo "finished: $(date -u '+%H:%M:%S UTC'); load: $(cut -d' ' -f1-3 /proc/loadavg)" \
    | tee -a "$OUT/env.txt" >&2
"${LOAD[@]}" report "$RESULTS" | tee "$OUT/table.md"
echo "raw results: $OUT" >&2

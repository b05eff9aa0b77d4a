#!/usr/bin/env bash
# User-space instructions per delivery of a pollgate binary, counted by
# valgrind's callgrind: unlike CPU time on a shared 2-core machine, the
# count repeats to within about 0.5 % from run to run, so a change of a
# few per cent to the per-request work shows (docs/benchmarks.md,
# "Performance work"). Kernel work is not counted: see the CPU rows of
# bench/compare.sh for that.
#
#   bench/callgrind.sh                       # target/release/pollgate, latency row
#   SCENARIO=churn bench/callgrind.sh        # the churn row
#   bench/callgrind.sh path/to/pollgate      # another build
#   CACHE=1 bench/callgrind.sh               # also first-level cache misses per delivery
#
# CACHE=1 simulates a 32 KiB first-level data cache (8-way, 64-byte
# lines): its misses per delivery count the cache lines a delivery
# touches that were not touched since the connection's last delivery,
# which is what a delivery's CPU time follows once its instructions are
# few (docs/benchmarks.md, "Performance work"). Slower, still repeatable.
#
# Rows (small, since callgrind runs the server about 50 times slower):
# latency = 300 subscribers x 1 channel x 20 messages at 200 ms; churn =
# 300 subscribers x 30 channels x 300 messages/s for 5 s. One warm-up run
# first (connections, channels), then only the measured run is counted.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/pollgate}
SCENARIO=${SCENARIO:-latency}
OUT=bench/out/callgrind
mkdir -p "$OUT/tls"
command -v valgrind >/dev/null || { echo "bench/callgrind.sh: needs valgrind (apt-get install valgrind)" >&2; exit 2; }
[ -x target/release/pollgate-bench ] || cargo build --release --features bench --bin pollgate-bench
[ -f "$OUT/tls/cert.pem" ] || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost \
  -keyout "$OUT/tls/key.pem" -out "$OUT/tls/cert.pem" 2>/dev/null
ulimit -n 20000
rm -f "$OUT"/cg.out.*
cache=(); [ "${CACHE:-0}" = 1 ] && cache=(--cache-sim=yes --D1=32768,8,64)
BENCH_TLS=$OUT/tls valgrind --tool=callgrind "${cache[@]}" --instr-atstart=no --callgrind-out-file="$OUT/cg.out.%p" \
  "$BIN" serve -c bench/conf/pollgate.yaml --log-level warn 2>"$OUT/valgrind.log" &
PG=$!
trap 'kill $PG 2>/dev/null || true' EXIT
for _ in $(seq 150); do (exec 3<>/dev/tcp/127.0.0.1/19090) 2>/dev/null && break; sleep 0.2; done
case $SCENARIO in
  latency) args=(--scenario fanout --subscribers 300 --channels 1 --messages 20 --interval 200ms) ;;
  churn) args=(--scenario churn --subscribers 300 --channels 30 --rate 300 --duration 5s) ;;
  *) echo "SCENARIO is latency or churn" >&2; exit 2 ;;
esac
bench() { target/release/pollgate-bench --server pollgate --label callgrind --sub 127.0.0.1:18080 \
  --publish 127.0.0.1:19090 --pid "$PG" --prefix "$1$$" "${args[@]}"; }
bench w >/dev/null 2>&1
callgrind_control -i on "$PG" >/dev/null 2>&1
bench c > "$OUT/run.json" 2>/dev/null
callgrind_control -d "$PG" >/dev/null 2>&1
callgrind_control -i off "$PG" >/dev/null 2>&1
kill "$PG"; wait "$PG" 2>/dev/null || true
trap - EXIT
delivered=$(python3 -c "import json,sys;print(next(json.loads(l) for l in open(sys.argv[1]) if l.startswith('{'))['delivered'])" "$OUT/run.json")
total=$(awk '/Collected/ {gsub(",", "", $4); print $4}' "$OUT/valgrind.log")
echo "$SCENARIO: $delivered deliveries, $((total / delivered)) user-space instructions per delivery ($BIN)"
if [ "${CACHE:-0}" = 1 ]; then
  # The totals line counts the events in the order of the events line.
  awk -v n="$delivered" '/^events:/ {for (i = 2; i <= NF; i++) e[i - 1] = $i}
    /^totals:/ {for (i = 2; i <= NF; i++) t[e[i - 1]] += $i}
    END {printf "first-level data cache misses per delivery: %.1f reads, %.1f writes\n", t["D1mr"] / n, t["D1mw"] / n}' \
    $(ls -S "$OUT"/cg.out.* | head -1)
fi
echo "profile: callgrind_annotate \$(ls -S $OUT/cg.out.* | head -1)"

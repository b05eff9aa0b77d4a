#!/usr/bin/env bash
# Server CPU per delivery and latency of pollgate builds against Nchan, in
# one run: each row runs each given pollgate binary, then Nchan, round
# after round (drift on a shared machine hits all alike), and prints the
# means per build and row. For a change's before and after (the binary of
# each commit), where bench/compare.sh compares the servers in full.
#
#   bench/ab.sh 3 old/pollgate target/release/pollgate    # 3 rounds
#   ROWS="latency churn fan10k" bench/ab.sh 2 target/release/pollgate
#   RES=out.jsonl bench/ab.sh ...      # every run's JSON (default bench/out/ab.jsonl)
#
# Rows as in compare.sh: latency = 2 000 subscribers x 1 channel x 50
# messages at 200 ms; churn = 2 000 x 200 channels x 2 000/s for 20 s;
# fan10k = 10 000 x 1 channel x 10 messages at 1 s. Builds are pg0, pg1...
# in the order given. Needs nginx with Nchan (compare.sh installs it) and
# target/release/pollgate-bench.
set -uo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:?rounds}; shift
[ $# -ge 1 ] || { echo "bench/ab.sh ROUNDS POLLGATE_BINARY..." >&2; exit 2; }
OUT=bench/out; mkdir -p "$OUT/tmp" "$OUT/tls"
[ -f "$OUT/tls/cert.pem" ] || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -keyout "$OUT/tls/key.pem" -out "$OUT/tls/cert.pem" 2>/dev/null
[ -x target/release/pollgate-bench ] || cargo build --release --features bench --bin pollgate-bench
ulimit -n 20000
sed "s|@OUT@|$PWD/$OUT|g" bench/conf/nginx.conf.in > "$OUT/nginx.conf"
nginx -c "$PWD/$OUT/nginx.conf" -p "$PWD/$OUT" || exit 1
sleep 1; NG=$(cat "$OUT/nginx.pid")
trap 'kill "$NG" 2>/dev/null' EXIT
RES=${RES:-$OUT/ab.jsonl}; : > "$RES"
ROWS=${ROWS:-"latency churn"}
run() { # build sub publish pid row server
  local a
  case $5 in
    latency) a=(--scenario fanout --subscribers 2000 --channels 1 --messages 50 --interval 200ms) ;;
    churn) a=(--scenario churn --subscribers 2000 --channels 200 --rate 2000 --duration 20s) ;;
    fan10k) a=(--scenario fanout --subscribers 10000 --channels 1 --messages 10 --interval 1s) ;;
    *) echo "unknown row $5" >&2; exit 2 ;;
  esac
  target/release/pollgate-bench --server "$6" --label "$1 $5" --sub "$2" --publish "$3" --pid "$4" \
    --prefix "ab$RANDOM" "${a[@]}" 2>/dev/null | grep '^{' >> "$RES"
  sleep 2
}
for _ in $(seq "$ROUNDS"); do
  for row in $ROWS; do
    i=0
    for bin in "$@"; do
      "$bin" serve -c bench/conf/pollgate.yaml --log-level warn 2>/dev/null & pg=$!
      for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/19090) 2>/dev/null && break; sleep 0.1; done
      run "pg$i" 127.0.0.1:18080 127.0.0.1:19090 "$pg" "$row" pollgate
      kill "$pg"; wait "$pg" 2>/dev/null; i=$((i + 1))
    done
    run nchan 127.0.0.1:18081 127.0.0.1:18081 "$NG" "$row" nchan
  done
done
python3 - "$RES" <<'PY'
import json, statistics as st, sys
rows = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    rows.setdefault(d["label"], []).append(d)
for label in sorted(rows):
    v = rows[label]
    mean = lambda f: st.mean(f(x) for x in v)
    print(f"{label:16} n={len(v)} user {mean(lambda x: x['server_user_us_per_delivery']):6.2f}"
          f" kernel {mean(lambda x: x['server_kernel_us_per_delivery']):6.2f}"
          f" total {mean(lambda x: x['server_cpu_us_per_delivery']):6.2f} µs/delivery"
          f"  p50 {mean(lambda x: x['latency_ms']['p50']):7.3f} p99 {mean(lambda x: x['latency_ms']['p99']):7.3f} ms"
          f"  lost {sum(x['lost'] for x in v)} dup {sum(x['duplicates'] for x in v)}"
          f"  client {mean(lambda x: x['client_cpu_percent']):5.1f} %")
PY

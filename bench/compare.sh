#!/usr/bin/env bash
# Reproduces docs/benchmarks.md: pollgate against Nchan and Pushpin on this
# machine, in one run, scenarios alternating between servers so that drift
# hits all equally. Installs the peers when missing, starts every server
# (one worker each, history 100, 60 s holds), writes
# bench/results/<date>.json and regenerates the results part of
# docs/benchmarks.md and docs/benchmarks.png. Stops everything it started.
#
#   bench/compare.sh                 # full comparison (~10 minutes)
#   REPS=3 bench/compare.sh          # more repetitions (medians are reported)
#   QUICK=1 bench/compare.sh         # a small, fast version of every scenario
#                                    # (results and report under bench/out)
#   RESULTS=bench/results/x.json bench/compare.sh   # another results file
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-1}
QUICK=${QUICK:-0}
OUT=bench/out
DATE=$(date +%F)
# A quick run writes its results and report under bench/out, not the docs.
if [ "$QUICK" = 1 ]; then
  RESULTS=${RESULTS:-$OUT/quick-$DATE.json}; MD=$OUT/benchmarks-quick.md; PNG=$OUT/benchmarks-quick.png
else
  RESULTS=${RESULTS:-bench/results/$DATE.json}; MD=docs/benchmarks.md; PNG=docs/benchmarks.png
fi
mkdir -p "$OUT/tmp" "$OUT/pushpin-run" "$OUT/pushpin-log" "$OUT/tls" bench/results /var/run/zurl

scripts/deps
need=()
[ -e /usr/lib/nginx/modules/ngx_nchan_module.so ] || need+=(nginx-light libnginx-mod-nchan)
command -v pushpin >/dev/null || need+=(pushpin)
command -v zurl >/dev/null || need+=(zurl)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --features bench --bin pollgate --bin pollgate-bench
ulimit -n 20000
# The certificate of both servers' TLS listeners (pollgate 18443, Nchan 18444).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost \
  -keyout "$OUT/tls/key.pem" -out "$OUT/tls/cert.pem" 2>/dev/null

started=()
cleanup() {
  for p in "${started[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$OUT/nginx.pid" ] && kill "$(cat "$OUT/nginx.pid")" 2>/dev/null || true
  sleep 1
  for p in "${started[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# pollgate, memory broker
start_pollgate() {
  target/release/pollgate serve -c bench/conf/pollgate.yaml --log-level warn 2>"$OUT/pollgate.log" &
  started+=($!); PG=$!
}
start_pollgate
# Nchan (and the GRIP backend Pushpin asks)
sed "s|@OUT@|$PWD/$OUT|g" bench/conf/nginx.conf.in > "$OUT/nginx.conf"
start_nginx() { nginx -c "$PWD/$OUT/nginx.conf" -p "$PWD/$OUT"; wait_port 18081; NG=$(cat "$OUT/nginx.pid"); }
start_nginx
# Fresh pollgate and Nchan processes (the hold rows measure RSS growth).
restart_both() {
  kill "$PG" "$NG"; sleep 1
  start_pollgate; start_nginx; wait_port 18080; wait_port 18443; wait_port 18444; sleep 1
}
# Pushpin (+ zurl, which it talks to for backend requests)
zurl --config=/etc/zurl.conf >"$OUT/zurl.log" 2>&1 &
started+=($!); ZU=$!
sed "s|@OUT@|$PWD/$OUT|g" bench/conf/pushpin.conf.in > "$OUT/pushpin.conf"
echo "* 127.0.0.1:18083" > "$OUT/pushpin-routes"
start_pushpin() {
  pushpin --config "$PWD/$OUT/pushpin.conf" >"$OUT/pushpin.out" 2>&1 &
  started+=($!); PP=$!
}
stop_pushpin() {
  pkill -P "$PP" 2>/dev/null || true; kill "$PP" 2>/dev/null || true; sleep 2
  pkill -f "pushpin-handler --config=$PWD/$OUT" 2>/dev/null || true
  pkill -f "pushpin-proxy --config=$PWD/$OUT" 2>/dev/null || true
  pkill -f "condure" 2>/dev/null || true
}
restart_pushpin() { # Pushpin stays busy for minutes after a heavy run: start it afresh
  stop_pushpin; start_pushpin; wait_port 18082; wait_port 5561; sleep 2
}
start_pushpin
# Redis and two pollgate instances on it
RPORT=16379
redis-server --port $RPORT --bind 127.0.0.1 --save "" --appendonly no --daemonize no >"$OUT/redis.log" 2>&1 &
started+=($!)
for i in 0 1; do
  BENCH_BROKER=redis://127.0.0.1:$RPORT/0 BENCH_TLS_PORT=1849$i target/release/pollgate serve \
    -c bench/conf/pollgate.yaml --listen 127.0.0.1:1809$i --admin-listen 127.0.0.1:1919$i --log-level warn 2>"$OUT/pollgate-redis$i.log" &
  started+=($!); eval "PGR$i=$!"
done
# pollgate with two worker threads (deliveries per core against one)
BENCH_THREADS=2 BENCH_TLS_PORT=18495 target/release/pollgate serve -c bench/conf/pollgate.yaml \
  --listen 127.0.0.1:18095 --admin-listen 127.0.0.1:19095 --log-level warn 2>"$OUT/pollgate-threads2.log" &
started+=($!); PGT=$!
# pollgate with presence tracked (the churn row's cost of presence)
BENCH_PRESENCE="webhooks: {linger: 15s}" BENCH_TLS_PORT=18496 target/release/pollgate serve -c bench/conf/pollgate.yaml \
  --listen 127.0.0.1:18096 --admin-listen 127.0.0.1:19096 --log-level warn 2>"$OUT/pollgate-presence.log" &
started+=($!); PGP=$!
for p in 18080 19090 18443 18081 18444 18082 18083 5561 18090 18091 19190 18095 19095 18096 19096; do wait_port $p; done
stop_pushpin
sleep 2

if [ "$QUICK" = 1 ]; then
  F_SUBS=1000; F_MSGS=20; L_SUBS=500; L_MSGS=10; C_SUBS=400; C_CH=40; C_RATE=400; C_DUR=5s; X_SUBS=1000; X_MSGS=3; H_SUBS=2000; T_SUBS=500; W_SUBS=500; W_DIRECT=500; W_DUR=5s
else
  F_SUBS=10000; F_MSGS=100; L_SUBS=2000; L_MSGS=50; C_SUBS=2000; C_CH=200; C_RATE=2000; C_DUR=20s; X_SUBS=10000; X_MSGS=10; H_SUBS=18000; T_SUBS=5000; W_SUBS=10000; W_DIRECT=9000; W_DUR=20s
fi

: > "$RESULTS.tmp"
run=0
bench() { # label server args...
  local label=$1 server=$2; shift 2
  local sub pub pid
  case $server in
    pollgate) sub=127.0.0.1:18080; pub=127.0.0.1:19090; pid=$PG ;;
    pollgate-tls) server=pollgate; sub=127.0.0.1:18443; pub=127.0.0.1:19090; pid=$PG ;;
    nchan) sub=127.0.0.1:18081; pub=127.0.0.1:18081; pid=$NG ;;
    nchan-tls) server=nchan; sub=127.0.0.1:18444; pub=127.0.0.1:18081; pid=$NG ;;
    pushpin) sub=127.0.0.1:18082; pub=127.0.0.1:5561; pid="$PP --pid $ZU" ;;
  esac
  run=$((run + 1))
  echo "== $label / $server" >&2
  # Pushpin only runs during its own rows, started afresh, so that its
  # leftover work does not slow the other servers' rows.
  [ "$server" = pushpin ] && { restart_pushpin; pid="$PP --pid $ZU"; }
  # shellcheck disable=SC2086
  target/release/pollgate-bench --server "$server" --label "$label" --sub $sub --publish $pub \
    --pid $pid --prefix "r${run}c" "$@" >> "$RESULTS.tmp" || echo "   (run failed)" >&2
  [ "$server" = pushpin ] && stop_pushpin
  sleep 2
}
servers() { # rotate the order each repetition
  case $(( $1 % 3 )) in 0) echo "pollgate nchan pushpin";; 1) echo "nchan pushpin pollgate";; *) echo "pushpin pollgate nchan";; esac
}

for rep in $(seq "$REPS"); do
  # Hold first, on fresh processes, so RSS is not hidden by memory kept from earlier runs.
  if [ "$rep" = 1 ]; then
    for s in $(servers 0); do bench hold "$s" --scenario hold --subscribers $H_SUBS --duration 10s; done
    # A held poll's cost over TLS (HTTP/1.1, a connection each) and HTTP/2
    # on TLS (100 polls per connection), each on fresh processes.
    for t in tls h2; do
      restart_both
      for s in pollgate-tls nchan-tls; do
        bench "hold $t" "$s" --scenario hold --transport $t --subscribers $T_SUBS --duration 5s
      done
    done
    restart_both
  fi
  for s in $(servers "$rep"); do
    # Throughput: rounds published back to back (saturation).
    bench "fanout 1ch" "$s" --scenario fanout --subscribers $F_SUBS --channels 1 --messages $F_MSGS --interval 0ms
    bench "fanout 100ch" "$s" --scenario fanout --subscribers $F_SUBS --channels 100 --messages $F_MSGS --interval 0ms
    # Latency below saturation.
    bench "latency 1ch" "$s" --scenario fanout --subscribers $L_SUBS --channels 1 --messages $L_MSGS --interval 200ms
    bench "churn" "$s" --scenario churn --subscribers $C_SUBS --channels $C_CH --rate $C_RATE --duration $C_DUR
    # One message a second to 10 000 subscribers of one channel.
    bench "fanout 10k 1/s" "$s" --scenario fanout --subscribers $X_SUBS --channels 1 --messages $X_MSGS --interval 1s
  done
  # Watch routes: one resource, one write a second, watchers through pollgate;
  # against the same clients polling the backend every second (9 000: the
  # load generator then holds both ends of every connection).
  echo "== watch / pollgate" >&2
  target/release/pollgate-bench --server pollgate --label "watch" --sub 127.0.0.1:18080 --pid "$PG" \
    --scenario watch --subscribers $W_SUBS --rate 1 --duration $W_DUR >> "$RESULTS.tmp" || true
  echo "== watch direct polling / backend" >&2
  target/release/pollgate-bench --server pollgate --label "watch direct" --sub 127.0.0.1:18080 --pid "$PG" \
    --scenario watch --direct --interval 1s --subscribers $W_DIRECT --rate 1 --duration $W_DUR >> "$RESULTS.tmp" || true
  echo "== fanout 1ch threads 2 / pollgate" >&2
  target/release/pollgate-bench --server pollgate --label "fanout 1ch threads 2" --sub 127.0.0.1:18095 \
    --publish 127.0.0.1:19095 --pid "$PGT" --prefix "t2${rep}c" \
    --scenario fanout --subscribers $F_SUBS --channels 1 --messages $F_MSGS --interval 0ms >> "$RESULTS.tmp" || true
  echo "== churn presence / pollgate" >&2
  target/release/pollgate-bench --server pollgate --label "churn presence" --sub 127.0.0.1:18096 \
    --publish 127.0.0.1:19096 --pid "$PGP" --prefix "p${rep}c" \
    --scenario churn --subscribers $C_SUBS --channels $C_CH --rate $C_RATE --duration $C_DUR >> "$RESULTS.tmp" || true
  echo "== fanout 1ch redis (2 instances) / pollgate" >&2
  target/release/pollgate-bench --server pollgate --label "fanout 1ch redis" --sub 127.0.0.1:18090 127.0.0.1:18091 \
    --publish 127.0.0.1:19190 --pid "$PGR0" --pid "$PGR1" --prefix "redis${rep}c" \
    --scenario fanout --subscribers $F_SUBS --channels 1 --messages $F_MSGS --interval 0ms >> "$RESULTS.tmp" || true
done

python3 - "$RESULTS.tmp" "$RESULTS" "$(git rev-parse --short HEAD)" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
json.dump({"commit": sys.argv[3], "machine": "2 cores, loopback", "runs": runs}, open(sys.argv[2], "w"), indent=1)
PY
rm -f "$RESULTS.tmp"
python3 -c "import matplotlib" 2>/dev/null || { python3 -m venv "$OUT/venv" && "$OUT/venv/bin/pip" install -q matplotlib; }
PY=python3; python3 -c "import matplotlib" 2>/dev/null || PY="$OUT/venv/bin/python"
[ "$QUICK" = 1 ] && cp docs/benchmarks.md "$MD"
$PY bench/report.py "$RESULTS" "$MD" "$PNG"
echo "wrote $RESULTS, $MD and $PNG" >&2

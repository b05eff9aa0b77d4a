#!/usr/bin/env bash
# A fleet, measured (docs/scaling.md): K pollgate instances (K = 1, 2, 4)
# on one redis-server, and on a three-master Redis Cluster; beside them one
# instance on the memory broker; then one instance at threads 1, 2 and 4.
# Each instance holds POLLS_PER_INSTANCE polls (17 500: 70 000 for K = 4)
# over CHANNELS channels (1 000), from LOADGENS load-generator processes
# (4, each under the 20 000-file limit, each on 4 loopback source
# addresses), with RATE publishes a second (200) spread over the channels
# and the instances' publish APIs, for DURATION (30s).
#
# `churn:2` is Redis's bill at a busy rate: two instances, 1 000 polls
# each over 200 channels, 2 000 publishes a second (CHURN_RATE=N for N).
#
# For each fleet it reports: Redis CPU per publish, gateway CPU per
# delivery, publish → answer latency (p50, p99, max: the max is when the
# last subscriber of a message had it), RSS per held poll, deliveries per
# gateway core-second, lost and duplicates (must be 0). Writes
# bench/results/fleet-<date>.json (one JSON object per fleet) and prints a
# table.
#
#   bench/fleet.sh                       # everything (~15 minutes)
#   FLEETS="redis:1 redis:2" bench/fleet.sh   # some fleets only
#   POLLS_PER_INSTANCE=5000 DURATION=10s bench/fleet.sh   # smaller
#   BIN=some/dir bench/fleet.sh          # binaries built elsewhere (no build)
set -euo pipefail
cd "$(dirname "$0")/.."
POLLS_PER_INSTANCE=${POLLS_PER_INSTANCE:-17500}
CHANNELS=${CHANNELS:-1000}
RATE=${RATE:-200}
DURATION=${DURATION:-30s}
LOADGENS=${LOADGENS:-4}
FLEETS=${FLEETS:-"memory:1 redis:1 redis:2 redis:4 cluster:1 cluster:2 cluster:4 churn:2 threads:1 threads:2 threads:4"}
OUT=bench/out/fleet
RESULTS=${RESULTS:-bench/results/fleet-$(date +%F).json}
mkdir -p "$OUT" bench/results
: > "$RESULTS.tmp"

BIN=${BIN:-}
scripts/deps >/dev/null
if [ -z "$BIN" ]; then
  cargo build --release --features bench --bin pollgate --bin pollgate-bench
  BIN=target/release
fi
ulimit -n 20000

started=()
stop_all() {
  # SIGINT: pollgate stops at once (SIGTERM would drain for grace_period).
  for p in "${started[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for p in "${started[@]}"; do wait "$p" 2>/dev/null || true; done
  started=()
}
trap stop_all EXIT
wait_port() { for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
# A free port below the ephemeral range (where 70 000 client connections
# come and go), whose cluster bus port (+10000) is free too.
free_port() {
  python3 - <<'PY'
import random, socket
while True:
    p = random.randint(20000, 22000)  # bus ports below the ephemeral range
    try:
        for q in (p, p + 10000):
            s = socket.socket(); s.bind(("127.0.0.1", q)); s.close()
        print(p); break
    except OSError:
        pass
PY
}

# Redis: one server, or a three-master cluster. Sets BROKER and REDIS_PIDS.
start_redis() {
  local port dir
  dir=$(mktemp -d "$OUT/redis.XXXX")
  BROKER=""; REDIS_PIDS=()
  case $1 in
    redis)
      port=$(free_port)
      redis-server --port "$port" --save '' --appendonly no --dir "$dir" >"$dir/log" 2>&1 &
      started+=($!); REDIS_PIDS=($!); wait_port "$port"
      BROKER="redis://127.0.0.1:$port/0" ;;
    cluster)
      local nodes=()
      for i in 1 2 3; do
        port=$(free_port); mkdir -p "$dir/$i"
        (cd "$dir/$i" && exec redis-server --port "$port" --save '' --appendonly no \
          --cluster-enabled yes --cluster-config-file nodes.conf >log 2>&1) &
        started+=($!); REDIS_PIDS+=($!); wait_port "$port"; nodes+=("127.0.0.1:$port")
      done
      redis-cli --cluster create "${nodes[@]}" --cluster-yes >/dev/null
      until redis-cli -p "${nodes[0]#*:}" cluster info | grep -q cluster_state:ok; do sleep 0.2; done
      BROKER="redis+cluster://$(IFS=,; echo "${nodes[*]}")" ;;
    *) BROKER="memory://" ;;
  esac
}

# K instances on $BROKER with THREADS threads. Sets SUBS, ADMINS, PG_PIDS.
start_fleet() {
  local k=$1 threads=$2 port admin
  SUBS=(); ADMINS=(); PG_PIDS=()
  for i in $(seq "$k"); do
    port=$(free_port); admin=$(free_port)
    FLEET_PORT=$port FLEET_ADMIN=$admin FLEET_THREADS=$threads FLEET_BROKER=$BROKER \
      "$BIN/pollgate" serve -c bench/conf/fleet.yaml --log-level warn 2>"$OUT/pollgate-$i.log" &
    started+=($!); PG_PIDS+=($!)
    wait_port "$port"; wait_port "$admin"
    until curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null; do sleep 0.1; done
    SUBS+=("127.0.0.1:$port"); ADMINS+=("127.0.0.1:$admin")
  done
}

rss_kib() { local t=0; for p in "$@"; do t=$((t + $(awk '/VmRSS/ {print $2}' "/proc/$p/status"))); done; echo "$t"; }

# One fleet: KIND (memory, redis, cluster, threads) and K.
measure() {
  local kind=$1 k=$2 threads=1 broker_kind=$1 label="$1 $2"
  local per_instance=$POLLS_PER_INSTANCE channels=$CHANNELS rate=$RATE
  [ "$kind" = threads ] && { threads=$k; k=1; broker_kind=memory; }
  # Redis's bill at a busy publish rate: the churn load of the issue
  # (1 000 polls per instance over 200 channels, 2 000 publishes a second).
  [ "$kind" = churn ] && { broker_kind=redis; per_instance=1000; channels=200; rate=${CHURN_RATE:-2000}; }
  start_redis "$broker_kind"
  start_fleet "$k" "$threads"
  local polls=$((per_instance * k)) rss0 run=$OUT/run-$kind-$k idle=0
  rss0=$(rss_kib "${PG_PIDS[@]}")
  # Redis's CPU while idle (its timers, a cluster's bus), over 5 s, to take
  # out of the CPU per publish.
  if [ ${#REDIS_PIDS[@]} -gt 0 ]; then
    idle=$(python3 - "${REDIS_PIDS[@]}" <<'PY'
import os, sys, time
def cpu(pids):
    t = 0
    for p in pids:
        f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        t += int(f[11]) + int(f[12])
    return t / os.sysconf("SC_CLK_TCK")
a = cpu(sys.argv[1:]); time.sleep(5); print((cpu(sys.argv[1:]) - a) / 5)
PY
)
  fi
  echo "== $label: $polls polls on $k instance(s), threads $threads, $BROKER" >&2
  local gens=() pids
  for g in $(seq 0 $((LOADGENS - 1))); do
    # Load generator 0 measures the gateways, 1 the Redis processes (the
    # same window): the others measure nothing of their own.
    pids="${PG_PIDS[*]}"
    [ "$g" = 1 ] && [ ${#REDIS_PIDS[@]} -gt 0 ] && pids="${REDIS_PIDS[*]}"
    # shellcheck disable=SC2086
    "$BIN/pollgate-bench" --server pollgate --scenario churn --label "$label" \
      --sub "${SUBS[@]}" --publish "${ADMINS[$((g % k))]}" \
      --subscribers $((polls / LOADGENS)) --channels $((channels / LOADGENS)) \
      --rate "$(python3 -c "print($rate / $LOADGENS)")" --duration "$DURATION" \
      --settle 5s --sources 4 --connect-rate 2500 --prefix "f${kind}${k}g${g}c" $(printf -- '--pid %s ' $pids) \
      >"$run-$g.json" 2>"$run-$g.log" &
    gens+=($!)
  done
  for g in "${gens[@]}"; do wait "$g"; done
  python3 - "$kind" "$k" "$threads" "$polls" "$rss0" "${#REDIS_PIDS[@]}" "$run" "$LOADGENS" "$idle" "$channels" "$rate" >>"$RESULTS.tmp" <<'PY'
import json, statistics, sys
kind, k, threads, polls, rss0, redis_n, run, gens, idle, channels, rate = sys.argv[1:]
idle = float(idle)
k, threads, polls, rss0, gens = int(k), int(threads), int(polls), int(rss0), int(gens)
runs = [json.load(open(f"{run}-{g}.json")) for g in range(gens)]
delivered = sum(r["delivered"] for r in runs)
published = sum(r["published"] for r in runs)
gw = runs[0]
out = {
    "fleet": kind, "instances": k, "threads": threads, "polls": polls,
    "channels": int(channels), "rate": float(rate),
    "published": published, "publish_errors": sum(r["publish_errors"] for r in runs),
    "delivered": delivered,
    "lost": sum(r["lost"] for r in runs), "duplicates": sum(r["duplicates"] for r in runs),
    "out_of_order": sum(r["out_of_order"] for r in runs), "errors": sum(r["errors"] for r in runs),
    "deliveries_per_sec": sum(r["deliveries_per_sec"] for r in runs),
    "gateway_cpu_us_per_delivery": 1e6 * gw["server_cpu_seconds"] / max(delivered, 1),
    "gateway_user_us_per_delivery": gw["server_user_us_per_delivery"] * gw["delivered"] / max(delivered, 1),
    "deliveries_per_core_second": delivered / max(gw["server_cpu_seconds"], 1e-9),
    "redis_cpu_us_per_publish": (1e6 * runs[1]["server_cpu_seconds"] / max(published, 1)) if int(redis_n) and gens > 1 else None,
    # The same without Redis's idle CPU over the measured window.
    "redis_net_cpu_us_per_publish": (1e6 * max(runs[1]["server_cpu_seconds"] - idle * runs[1]["seconds"], 0) / max(published, 1)) if int(redis_n) and gens > 1 else None,
    "redis_idle_cpu_percent": 100 * idle,
    "latency_ms": {
        "p50": statistics.median(r["latency_ms"]["p50"] for r in runs),
        "p99": max(r["latency_ms"]["p99"] for r in runs),
        "max": max(r["latency_ms"]["max"] for r in runs),
    },
    "rss_per_held_poll_bytes": round((gw["rss_after"] - 1024 * rss0) / polls),
    "client_cpu_percent": sum(r["client_cpu_percent"] for r in runs),
}
print(json.dumps(out))
PY
  tail -1 "$RESULTS.tmp" >&2
  stop_all
  sleep 2
}

for f in $FLEETS; do measure "${f%%:*}" "${f#*:}"; done
mv "$RESULTS.tmp" "$RESULTS"
python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| fleet | instances | threads | polls | publishes/s | Redis µs/publish (net of idle) | gateway µs/delivery | deliveries/core-s | p50 ms | p99 ms | max ms | RSS/poll KiB | lost | dup |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    redis = f'{r["redis_cpu_us_per_publish"]:.0f} ({r["redis_net_cpu_us_per_publish"]:.0f})' if r["redis_cpu_us_per_publish"] is not None else "–"
    l = r["latency_ms"]
    print(f'| {r["fleet"]} | {r["instances"]} | {r["threads"]} | {r["polls"]} | {r.get("rate", "")} | {redis} | {r["gateway_cpu_us_per_delivery"]:.1f} | {r["deliveries_per_core_second"]:.0f} | {l["p50"]:.2f} | {l["p99"]:.2f} | {l["max"]:.1f} | {r["rss_per_held_poll_bytes"]/1024:.1f} | {r["lost"]} | {r["duplicates"]} |')
PY
echo "written: $RESULTS" >&2

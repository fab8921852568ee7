#!/usr/bin/env bash
# TCP relay benchmark: bytes through a `tcp` listener, in one run, for Spur splicing (its
# default between plain sockets) and copying (SPUR_TCP_SPLICE=0), and HAProxy in TCP mode
# copying (its default) and splicing (`option splice-auto`):
#   - bulk: one iperf3 stream, each direction (upload: client to server; download: -R),
#     Gbit/s and the proxy's CPU milliseconds per GiB moved;
#   - small exchanges: wrk -c50 HTTP/1.1 keep-alive GETs of a 100-byte body, relayed as
#     opaque bytes to an nginx origin: req/s and the proxy's CPU µs per request.
# The proxy runs alone on one core (the last allowed CPU), the clients and the servers on
# another; one worker per proxy; access logs off. The targets take turns, ROUNDS rounds of
# DURATION seconds, and each cell is its median round. CPU is /proc's utime+stime.
# Everything listens on 127.0.0.1 only; every run is bounded in time.
# --before PATH adds the row spur-before: another Spur binary (splicing as it does by default).
# Usage: benches/tcp.sh [--spur-bin PATH] [--before PATH] [--duration S] [--rounds N]
#   [--loads upload,download,small]
set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=lib/common.sh
source "$SCRIPT_DIR/lib/common.sh"
# shellcheck source=lib/targets.sh
source "$SCRIPT_DIR/lib/targets.sh"

DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
SPUR_BIN=${SPUR_BIN:-$REPO_ROOT/target/release/spur}
BEFORE_BIN=${BEFORE_BIN:-}
LOADS=${LOADS:-upload,download,small}
RESULTS_DIR=${RESULTS_DIR:-$SCRIPT_DIR/results}
PROXY_WORKERS=1
USE_PERF=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --spur-bin) SPUR_BIN=$2; shift ;;
    --before) BEFORE_BIN=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    --loads) LOADS=$2; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
  shift
done
[[ -x $SPUR_BIN ]] || die "Spur binary not found at $SPUR_BIN (cargo build --release, or --spur-bin)"
for c in iperf3 wrk curl python3 taskset; do
  command -v "$c" >/dev/null || die "$c not found (apt-get install iperf3 wrk curl python3 util-linux)"
done
[[ -x $HAPROXY_BIN && -x $NGINX_BIN ]] || die "needs haproxy and nginx (apt-get install haproxy nginx)"

read -r -a ALLOWED <<<"$(allowed_cpus)"
[[ ${#ALLOWED[@]} -ge 2 ]] || die "needs 2 CPUs: the proxy on one, the load on another"
PROXY_CPUS=${ALLOWED[-1]}
LOAD_CPUS=${ALLOWED[0]}
ON_PROXY_CPUS=(taskset -c "$PROXY_CPUS")
ON_LOAD_CPUS=(taskset -c "$LOAD_CPUS")

RUN_DIR="$RESULTS_DIR/tcp-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RUN_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/spur-tcp-bench.XXXXXX")
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
cp -p "$SPUR_BIN" "$WORK/spur"
if [[ -n $BEFORE_BIN ]]; then
  [[ -x $BEFORE_BIN ]] || die "no Spur binary at $BEFORE_BIN"
  cp -p "$BEFORE_BIN" "$WORK/spur-before"
fi

start_origin
free_port IPERF_PORT
start_proc iperf-server "${ON_LOAD_CPUS[@]}" iperf3 -s -p "$IPERF_PORT"
sleep 0.5

# start NAME : the proxy NAME with a `bulk` listener (to iperf3) and a `small` one (to nginx);
# sets PID, BULK and SMALL (their ports).
start() {
  local name=$1 admin
  free_port BULK; free_port SMALL; free_port admin
  case $name in
    spur-*)
      printf '%s\n' "workers: 1" "admin: { listen: 127.0.0.1:$admin }" "listeners:" \
        "  - { name: bulk, listen: 127.0.0.1:$BULK, protocol: tcp, cluster: iperf }" \
        "  - { name: small, listen: 127.0.0.1:$SMALL, protocol: tcp, cluster: web }" "clusters:" \
        "  - { name: iperf, endpoints: [\"127.0.0.1:$IPERF_PORT\"] }" \
        "  - { name: web, endpoints: [\"127.0.0.1:$ORIGIN_PORT\"] }" >"$RUN_DIR/$name.yaml"
      local splice=1 bin=$WORK/spur
      [[ $name == spur-copy ]] && splice=0
      [[ $name == spur-before ]] && bin=$WORK/spur-before
      start_proc "$name" "${ON_PROXY_CPUS[@]}" env -u RUST_LOG SPUR_LOG=info,spur::access=off \
        TOKIO_WORKER_THREADS=1 SPUR_TCP_SPLICE=$splice "$bin" proxy --config "$RUN_DIR/$name.yaml"
      ;;
    haproxy-*)
      local splice=""
      [[ $name == haproxy-splice ]] && splice="    option splice-auto"
      printf '%s\n' "global" "    nbthread 1" "    maxconn 4096" "defaults" "    mode tcp" \
        "    timeout connect 5s" "    timeout client 60s" "    timeout server 60s" "$splice" \
        "frontend bulk" "    bind 127.0.0.1:$BULK" "    default_backend iperf" \
        "frontend small" "    bind 127.0.0.1:$SMALL" "    default_backend web" \
        "backend iperf" "    server s1 127.0.0.1:$IPERF_PORT" \
        "backend web" "    server s1 127.0.0.1:$ORIGIN_PORT" >"$RUN_DIR/$name.cfg"
      start_proc "$name" "${ON_PROXY_CPUS[@]}" "$HAPROXY_BIN" -db -f "$RUN_DIR/$name.cfg"
      ;;
  esac
  PID=$LAST_PID
  wait_ok "$name" "http://127.0.0.1:$SMALL/" "$PID" || die "$name did not start (see $RUN_DIR/$name.*)"
}

# bulk OUT PORT [-R] -> "Gbit/s bytes", one iperf3 stream of DURATION s
bulk() {
  local out=$1 port=$2; shift 2
  run_fg "${ON_LOAD_CPUS[@]}" timeout --kill-after=5 $((DURATION + 30)) \
    iperf3 -c 127.0.0.1 -p "$port" -t "$DURATION" -J "$@" >"$out" 2>&1 || warn "iperf3 failed ($out)"
  python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["end"]["sum_received"]
print("%.2f %d" % (e["bits_per_second"] / 1e9, e["bytes"]))' "$out" 2>/dev/null || echo "- 0"
}

TARGETS=(spur-splice spur-copy haproxy-copy haproxy-splice)
[[ -n $BEFORE_BIN ]] && TARGETS=(spur-before "${TARGETS[@]}")
declare -A PIDS=() BULKP=() SMALLP=() CELLS=()
for t in "${TARGETS[@]}"; do
  start "$t"; PIDS[$t]=$PID; BULKP[$t]=$BULK; SMALLP[$t]=$SMALL
  run_wrk "$WORK/warmup.txt" "$LOAD_CPUS" 50 1 "http://127.0.0.1:$SMALL/"
done

for ((r = 1; r <= ROUNDS; r++)); do
  order=("${TARGETS[@]}")
  if ((r % 2 == 0)); then order=(); for ((i = ${#TARGETS[@]} - 1; i >= 0; i--)); do order+=("${TARGETS[$i]}"); done; fi
  log "round $r of $ROUNDS (${order[*]})"
  for t in "${order[@]}"; do
    for load in ${LOADS//,/ }; do
      out="$RUN_DIR/$t.$load.r$r"
      counters_start "${PIDS[$t]}"
      case $load in
        upload) read -r rate n < <(bulk "$out.json" "${BULKP[$t]}") ;;
        download) read -r rate n < <(bulk "$out.json" "${BULKP[$t]}" -R) ;;
        small)
          run_wrk "$out.txt" "$LOAD_CPUS" 50 "$DURATION" "http://127.0.0.1:${SMALLP[$t]}/"
          read -r rate n _ < <(parse_wrk "$out.txt") ;;
      esac
      counters_stop
      if [[ $load == small ]]; then
        cost=$(per_req "$C_PROC_US" "$n" 1)
        CELLS[$t|$load]+="$(awk -v v="$rate" 'BEGIN { printf "%.1f", v / 1000 }')k $cost µs/req;"
      else
        cost=$(awk -v us="$C_PROC_US" -v b="$n" 'BEGIN { if (b > 0) printf "%.0f", us / 1000 / (b / 2^30); else print "-" }')
        CELLS[$t|$load]+="$rate $cost ms/GiB;"
      fi
      log "$t $load: $rate, $cost"
    done
  done
done

# median of the rounds by their CPU cost (second field)
median() {
  tr ';' '\n' <<<"$1" | awk 'NF' | sort -t' ' -k2,2n | awk '{ a[NR] = $0 } END { print a[int((NR + 1) / 2)] }'
}
{
  echo "# TCP relay, $(date -u '+%Y-%m-%d %H:%M UTC'), $ROUNDS rounds of ${DURATION}s, median round"
  echo
  echo "Spur: \`$SPUR_BIN\`${BEFORE_BIN:+; spur-before: \`$BEFORE_BIN\`}; $("$HAPROXY_BIN" -v | head -1)"
  echo
  head="| target" rule="|---"
  for load in ${LOADS//,/ }; do
    case $load in
      small) head+=" | small exchanges req/s · CPU µs/req" ;;
      *) head+=" | $load Gbit/s · CPU ms/GiB" ;;
    esac
    rule+="|---:"
  done
  echo "$head |"
  echo "$rule|"
  for t in "${TARGETS[@]}"; do
    row="| $t"
    for load in ${LOADS//,/ }; do
      row+=" | $(median "${CELLS[$t|$load]}" | sed 's/ / · /')"
    done
    echo "$row |"
  done
  echo
  echo "Every round (rate cost;...):"
  for t in "${TARGETS[@]}"; do
    for load in ${LOADS//,/ }; do echo "- $t $load: ${CELLS[$t|$load]}"; done
  done
} | tee "$RUN_DIR/report.md"
for t in "${TARGETS[@]}"; do stop_proc "${PIDS[$t]}"; done

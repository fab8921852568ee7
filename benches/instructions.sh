#!/usr/bin/env bash
# User-space instructions per request of Spur binaries, counted by callgrind: a measure that
# does not depend on what else the machine runs (benches/run.sh's CPU time does), for
# comparing two builds of the request path on a busy machine. For each binary: two runs
# under valgrind, N1 and N2 requests from h2load (HTTP/1.1 with --h1, or h2c with several
# streams per connection) to one HTTP listener in front of run.sh's nginx origin; the
# instructions of the difference divided by N2 - N1, so start-up and shutdown cancel out.
# Instructions are not time: cache misses, system calls and the kernel's share are not in
# them. 127.0.0.1 only; every run is bounded in time.
# --keep DIR keeps callgrind's output files there, to read with callgrind_annotate.
# CALLGRIND_ARGS adds options to callgrind's (for Spur and HAProxy alike), e.g.
# "--dump-instr=yes" to tell the call sites of a function apart (its callers' instruction
# addresses, for addr2line -i on a build with line tables:
# CARGO_PROFILE_RELEASE_DEBUG=line-tables-only), or "--cache-sim=yes" to count simulated
# cache misses as well (in the kept files; the printed figure stays instructions).
# `haproxy` in place of a binary counts HAProxy (nbthread 1, log off, the config run.sh
# gives it) the same way, except that its counters are zeroed after warm-up and dumped after
# N2 - N1 requests (it leaves callgrind no output when it exits).
# --log on counts Spur with its access log on (one line per request to a file; HAProxy
# keeps its log off).
# --hop mtls|mtls-h2|h3 counts run.sh's mesh hop of that name instead of one listener: the
# client's listener forwards over mutual TLS (HTTP/1.1, HTTP/2, or HTTP/3 over QUIC) to a
# second listener in the same process, which forwards to the origin; the count covers both.
# Usage: benches/instructions.sh [--protocol h1|h2] [--log off|on] [--hop HOP] [--keep DIR] BIN|haproxy [...]
set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/common.sh
source "$SCRIPT_DIR/lib/common.sh"
# shellcheck source=lib/targets.sh
source "$SCRIPT_DIR/lib/targets.sh"

PROTO=h1
KEEP=
read -ra cg_args <<<"${CALLGRIND_ARGS:-}"
LOG=off
HOP=
N1=${N1:-1000}
N2=${N2:-6000}
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --protocol) PROTO=${2:?}; shift 2 ;;
    --keep) KEEP=${2:?}; mkdir -p "$KEEP"; shift 2 ;;
    --log) LOG=${2:?}; shift 2 ;;
    --hop) HOP=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ $# -ge 1 ]] || die "give at least one Spur binary (see --help)"
case $PROTO in h1|h2) ;; *) die "--protocol must be h1 or h2" ;; esac
HOP_NAME=$HOP
case $HOP in '') ;; mtls) HOP=http1 ;; mtls-h2) HOP=http2 ;; h3) HOP=http3 ;;
  *) die "--hop must be mtls, mtls-h2 or h3" ;; esac
case $LOG in off) LOG_FILTER=warn ;; on) LOG_FILTER=info ;; *) die "--log must be off or on" ;; esac
for tool in valgrind h2load curl; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install -y valgrind nghttp2-client curl)"
done
[[ -x $NGINX_BIN ]] || die "nginx is missing (apt-get install -y nginx)"

# shellcheck disable=SC2034  # used by targets.sh
ON_LOAD_CPUS=()
# shellcheck disable=SC2034  # used by targets.sh (HAProxy's nbthread)
PROXY_WORKERS=1
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/spur-instructions.XXXXXX")
WORK=$RUN_DIR
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
start_origin
if [[ -n $HOP ]]; then
  command -v openssl >/dev/null || die "openssl is missing (apt-get install -y openssl)"
  make_mesh_certs "$RUN_DIR/certs"
fi

# instructions BIN N : total instructions callgrind counted for one run serving N requests.
instructions() {
  local bin=$1 n=$2 port out pid sub=(proxy)
  # The data plane's own binary (spur-proxy, quicker to build) takes no subcommand.
  [[ $(basename "$bin") == spur-proxy* ]] && sub=()
  free_port port
  out=$RUN_DIR/callgrind.$n.out
  if [[ -n $HOP ]]; then
    local admin inport
    free_port admin
    free_port inport
    write_spur_mesh_conf "$RUN_DIR/spur.yaml" "$port" "$admin" "$inport" "$RUN_DIR/certs" "$HOP" "$bin"
  else
    cat >"$RUN_DIR/spur.yaml" <<EOF
listeners:
  - { name: bench, listen: "127.0.0.1:$port", cluster: origin }
clusters:
  - { name: origin, endpoints: ["127.0.0.1:$ORIGIN_PORT"] }
EOF
  fi
  TOKIO_WORKER_THREADS=1 SPUR_LOG=$LOG_FILTER timeout --kill-after=5 600 \
    valgrind --tool=callgrind "${cg_args[@]}" --callgrind-out-file="$out" "$bin" "${sub[@]}" --config "$RUN_DIR/spur.yaml" \
    >"$RUN_DIR/spur.stdout.log" 2>&1 &
  pid=$!
  wait_ok spur "http://127.0.0.1:$port/" "$pid" h1 300 || die "Spur under valgrind did not start"
  load "http://127.0.0.1:$port/" "$n"
  kill -INT "$pid"
  wait "$pid" || true
  awk '/^(summary|totals):/ {print $2; exit}' "$out"
  if [[ -n $KEEP ]]; then cp "$out" "$KEEP/$(basename "$bin").$PROTO.$n.callgrind"; fi
}

# load URL N : N requests from h2load, every one answered.
load() {
  if [[ $PROTO == h2 ]]; then
    timeout 300 h2load -n "$2" -c 10 -m 10 "$1" >"$RUN_DIR/load.txt" 2>&1
  else
    timeout 300 h2load --h1 -n "$2" -c 10 "$1" >"$RUN_DIR/load.txt" 2>&1
  fi
  grep -q " 0 failed, 0 errored" "$RUN_DIR/load.txt" || { cat "$RUN_DIR/load.txt" >&2; die "requests failed"; }
}

# haproxy_per_request : HAProxy's instructions per request (N2 - N1 requests counted).
haproxy_per_request() {
  local port h2port out pid vpid i url total
  command -v callgrind_control >/dev/null || die "callgrind_control is missing (apt-get install -y valgrind)"
  free_port port
  free_port h2port
  write_haproxy_conf "$RUN_DIR/haproxy.cfg" "$port" "$h2port" off
  out=$RUN_DIR/callgrind.haproxy.out
  timeout --kill-after=5 600 valgrind --tool=callgrind "${cg_args[@]}" --callgrind-out-file="$out" \
    "$HAPROXY_BIN" -db -f "$RUN_DIR/haproxy.cfg" >"$RUN_DIR/haproxy.stdout.log" 2>&1 &
  pid=$!
  wait_ok haproxy "http://127.0.0.1:$port/" "$pid" h1 300 || die "HAProxy under valgrind did not start"
  url="http://127.0.0.1:$port/"
  [[ $PROTO == h2 ]] && url="http://127.0.0.1:$h2port/"
  load "$url" "$N1"
  vpid=$(pgrep -P "$pid" | head -1)   # valgrind, under timeout
  [[ -n $vpid ]] || die "HAProxy under valgrind is not running"
  callgrind_control -z "$vpid" >/dev/null 2>&1
  load "$url" $((N2 - N1))
  callgrind_control -d "$vpid" >/dev/null 2>&1
  for ((i = 0; i < 100; i++)); do
    total=$(awk '/^(summary|totals):/ {print $2; exit}' "$out".* 2>/dev/null || true)
    [[ -n $total ]] && break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  [[ -n $total ]] || die "no callgrind dump from HAProxy"
  if [[ -n $KEEP ]]; then cp "$out".* "$KEEP/haproxy.$PROTO.callgrind"; fi
  rm -f "$out".*
  echo $((total / (N2 - N1)))
}

for bin in "$@"; do
  if [[ $bin == haproxy ]]; then
    [[ -z $HOP ]] || die "--hop counts Spur's mesh hops; HAProxy has none here"
    [[ -x $HAPROXY_BIN ]] || die "haproxy is missing (apt-get install -y haproxy)"
    # An assignment, so that a failure ends the script instead of printing 0.
    n=$(haproxy_per_request)
    printf 'haproxy %s: %d instructions per request (user space)\n' "$PROTO" "$n"
    continue
  fi
  [[ -x $bin ]] || die "not an executable: $bin"
  a=$(instructions "$bin" "$N1")
  b=$(instructions "$bin" "$N2")
  printf '%s %s%s: %d instructions per request (user space)\n' "$bin" "$PROTO" "${HOP_NAME:+ through the $HOP_NAME mesh hop}" \
    $(((b - a) / (N2 - N1)))
done

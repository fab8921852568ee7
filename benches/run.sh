#!/usr/bin/env bash
# Spur load benchmark: the same HTTP/1.1 GET traffic sent
#   direct    -> origin (nginx, fixed 100-byte body)
#   spur      -> origin   (target/release/spur proxy --config <generated yaml>)
#   spur-mtls -> Spur listener -> mTLS -> Spur TLS listener -> origin (both hops in one
#                Spur process; certificates made with openssl), plus a full-handshake rate
#   spur-mtls-h2 -> the same two hops with HTTP/2 over mTLS between them
#   spur-h3   -> the same two hops with HTTP/3 over QUIC + mTLS between them
#   spur-2hop -> the same two hops in plaintext (optional: the baseline for mTLS's cost)
#   haproxy   -> origin
#   nginx     -> origin   (second nginx as reverse proxy, upstream keepalive)
# measured with wrk: max throughput, low-concurrency latency, CPU time per
# request and peak memory of the proxy process(es).
#
# Usage: benches/run.sh [--build] [--duration 10] [--targets direct,spur,spur-mtls,haproxy,nginx] ...
#        benches/run.sh --help
# Everything listens on 127.0.0.1 only. See benches/README.md.
set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

# ----------------------------------------------------------------- settings --
# Every setting can come from the environment or from a flag below.
DURATION=${DURATION:-10}            # throughput run per target, seconds
LAT_DURATION=${LAT_DURATION:-5}     # 1-connection latency run per target, seconds
WARMUP=${WARMUP:-2}                 # warm-up run before the measured ones, seconds (0 = none)
CONNECTIONS=${CONNECTIONS:-64}      # wrk connections for the throughput run
THREADS=${THREADS:-2}               # wrk threads for the throughput run
TARGETS=${TARGETS:-direct,spur,spur-mtls,spur-mtls-h2,spur-h3,haproxy,nginx}
HS_DURATION=${HS_DURATION:-3}       # spur-mtls: full-handshake run with openssl s_time, seconds (0 = none)
PIN=${PIN:-1}                       # 1 = pin with taskset (see README), 0 = no pinning
PROXY_CPUS=${PROXY_CPUS:-}          # CPU list for the proxy under test (default: last allowed CPU)
LOAD_CPUS=${LOAD_CPUS:-}            # CPU list for wrk + origin (default: the other CPUs)
PROXY_WORKERS=${PROXY_WORKERS:-}    # worker threads/processes for every proxy (default: #PROXY_CPUS)
LAT_PIN=${LAT_PIN:-same}            # latency run: "same" = wrk, proxy and origin on one CPU; "split" = as above
ACCESS_LOG=${ACCESS_LOG:-1}         # 1 = every proxy writes one access-log line per request to a file
KEEP_LOGS=${KEEP_LOGS:-0}           # 1 = keep full access logs (they can be hundreds of MB)
SPUR_BIN=${SPUR_BIN:-$REPO_ROOT/target/release/spur}
RESULTS_DIR=${RESULTS_DIR:-$SCRIPT_DIR/results}
BUILD=0
INSTALL=${INSTALL:-1}

usage() {
  cat <<EOF
Usage: benches/run.sh [options]

Compares direct traffic to an nginx origin with traffic through Spur, HAProxy
and nginx (reverse proxy). Prints a Markdown table and writes it to
benches/results/latest.md; raw wrk output, configs and logs go to
benches/results/run-<timestamp>/.

Options (environment variable in brackets):
  --build                 run 'cargo build --release --bin spur' first (also done when
                          target/release/spur is missing)
  --duration N            throughput run per target, seconds [DURATION=$DURATION]
  --latency-duration N    1-connection latency run per target, seconds [LAT_DURATION=$LAT_DURATION]
  --warmup N              warm-up per target, seconds, 0 = none [WARMUP=$WARMUP]
  --connections N         wrk connections for the throughput run [CONNECTIONS=$CONNECTIONS]
  --threads N             wrk threads for the throughput run [THREADS=$THREADS]
  --targets LIST          comma-separated subset of direct,spur,spur-mtls,spur-mtls-h2,spur-h3,
                          spur-2hop,haproxy,nginx
                          [TARGETS=$TARGETS]
  --handshake-duration N  spur-mtls: full mTLS handshakes with openssl s_time, seconds, 0 = none
                          [HS_DURATION=$HS_DURATION]
  --proxy-cpus LIST       taskset CPU list for the proxy [PROXY_CPUS, default: last allowed CPU]
  --load-cpus LIST        taskset CPU list for wrk and the origin [LOAD_CPUS, default: the rest]
  --workers N             worker threads/processes for every proxy [PROXY_WORKERS, default: #proxy CPUs]
  --no-pin                do not use taskset [PIN=0]
  --latency-pin same|split
                          1-connection run with wrk, proxy and origin all on one CPU ("same",
                          default: no cross-CPU wake-ups) or placed as for throughput [LAT_PIN]
  --no-access-log         proxies write no access log (Spur always logs to stderr) [ACCESS_LOG=0]
  --keep-logs             keep the full access logs [KEEP_LOGS=1]
  --no-install            never run apt-get [INSTALL=0]
  --spur-bin PATH         Spur binary [SPUR_BIN=target/release/spur]
  -h, --help              this text
EOF
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --build) BUILD=1 ;;
    --duration) DURATION=${2:?}; shift ;;
    --latency-duration) LAT_DURATION=${2:?}; shift ;;
    --warmup) WARMUP=${2:?}; shift ;;
    --connections) CONNECTIONS=${2:?}; shift ;;
    --threads) THREADS=${2:?}; shift ;;
    --targets) TARGETS=${2:?}; shift ;;
    --handshake-duration) HS_DURATION=${2:?}; shift ;;
    --proxy-cpus) PROXY_CPUS=${2:?}; shift ;;
    --load-cpus) LOAD_CPUS=${2:?}; shift ;;
    --workers) PROXY_WORKERS=${2:?}; shift ;;
    --no-pin) PIN=0 ;;
    --latency-pin) LAT_PIN=${2:?}; shift ;;
    --no-access-log) ACCESS_LOG=0 ;;
    --keep-logs) KEEP_LOGS=1 ;;
    --no-install) INSTALL=0 ;;
    --spur-bin) SPUR_BIN=${2:?}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

log()  { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
warn() { printf '[bench %s] WARNING: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die()  { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

# "10", "10s" or "1m" -> whole seconds
to_secs() {
  local v=$1
  case $v in
    *m) v=${v%m}; [[ $v =~ ^[0-9]+$ ]] || die "bad duration '$1'"; echo $((v * 60)) ;;
    *s) v=${v%s}; [[ $v =~ ^[0-9]+$ ]] || die "bad duration '$1'"; echo "$v" ;;
    *)  [[ $v =~ ^[0-9]+$ ]] || die "bad duration '$1'"; echo "$v" ;;
  esac
}
DURATION=$(to_secs "$DURATION")
LAT_DURATION=$(to_secs "$LAT_DURATION")
WARMUP=$(to_secs "$WARMUP")
[[ $DURATION -ge 1 && $LAT_DURATION -ge 1 ]] || die "durations must be at least 1s"
[[ $CONNECTIONS =~ ^[0-9]+$ && $THREADS =~ ^[0-9]+$ && $CONNECTIONS -ge $THREADS && $THREADS -ge 1 ]] \
  || die "need 1 <= --threads <= --connections"

[[ $LAT_PIN == same || $LAT_PIN == split ]] || die "--latency-pin must be 'same' or 'split'"
IFS=, read -r -a TARGET_LIST <<<"$TARGETS"
for t in "${TARGET_LIST[@]}"; do
  case $t in direct|spur|spur-mtls|spur-mtls-h2|spur-h3|spur-2hop|haproxy|nginx) ;;
    *) die "unknown target '$t' (direct, spur, spur-mtls, spur-mtls-h2, spur-h3, spur-2hop, haproxy, nginx)" ;; esac
done
want() { [[ ",$TARGETS," == *",$1,"* ]]; }

# ------------------------------------------------------------ dependencies --
SUDO=()
[[ $(id -u) -eq 0 ]] || SUDO=(sudo)
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY_BIN=$(command -v haproxy || echo /usr/sbin/haproxy)

missing=()
command -v wrk >/dev/null || missing+=(wrk)
[[ -x $NGINX_BIN ]] || missing+=(nginx)          # the origin is always nginx
if want haproxy && [[ ! -x $HAPROXY_BIN ]]; then missing+=(haproxy); fi
command -v curl >/dev/null || missing+=(curl)
if { want spur-mtls || want spur-mtls-h2 || want spur-h3; } && ! command -v openssl >/dev/null; then missing+=(openssl); fi
command -v pgrep >/dev/null || missing+=(procps)
command -v taskset >/dev/null || missing+=(util-linux)
if [[ ${#missing[@]} -gt 0 ]]; then
  [[ $INSTALL == 1 ]] || die "missing packages: ${missing[*]} (run: apt-get install -y ${missing[*]})"
  log "installing: ${missing[*]}"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
    || die "apt-get update failed"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
  NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
  HAPROXY_BIN=$(command -v haproxy || echo /usr/sbin/haproxy)
fi

if want spur || want spur-mtls || want spur-mtls-h2 || want spur-h3 || want spur-2hop; then
  if [[ $BUILD == 1 || ! -x $SPUR_BIN ]]; then
    command -v cargo >/dev/null || die "cargo not found; cannot build $SPUR_BIN"
    log "building Spur: cargo build --release --bin spur"
    (cd "$REPO_ROOT" && cargo build --release --bin spur) || die "cargo build failed"
  fi
  [[ -x $SPUR_BIN ]] || die "Spur binary not found at $SPUR_BIN"
fi

# ------------------------------------------------------------- CPU pinning --
expand_cpus() {   # "0-2,5" -> "0 1 2 5"
  local part a b i parts=() cpus=()
  IFS=, read -r -a parts <<<"$1"
  for part in "${parts[@]}"; do
    if [[ $part == *-* ]]; then
      a=${part%-*}; b=${part#*-}
      for ((i = a; i <= b; i++)); do cpus+=("$i"); done
    elif [[ -n $part ]]; then
      cpus+=("$part")
    fi
  done
  echo "${cpus[*]}"
}
join_by_comma() { local IFS=,; echo "$*"; }

read -r -a ALLOWED <<<"$(expand_cpus "$(awk '/^Cpus_allowed_list/ {print $2}' /proc/self/status)")"
[[ ${#ALLOWED[@]} -gt 0 ]] || ALLOWED=(0)
PIN_NOTE=""
if [[ $PIN == 1 && ${#ALLOWED[@]} -ge 2 ]]; then
  [[ -n $PROXY_CPUS ]] || PROXY_CPUS=${ALLOWED[-1]}
  [[ -n $LOAD_CPUS ]] || LOAD_CPUS=$(join_by_comma "${ALLOWED[@]:0:${#ALLOWED[@]}-1}")
  read -r -a _lc <<<"$(expand_cpus "$LOAD_CPUS")"
  LAT_CPU=${_lc[0]}
  PIN_NOTE="throughput: proxy on CPU(s) $PROXY_CPUS, wrk and origin on CPU(s) $LOAD_CPUS"
  if [[ $LAT_PIN == same ]]; then
    PIN_NOTE+="; latency: wrk, proxy and origin all on CPU $LAT_CPU"
  else
    PIN_NOTE+="; latency: same placement"
  fi
else
  [[ $PIN == 1 ]] && warn "only ${#ALLOWED[@]} CPU allowed: not pinning"
  PIN=0
  PIN_NOTE="no CPU pinning"
fi
if [[ -z $PROXY_WORKERS ]]; then
  if [[ $PIN == 1 ]]; then
    read -r -a _pc <<<"$(expand_cpus "$PROXY_CPUS")"
    PROXY_WORKERS=${#_pc[@]}
  else
    PROXY_WORKERS=1
  fi
fi
[[ $PROXY_WORKERS =~ ^[1-9][0-9]*$ ]] || die "bad --workers '$PROXY_WORKERS'"
# Command prefixes (arrays, so that a backgrounded command's $! is the real process:
# taskset and env exec the program in place).
ON_PROXY_CPUS=(); ON_LOAD_CPUS=()
if [[ $PIN == 1 ]]; then
  ON_PROXY_CPUS=(taskset -c "$PROXY_CPUS")
  ON_LOAD_CPUS=(taskset -c "$LOAD_CPUS")
fi

# ------------------------------------------------------------- run dir, ports --
mkdir -p "$RESULTS_DIR"
RUN_DIR="$RESULTS_DIR/run-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RUN_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/spur-bench.XXXXXX")

declare -A USED_PORTS=()
# free_port VAR: a port nobody listens on, below the usual ephemeral range.
free_port() {
  local p i
  for ((i = 0; i < 500; i++)); do
    p=$((20000 + RANDOM % 12000))
    [[ -n ${USED_PORTS[$p]:-} ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      USED_PORTS[$p]=1
      printf -v "$1" '%s' "$p"
      return 0
    fi
  done
  die "no free port found"
}

# -------------------------------------------------------- process handling --
ALL_PIDS=()
LAST_PID=
WRK_PID=
# start_proc NAME CMD... : background process, stdout/stderr into the run dir.
start_proc() {
  local name=$1; shift
  "$@" >"$RUN_DIR/$name.stdout.log" 2>"$RUN_DIR/$name.stderr.log" &
  LAST_PID=$!
  ALL_PIDS+=("$LAST_PID")
}
# The process and its direct children (nginx master + workers).
proc_tree() {
  local pid=$1
  kill -0 "$pid" 2>/dev/null || return 0
  echo "$pid"
  pgrep -P "$pid" 2>/dev/null || true
}
stop_proc() {
  local pid=$1 kids i
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kids=$(pgrep -P "$pid" 2>/dev/null || true)
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  for k in $kids; do kill -KILL "$k" 2>/dev/null || true; done
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n ${WRK_PID:-} ]]; then stop_proc "$WRK_PID"; fi
  for pid in "${ALL_PIDS[@]}"; do stop_proc "$pid"; done
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_ok NAME URL PID : until URL answers 200 with the origin's body (max 15s).
wait_ok() {
  local name=$1 url=$2 pid=$3 i code
  for ((i = 0; i < 150; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      warn "$name exited during start-up; last lines of its logs:"
      tail -n 20 "$RUN_DIR/$name".std*.log >&2 || true
      return 1
    fi
    code=$(curl --noproxy '*' -s -m 1 -o "$WORK/probe.body" -w '%{http_code}' "$url" 2>/dev/null || true)
    if [[ $code == 200 ]] && cmp -s "$WORK/probe.body" "$WORK/expected.body"; then
      return 0
    fi
    sleep 0.1
  done
  warn "$name did not answer 200 with the origin body at $url within 15s (last status: ${code:-none})"
  return 1
}

# ------------------------------------------------------------------ /proc --
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() {   # sum of utime+stime (clock ticks) over the PIDs given
  local total=0 pid line rest fields=()
  for pid in "$@"; do
    line=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
    rest=${line##*) }            # fields after "(comm)": state is index 0
    read -r -a fields <<<"$rest"
    total=$((total + fields[11] + fields[12]))   # fields 14 (utime) and 15 (stime)
  done
  echo "$total"
}
mem_kib() {     # mem_kib FIELD PIDS... : sum of /proc/PID/status FIELD (kB)
  local field=$1 total=0 pid v; shift
  for pid in "$@"; do
    v=$(awk -v f="$field:" '$1 == f {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}
pss_kib() {
  local total=0 pid v
  for pid in "$@"; do
    v=$(awk '$1 == "Pss:" {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || true)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# repin CPU-LIST PID : move a process, its threads and its child processes to CPU-LIST.
repin() {
  local cpu_list=$1 p
  for p in $(proc_tree "$2"); do
    taskset -a -p -c "$cpu_list" "$p" >/dev/null 2>&1 || warn "taskset -a -p -c $cpu_list $p failed"
  done
}

# -------------------------------------------------------------------- wrk --
# run_wrk OUTFILE THREADS CONNECTIONS SECONDS URL [CPU-LIST]
# wrk runs on the load CPUs, or on CPU-LIST when given (and pinning is on).
run_wrk() {
  local out=$1 t=$2 c=$3 d=$4 url=$5 prefix=("${ON_LOAD_CPUS[@]}")
  if [[ $PIN == 1 && -n ${6:-} ]]; then prefix=(taskset -c "$6"); fi
  # in the background + wait, so that a signal to this script is handled at once
  "${prefix[@]}" timeout --kill-after=5 $((d + 30)) \
    wrk -t"$t" -c"$c" -d"${d}s" --timeout 5s --latency "$url" >"$out" 2>&1 &
  WRK_PID=$!
  wait "$WRK_PID" || warn "wrk exited non-zero ($out)"
  WRK_PID=
}
# parse_wrk FILE -> "rps requests errors non2xx p50_us p99_us" (latencies in µs, "-" if absent)
# wrk prints times as e.g. 850.00us, 1.23ms, 1.02s, 1.50m, 1.00h.
parse_wrk() {
  awk '
    function us(v,   n, u) {
      n = v; sub(/[a-zA-Z]+$/, "", n)
      u = v; sub(/^[0-9.]+/, "", u)
      if (u == "us") return n + 0
      if (u == "ms") return n * 1000
      if (u == "s")  return n * 1000000
      if (u == "m")  return n * 60000000
      if (u == "h")  return n * 3600000000
      return n + 0
    }
    BEGIN { rps = "-"; reqs = 0; errs = 0; non2xx = 0; p50 = "-"; p99 = "-" }
    $1 == "Requests/sec:" { rps = $2 }
    $2 == "requests" && $3 == "in" { reqs = $1 }
    $1 == "50%" { p50 = us($2) }
    $1 == "99%" { p99 = us($2) }
    /^ *Socket errors:/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) { x = $i; sub(/,/, "", x); errs += x } }
    /^ *Non-2xx or 3xx responses:/ { non2xx = $NF }
    END { printf "%s %s %s %s %s %s\n", rps, reqs, errs, non2xx, p50, p99 }
  ' "$1"
}

# ---------------------------------------------------------------- configs --
BODY_TEXT="spur bench origin: a fixed 100-byte body served by nginx return 200, keep-alive on, for wrk."
# pad/cut to 99 chars + "\n" = 100 bytes
BODY_TEXT=$(printf '%-99.99s' "$BODY_TEXT")
printf '%s\n' "$BODY_TEXT" >"$WORK/expected.body"

write_origin_conf() {   # DIR PORT
  local dir=$1 port=$2
  mkdir -p "$dir/tmp"
  cat >"$dir/nginx.conf" <<EOF
# origin: fixed 100-byte 200 response, HTTP/1.1 keep-alive
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $RUN_DIR/origin.error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    server_tokens off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / {
            default_type text/plain;
            return 200 "$BODY_TEXT\n";
        }
    }
}
EOF
}

write_nginx_proxy_conf() {   # DIR PORT ORIGIN_PORT
  local dir=$1 port=$2 oport=$3 alog=off
  [[ $ACCESS_LOG == 1 ]] && alog="$RUN_DIR/nginx-proxy.access.log"
  mkdir -p "$dir/tmp"
  cat >"$dir/nginx.conf" <<EOF
# reverse proxy with upstream keep-alive
worker_processes $PROXY_WORKERS;
daemon off;
pid $dir/nginx.pid;
error_log $RUN_DIR/nginx-proxy.error.log warn;
events { worker_connections 8192; }
http {
    access_log $alog;
    server_tokens off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    upstream origin {
        server 127.0.0.1:$oport;
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 75s;
    }
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}

write_haproxy_conf() {   # FILE PORT ORIGIN_PORT
  local file=$1 port=$2 oport=$3 logg="" httplog=""
  if [[ $ACCESS_LOG == 1 ]]; then
    logg="    log stdout format raw local0 info"
    httplog="    option httplog"
  fi
  cat >"$file" <<EOF
# HAProxy: HTTP mode, keep-alive both sides, connection reuse to the origin
global
    nbthread $PROXY_WORKERS
    maxconn 4096
$logg

defaults
    mode http
    log global
$httplog
    option http-keep-alive
    http-reuse safe
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

frontend bench
    bind 127.0.0.1:$port
    default_backend origin

backend origin
    server origin1 127.0.0.1:$oport
EOF
}

write_spur_conf() {   # FILE PORT ADMIN_PORT ORIGIN_PORT  (format: shared SPEC.md)
  cat >"$1" <<EOF
# Spur: one HTTP listener forwarding everything to the origin cluster
admin:
  listen: 127.0.0.1:$3
listeners:
  - name: bench
    listen: 127.0.0.1:$2
    protocol: http
    cluster: origin
clusters:
  - name: origin
    endpoints: ["127.0.0.1:$4"]
    lb: round_robin
EOF
}

# make_mesh_certs DIR : a CA, and ECDSA P-256 workload certificates for the two sides of the
# mesh hop, with SPIFFE URI SANs (plus localhost / 127.0.0.1) and client+server auth.
make_mesh_certs() {
  local dir=$1 side
  mkdir -p "$dir"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=spur-bench-ca -keyout "$dir/ca.key" -out "$dir/ca.crt" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    >"$dir/openssl.log" 2>&1 || { cat "$dir/openssl.log" >&2; die "openssl: CA"; }
  for side in outbound inbound; do
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -subj "/CN=$side" -keyout "$dir/$side.key" -out "$dir/$side.csr" >>"$dir/openssl.log" 2>&1 \
      || { cat "$dir/openssl.log" >&2; die "openssl: $side key"; }
    printf '%s\n' \
      "basicConstraints=critical,CA:FALSE" \
      "keyUsage=critical,digitalSignature" \
      "extendedKeyUsage=serverAuth,clientAuth" \
      "subjectAltName=URI:spiffe://bench.local/ns/bench/sa/$side,DNS:localhost,IP:127.0.0.1" \
      >"$dir/$side.ext"
    openssl x509 -req -in "$dir/$side.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
      -CAcreateserial -days 2 -extfile "$dir/$side.ext" -out "$dir/$side.crt" >>"$dir/openssl.log" 2>&1 \
      || { cat "$dir/openssl.log" >&2; die "openssl: $side certificate"; }
  done
}

# write_spur_mesh_conf FILE PORT ADMIN_PORT INBOUND_PORT ORIGIN_PORT CERT_DIR|"" [HOP] : the
# two sides of a mesh hop in one process. "bench" (plaintext, what wrk calls) forwards to the
# "inbound" listener, which forwards to the origin; with CERT_DIR that hop is mutual TLS with
# SPIFFE identities checked both ways, without it plaintext. HOP: http1 (default), http2
# (ALPN h2) or http3 (QUIC; the inbound listener is then UDP).
write_spur_mesh_conf() {
  local file=$1 port=$2 admin=$3 inport=$4 oport=$5 dir=$6 hop=${7:-http1} ltls="" ctls=""
  local lproto=http
  [[ $hop == http3 ]] && lproto=http3
  if [[ -n $dir ]]; then
    ltls="    tls: { cert: $dir/inbound.crt, key: $dir/inbound.key, client_ca: $dir/ca.crt, allow_identities: [\"spiffe://bench.local/ns/bench/sa/outbound\"] }"
    ctls="    tls: { ca: $dir/ca.crt, cert: $dir/outbound.crt, key: $dir/outbound.key, expect_identities: [\"spiffe://bench.local/ns/bench/sa/inbound\"] }"
  fi
  cat >"$file" <<EOF
# Spur: a mesh hop (outbound side -> inbound side) in one process
admin:
  listen: 127.0.0.1:$admin
listeners:
  - name: bench
    listen: 127.0.0.1:$port
    protocol: http
    cluster: mesh
  - name: inbound
    listen: 127.0.0.1:$inport
    protocol: $lproto
$ltls
    cluster: origin
clusters:
  - name: mesh
    endpoints: ["127.0.0.1:$inport"]
    protocol: $hop
    lb: round_robin
$ctls
  - name: origin
    endpoints: ["127.0.0.1:$oport"]
    lb: round_robin
EOF
}

# measure_handshakes NAME PID PORT CERT_DIR : new mTLS sessions (full handshakes, client
# certificate included) against Spur's TLS listener with openssl s_time for HS_DURATION s;
# the rate, and Spur's CPU time per handshake (its server side only).
measure_handshakes() {
  local name=$1 pid=$2 port=$3 dir=$4 pids=() t0 t1 n
  [[ $HS_DURATION -gt 0 ]] || return 0
  log "$name: full mTLS handshakes with openssl s_time, ${HS_DURATION}s"
  mapfile -t pids < <(proc_tree "$pid")
  t0=$(cpu_ticks "${pids[@]}")
  "${ON_LOAD_CPUS[@]}" timeout --kill-after=5 $((HS_DURATION + 30)) \
    openssl s_time -connect "127.0.0.1:$port" -new -time "$HS_DURATION" \
    -cert "$dir/outbound.crt" -key "$dir/outbound.key" -CAfile "$dir/ca.crt" \
    >"$RUN_DIR/$name.s_time.txt" 2>&1 || warn "openssl s_time exited non-zero ($RUN_DIR/$name.s_time.txt)"
  t1=$(cpu_ticks "${pids[@]}")
  # "N connections in T.TTs; R connections/user sec, ..." then "N connections in S real seconds, ..."
  n=$(awk '/connections in [0-9]+ real seconds/ { print $1; exit }' "$RUN_DIR/$name.s_time.txt")
  if [[ -n $n && $n -gt 0 ]]; then
    R_HS_RATE[$name]=$(awk -v n="$n" -v d="$HS_DURATION" 'BEGIN { printf "%.0f", n / d }')
    R_HS_CPU[$name]=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$n" 'BEGIN { printf "%.0f", d / hz * 1e6 / n }')
    R_HS_N[$name]=$n
  else
    warn "$name: no handshake completed (see $RUN_DIR/$name.s_time.txt)"
  fi
}

# -------------------------------------------------------------- benchmark --
declare -A R_RPS R_REQS R_ERRS R_P50 R_P99 R_LP50 R_LP99 R_CPU R_CPUS R_HWM R_RSS R_PSS R_STATUS
declare -A R_HS_RATE R_HS_CPU R_HS_N

# bench NAME URL PID|"" : warm-up, throughput (CPU sampled around it), latency, memory.
bench() {
  local name=$1 url=$2 pid=$3 pids=() t0 t1 rps reqs errs non2xx p50 p99
  log "$name: warm-up ${WARMUP}s, throughput ${DURATION}s (${THREADS} threads, ${CONNECTIONS} conns), latency ${LAT_DURATION}s (1 conn)"
  if [[ $WARMUP -gt 0 ]]; then
    run_wrk "$RUN_DIR/$name.wrk-warmup.txt" "$THREADS" "$CONNECTIONS" "$WARMUP" "$url"
  fi
  if [[ -n $pid ]]; then mapfile -t pids < <(proc_tree "$pid"); fi
  t0=$(cpu_ticks "${pids[@]}")
  run_wrk "$RUN_DIR/$name.wrk-throughput.txt" "$THREADS" "$CONNECTIONS" "$DURATION" "$url"
  t1=$(cpu_ticks "${pids[@]}")
  read -r rps reqs errs non2xx p50 p99 < <(parse_wrk "$RUN_DIR/$name.wrk-throughput.txt")
  R_RPS[$name]=$rps; R_REQS[$name]=$reqs; R_P50[$name]=$p50; R_P99[$name]=$p99
  R_ERRS[$name]=$((errs + non2xx))
  if [[ -n $pid ]]; then
    R_CPUS[$name]=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", d / hz }')
    if [[ $reqs -gt 0 ]]; then
      R_CPU[$name]=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.2f", d / hz * 1e6 / n }')
    fi
  fi

  # 1-connection latency. With LAT_PIN=same the proxy and the origin (every thread and
  # worker) move onto one CPU with wrk, so that the hop's own cost is measured rather
  # than cross-CPU wake-ups (tens of µs each on a VM); the origin moves back afterwards.
  local lat_cpu=""
  if [[ $PIN == 1 && $LAT_PIN == same ]]; then
    lat_cpu=$LAT_CPU
    repin "$lat_cpu" "$ORIGIN_PID"
    if [[ -n $pid ]]; then repin "$lat_cpu" "$pid"; fi
  fi
  run_wrk "$RUN_DIR/$name.wrk-latency.txt" 1 1 "$LAT_DURATION" "$url" "$lat_cpu"
  if [[ -n $lat_cpu ]]; then
    repin "$LOAD_CPUS" "$ORIGIN_PID"
    if [[ -n $pid ]]; then repin "$PROXY_CPUS" "$pid"; fi
  fi
  read -r rps reqs errs non2xx p50 p99 < <(parse_wrk "$RUN_DIR/$name.wrk-latency.txt")
  R_LP50[$name]=$p50; R_LP99[$name]=$p99
  R_ERRS[$name]=$((R_ERRS[$name] + errs + non2xx))

  if [[ -n $pid ]]; then
    mapfile -t pids < <(proc_tree "$pid")
    R_HWM[$name]=$(mem_kib VmHWM "${pids[@]}")
    R_RSS[$name]=$(mem_kib VmRSS "${pids[@]}")
    R_PSS[$name]=$(pss_kib "${pids[@]}")
  fi
  R_STATUS[$name]=ok
  if [[ ${R_RPS[$name]} == - ]]; then
    R_STATUS[$name]="failed (wrk)"
    warn "$name: wrk produced no result (see $RUN_DIR/$name.wrk-throughput.txt)"
  elif [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
    R_STATUS[$name]="crashed"
    warn "$name: the proxy exited during the benchmark (see $RUN_DIR/$name*.log)"
  fi
  [[ ${R_ERRS[$name]} -eq 0 ]] || warn "$name: ${R_ERRS[$name]} socket errors or non-2xx responses (see $RUN_DIR/$name.wrk-*.txt)"
}

trim_log() {   # keep the tail of big access logs unless KEEP_LOGS=1
  local f=$1 lines
  [[ -f $f ]] || return 0
  lines=$(wc -l <"$f")
  echo "$lines" >"$f.lines"
  if [[ $KEEP_LOGS != 1 && $lines -gt 1000 ]]; then
    tail -n 1000 "$f" >"$f.tail" && mv "$f.tail" "$f"
  fi
}

LOAD1=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$LOAD1" 'BEGIN { exit !(l > 0.5) }'; then
  warn "load average is $LOAD1 before the run: numbers may be noisy"
fi
log "results: $RUN_DIR ($PIN_NOTE; $PROXY_WORKERS worker(s) per proxy)"

# origin, shared by all targets, on the load-generator CPUs
free_port ORIGIN_PORT
write_origin_conf "$WORK/origin" "$ORIGIN_PORT"
cp "$WORK/origin/nginx.conf" "$RUN_DIR/origin-nginx.conf"
start_proc origin "${ON_LOAD_CPUS[@]}" "$NGINX_BIN" -e "$RUN_DIR/origin.error.log" -p "$WORK/origin" -c "$WORK/origin/nginx.conf"
ORIGIN_PID=$LAST_PID
wait_ok origin "http://127.0.0.1:$ORIGIN_PORT/" "$ORIGIN_PID" || die "origin nginx did not start (see $RUN_DIR/origin.*.log)"

for target in "${TARGET_LIST[@]}"; do
  case $target in
    direct)
      bench direct "http://127.0.0.1:$ORIGIN_PORT/" ""
      ;;
    spur)
      free_port SPUR_PORT; free_port SPUR_ADMIN_PORT
      write_spur_conf "$RUN_DIR/spur.yaml" "$SPUR_PORT" "$SPUR_ADMIN_PORT" "$ORIGIN_PORT"
      # TOKIO_WORKER_THREADS only applies if Spur does not set worker_threads itself; taskset
      # also caps tokio's default (available_parallelism honours the affinity mask).
      start_proc spur "${ON_PROXY_CPUS[@]}" env -u RUST_LOG TOKIO_WORKER_THREADS="$PROXY_WORKERS" \
        "$SPUR_BIN" proxy --config "$RUN_DIR/spur.yaml"
      pid=$LAST_PID
      if wait_ok spur "http://127.0.0.1:$SPUR_PORT/" "$pid"; then
        bench spur "http://127.0.0.1:$SPUR_PORT/" "$pid"
      else
        R_STATUS[spur]=failed
      fi
      stop_proc "$pid"
      trim_log "$RUN_DIR/spur.stderr.log"
      ;;
    spur-mtls|spur-mtls-h2|spur-h3|spur-2hop)
      free_port SPUR_PORT; free_port SPUR_ADMIN_PORT; free_port SPUR_IN_PORT
      certs=""
      if [[ $target != spur-2hop ]]; then
        certs="$WORK/certs"
        [[ -f $certs/ca.crt ]] || make_mesh_certs "$certs"
      fi
      case $target in spur-mtls-h2) hop=http2 ;; spur-h3) hop=http3 ;; *) hop=http1 ;; esac
      write_spur_mesh_conf "$RUN_DIR/$target.yaml" "$SPUR_PORT" "$SPUR_ADMIN_PORT" "$SPUR_IN_PORT" "$ORIGIN_PORT" "$certs" "$hop"
      start_proc "$target" "${ON_PROXY_CPUS[@]}" env -u RUST_LOG TOKIO_WORKER_THREADS="$PROXY_WORKERS" \
        "$SPUR_BIN" proxy --config "$RUN_DIR/$target.yaml"
      pid=$LAST_PID
      if wait_ok "$target" "http://127.0.0.1:$SPUR_PORT/" "$pid"; then
        bench "$target" "http://127.0.0.1:$SPUR_PORT/" "$pid"
        if [[ $target == spur-mtls ]]; then
          measure_handshakes "$target" "$pid" "$SPUR_IN_PORT" "$certs"
        fi
        if [[ -n $certs ]]; then
          curl --noproxy '*' -s -m 2 "http://127.0.0.1:$SPUR_ADMIN_PORT/metrics" \
            | grep -E '^spur_((upstream_)?tls_handshake_errors_total|quic_)' >"$RUN_DIR/$target.tls-errors.txt" || true
        fi
      else
        R_STATUS[$target]=failed
      fi
      stop_proc "$pid"
      trim_log "$RUN_DIR/$target.stderr.log"
      ;;
    haproxy)
      free_port HAPROXY_PORT
      write_haproxy_conf "$RUN_DIR/haproxy.cfg" "$HAPROXY_PORT" "$ORIGIN_PORT"
      "$HAPROXY_BIN" -c -q -f "$RUN_DIR/haproxy.cfg" >"$RUN_DIR/haproxy.check.log" 2>&1 \
        || { cat "$RUN_DIR/haproxy.check.log" >&2; die "haproxy config check failed"; }
      start_proc haproxy "${ON_PROXY_CPUS[@]}" "$HAPROXY_BIN" -db -f "$RUN_DIR/haproxy.cfg"
      pid=$LAST_PID
      if wait_ok haproxy "http://127.0.0.1:$HAPROXY_PORT/" "$pid"; then
        bench haproxy "http://127.0.0.1:$HAPROXY_PORT/" "$pid"
      else
        R_STATUS[haproxy]=failed
      fi
      stop_proc "$pid"
      # with 'log stdout' the access log is haproxy's stdout
      if [[ $ACCESS_LOG == 1 ]]; then
        mv "$RUN_DIR/haproxy.stdout.log" "$RUN_DIR/haproxy.access.log" 2>/dev/null || true
      fi
      trim_log "$RUN_DIR/haproxy.access.log"
      ;;
    nginx)
      free_port NGINX_PORT
      write_nginx_proxy_conf "$WORK/nginx-proxy" "$NGINX_PORT" "$ORIGIN_PORT"
      cp "$WORK/nginx-proxy/nginx.conf" "$RUN_DIR/nginx-proxy.conf"
      start_proc nginx-proxy "${ON_PROXY_CPUS[@]}" "$NGINX_BIN" -e "$RUN_DIR/nginx-proxy.error.log" \
        -p "$WORK/nginx-proxy" -c "$WORK/nginx-proxy/nginx.conf"
      pid=$LAST_PID
      if wait_ok nginx-proxy "http://127.0.0.1:$NGINX_PORT/" "$pid"; then
        bench nginx "http://127.0.0.1:$NGINX_PORT/" "$pid"
      else
        R_STATUS[nginx]=failed
      fi
      stop_proc "$pid"
      trim_log "$RUN_DIR/nginx-proxy.access.log"
      ;;
  esac
done

# ----------------------------------------------------------------- report --
fmt_int() { [[ ${1:--} == - ]] && echo "—" || awk -v v="$1" 'BEGIN { printf "%.0f", v }'; }
fmt_us()  { [[ ${1:--} == - ]] && echo "—" || awk -v v="$1" 'BEGIN { printf "%.1f µs", v }'; }
fmt_mib() { [[ -z ${1:-} ]] && echo "—" || awk -v v="$1" 'BEGIN { printf "%.1f", v / 1024 }'; }
delta_us() {  # delta_us VALUE BASE
  if [[ ${1:--} == - || ${2:--} == - ]]; then echo "—"; else awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.1f µs", a - b }'; fi
}
ratio() {     # ratio A B -> "A/B×"
  if [[ -z ${1:-} || -z ${2:-} || ${1} == - || ${2} == - ]]; then echo "n/a"; else
    awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2f×", a / b }'; fi
}

REPORT="$RUN_DIR/report.md"
{
  echo "# Spur load benchmark"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC') · commit $(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo none)$(git -C "$REPO_ROOT" diff --quiet HEAD -- 2>/dev/null || echo ' (dirty)')"
  echo "· $(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo) · ${#ALLOWED[@]} CPUs · kernel $(uname -r)"
  echo "· $PIN_NOTE; $PROXY_WORKERS worker thread(s)/process(es) per proxy; proxy access logs: $([[ $ACCESS_LOG == 1 ]] && echo on || echo 'off (Spur still logs)')"
  echo "· wrk: throughput ${DURATION}s with ${THREADS} threads / ${CONNECTIONS} connections; latency ${LAT_DURATION}s with 1 connection; warm-up ${WARMUP}s"
  echo "· $("$NGINX_BIN" -v 2>&1 | head -1); $( [[ -x $HAPROXY_BIN ]] && "$HAPROXY_BIN" -v 2>/dev/null | head -1 | cut -d' ' -f1-3 ); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
  echo
  echo "req/s: throughput at ${CONNECTIONS} connections. p50/p99: latency at 1 connection."
  echo "CPU µs/req: proxy process CPU time (user+system) during the throughput run / requests. RSS MiB: peak (VmHWM), all proxy processes."
  echo
  echo "| target | req/s | p50 | p99 | CPU µs/req | RSS MiB |"
  echo "|---|---:|---:|---:|---:|---:|"
  for t in "${TARGET_LIST[@]}"; do
    if [[ ${R_STATUS[$t]:-} != ok ]]; then
      echo "| $t | ${R_STATUS[$t]:-failed} | — | — | — | — |"; continue
    fi
    echo "| $t | $(fmt_int "${R_RPS[$t]}") | $(fmt_us "${R_LP50[$t]}") | $(fmt_us "${R_LP99[$t]}") | ${R_CPU[$t]:-—} | $(fmt_mib "${R_HWM[$t]:-}") |"
  done
  echo
  if [[ ${R_STATUS[spur]:-} == ok && ${R_STATUS[haproxy]:-} == ok ]]; then
    echo "Spur vs HAProxy: throughput $(ratio "${R_RPS[spur]}" "${R_RPS[haproxy]}"), CPU per request $(ratio "${R_CPU[spur]:-}" "${R_CPU[haproxy]:-}") (throughput: higher is better; CPU: lower is better)."
  else
    echo "Spur vs HAProxy: n/a (both targets must run)."
  fi
  if [[ ${R_STATUS[spur-mtls]:-} == ok ]]; then
    echo
    echo "spur-mtls: wrk → Spur listener → mutual TLS (TLS 1.3, ECDSA P-256, SPIFFE IDs checked both ways) → Spur TLS listener → origin. Both sides of the hop run in one Spur process, so its CPU µs/req covers two hops. Keep-alive pools the mTLS connections: a request pays for encryption, not for a handshake."
    if [[ ${R_STATUS[spur-2hop]:-} == ok ]]; then
      echo "mTLS cost per request: $(awk -v a="${R_CPU[spur-mtls]:-0}" -v b="${R_CPU[spur-2hop]:-0}" 'BEGIN { printf "%+.2f", a - b }') CPU µs, $(delta_us "${R_LP50[spur-mtls]}" "${R_LP50[spur-2hop]}") p50 at 1 connection (spur-mtls vs spur-2hop: the same two hops in plaintext)."
    elif [[ ${R_STATUS[spur]:-} == ok ]]; then
      echo "mTLS cost per request, estimated against two plaintext hops as 2 × spur: $(awk -v a="${R_CPU[spur-mtls]:-0}" -v b="${R_CPU[spur]:-0}" 'BEGIN { printf "%+.2f", a - 2 * b }') CPU µs (--targets spur-2hop,spur-mtls measures the baseline instead)."
    fi
    if [[ -n ${R_HS_RATE[spur-mtls]:-} ]]; then
      echo "Full mTLS handshakes (openssl s_time -new with a client certificate, ${HS_DURATION}s, client on the load CPUs): ${R_HS_RATE[spur-mtls]}/s; Spur CPU per handshake (server side): ${R_HS_CPU[spur-mtls]} µs."
    fi
  fi
  if [[ ${R_STATUS[spur-mtls-h2]:-} == ok || ${R_STATUS[spur-h3]:-} == ok ]]; then
    echo
    echo "spur-mtls-h2 and spur-h3: the same two hops, with HTTP/2 over mutual TLS (ALPN h2) or HTTP/3 over QUIC with mutual TLS between them (one multiplexed connection carries all ${CONNECTIONS} client connections' requests)."
  fi
  echo
  echo "<details><summary>details</summary>"
  echo
  echo "| target | requests | errors | p50 @${CONNECTIONS}c | p99 @${CONNECTIONS}c | p50 vs direct @1c | p99 vs direct @1c | CPU s | VmRSS MiB | PSS MiB |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for t in "${TARGET_LIST[@]}"; do
    [[ ${R_STATUS[$t]:-} == ok ]] || continue
    if [[ $t == direct ]]; then d50="—"; d99="—"; else
      d50=$(delta_us "${R_LP50[$t]}" "${R_LP50[direct]:--}"); d99=$(delta_us "${R_LP99[$t]}" "${R_LP99[direct]:--}"); fi
    echo "| $t | ${R_REQS[$t]} | ${R_ERRS[$t]} | $(fmt_us "${R_P50[$t]}") | $(fmt_us "${R_P99[$t]}") | $d50 | $d99 | ${R_CPUS[$t]:-—} | $(fmt_mib "${R_RSS[$t]:-}") | $(fmt_mib "${R_PSS[$t]:-}") |"
  done
  echo
  echo "Raw wrk output, configs and logs: \`${RUN_DIR#"$REPO_ROOT"/}/\`"
  echo
  echo "</details>"
} >"$REPORT"

cp "$REPORT" "$RESULTS_DIR/latest.md"
echo
cat "$REPORT"
echo
log "written: $RESULTS_DIR/latest.md"

for t in "${TARGET_LIST[@]}"; do
  [[ ${R_STATUS[$t]:-} == ok ]] || exit 1
done
exit 0

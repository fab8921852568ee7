#!/usr/bin/env bash
# Spur load benchmark: the same GET traffic to an nginx origin (fixed 100-byte body) sent
# direct and through Spur, HAProxy and nginx as a reverse proxy, in one run:
#   - two placements: "alone" (the proxy alone on one core; wrk and the origin on the other)
#     and "shared" (the proxy and the origin share one core, as in a pod; wrk on the other);
#   - access logs off and on (every proxy writing one line per request to a file);
#   - HTTP/1.1 clients (wrk) and HTTP/2 clients (h2load, h2c with prior knowledge, several
#     streams per connection) to the same HTTP/1.1 origin;
#   - per cell: req/s, CPU µs, system calls and context switches per request (perf stat on
#     the proxy, /proc as the fallback), peak RSS; latency at one connection;
#   - memory (idle, and with 1,000 idle keep-alive connections), Spur's startup to /ready,
#     the mesh hops (spur-mtls, spur-mtls-h2, spur-h3), and ratios to HAProxy;
#   - --compare A,B runs two Spur binaries side by side (rows spur[A], spur[B]).
# Everything listens on 127.0.0.1 only; every load run is bounded in time.
# Usage: benches/run.sh --help; the columns are explained in benches/README.md.
set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=lib/common.sh
source "$SCRIPT_DIR/lib/common.sh"
# shellcheck source=lib/targets.sh
source "$SCRIPT_DIR/lib/targets.sh"
# shellcheck source=lib/report.sh
source "$SCRIPT_DIR/lib/report.sh"

# ----------------------------------------------------------------- settings --
# Every setting can come from the environment or from a flag below.
DURATION=${DURATION:-5}             # each throughput run (wrk, h2load), seconds
ROUNDS=${ROUNDS:-3}                 # throughput runs per cell, the proxies of a group taking turns
LAT_DURATION=${LAT_DURATION:-3}     # 1-connection latency run, seconds
WARMUP=${WARMUP:-1}                 # warm-up per proxy start, seconds (0 = none)
CONNECTIONS=${CONNECTIONS:-50}      # wrk connections (one wrk thread)
H2_CLIENTS=${H2_CLIENTS:-10}        # h2load connections (one h2load thread)
H2_STREAMS=${H2_STREAMS:-10}        # h2load concurrent streams per connection
TARGETS=${TARGETS:-direct,spur,haproxy,nginx,spur-mtls,spur-mtls-h2,spur-h3}
PLACEMENTS=${PLACEMENTS:-alone,shared}
LOGS=${LOGS:-off,on}
PROTOCOLS=${PROTOCOLS:-h1,h2}
MESH_LOG=${MESH_LOG:-}              # access-log setting of the mesh-hop rows (default: the first of LOGS)
HS_DURATION=${HS_DURATION:-3}       # spur-mtls: full-handshake run with openssl s_time, seconds (0 = none)
MEM_CONNS=${MEM_CONNS:-1000}        # idle keep-alive connections for the memory test (0 = skip)
MEM_SETTLE=${MEM_SETTLE:-3}        # seconds between the last idle connection's answer and the reading
STARTUP_RUNS=${STARTUP_RUNS:-5}     # Spur starts timed to /ready (0 = skip)
PROXY_CPUS=${PROXY_CPUS:-}          # CPU list of the proxy (default: the last allowed CPU)
LOAD_CPUS=${LOAD_CPUS:-}            # CPU list of the load generator (default: the first allowed CPU)
PROXY_WORKERS=${PROXY_WORKERS:-1}   # worker threads/processes of every proxy
LAT_PIN=${LAT_PIN:-same}            # latency: "same" = client, proxy, origin on one CPU; "placement"
KEEP_LOGS=${KEEP_LOGS:-0}           # 1 = keep full access logs (they can be hundreds of MB)
RESULTS_DIR=${RESULTS_DIR:-$SCRIPT_DIR/results}
INSTALL=${INSTALL:-1}
BUILD=0
SPUR_BINS=()
[[ -n ${SPUR_BIN:-} ]] && SPUR_BINS=("$SPUR_BIN")
CLI_BINS=0

usage() {
  cat <<EOF
Usage: benches/run.sh [options]

Compares direct traffic to an nginx origin with traffic through Spur, HAProxy and nginx
(reverse proxy), in two placements, with access logs off and on, for HTTP/1.1 and HTTP/2
clients. Prints Markdown tables and writes them to benches/results/latest.md; raw load
generator output, configs, perf counters and logs go to benches/results/run-<timestamp>/.
The default run takes about 10 minutes (about 12 with --compare of two binaries).

Options (environment variable in brackets):
  --spur-bin PATH         Spur binary [SPUR_BIN, default target/release/spur]; given twice,
                          the same as --compare
  --compare A,B           run two Spur binaries in the same run: rows spur[A] and spur[B]
  --build                 run 'cargo build --release --bin spur' first (also done when the
                          default target/release/spur is missing)
  --targets LIST          comma-separated subset of direct,spur,haproxy,nginx,spur-mtls,
                          spur-mtls-h2,spur-h3,spur-2hop [TARGETS=$TARGETS]
  --placements LIST       alone,shared or one of them [PLACEMENTS=$PLACEMENTS]
  --logs LIST             access logs: off,on or one of them [LOGS=$LOGS]
  --no-access-log         the same as --logs off
  --protocols LIST        h1,h2 or one of them [PROTOCOLS=$PROTOCOLS]
  --mesh-log off|on       access-log setting of the mesh-hop rows [MESH_LOG, default: first of --logs]
  --duration N            each throughput run, seconds [DURATION=$DURATION]
  --rounds N              throughput runs per cell: the proxies of a placement and log setting
                          run side by side and take turns, N rounds; a cell reports its
                          round with the median CPU µs/req [ROUNDS=$ROUNDS]
  --latency-duration N    1-connection latency run, seconds [LAT_DURATION=$LAT_DURATION]
  --warmup N              warm-up after each proxy start, seconds, 0 = none [WARMUP=$WARMUP]
  --connections N         wrk connections [CONNECTIONS=$CONNECTIONS]
  --h2-clients N          h2load connections [H2_CLIENTS=$H2_CLIENTS]
  --h2-streams N          h2load streams per connection [H2_STREAMS=$H2_STREAMS]
  --latency-pin same|placement
                          1-connection run with client, proxy and origin all on one CPU
                          ("same", default) or in each placement [LAT_PIN=$LAT_PIN]
  --memory-conns N        idle keep-alive connections of the memory test, 0 = skip [MEM_CONNS=$MEM_CONNS]
  --startup-runs N        Spur starts timed to /ready, 0 = skip [STARTUP_RUNS=$STARTUP_RUNS]
  --handshake-duration N  spur-mtls: full mTLS handshakes with openssl s_time, seconds, 0 = none
                          [HS_DURATION=$HS_DURATION]
  --proxy-cpus LIST       CPU list of the proxy [PROXY_CPUS, default: last allowed CPU]
  --load-cpus LIST        CPU list of wrk/h2load [LOAD_CPUS, default: first allowed CPU]
  --workers N             workers of every proxy [PROXY_WORKERS=$PROXY_WORKERS]
  --no-perf               CPU and context switches from /proc only (no system-call counts)
  --keep-logs             keep the full access logs [KEEP_LOGS=1]
  --no-install            never run apt-get [INSTALL=0]
  -h, --help              this text
EOF
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --spur-bin)   # the first one on the command line replaces SPUR_BIN from the environment
      [[ $CLI_BINS == 1 ]] || SPUR_BINS=()
      CLI_BINS=1; SPUR_BINS+=("${2:?}"); shift ;;
    --compare)
      IFS=, read -r -a SPUR_BINS <<<"${2:?}"; CLI_BINS=1
      [[ ${#SPUR_BINS[@]} -ge 2 ]] || die "--compare takes two or more binaries: A,B"
      shift ;;
    --build) BUILD=1 ;;
    --targets) TARGETS=${2:?}; shift ;;
    --placements) PLACEMENTS=${2:?}; shift ;;
    --logs) LOGS=${2:?}; shift ;;
    --no-access-log) LOGS=off ;;
    --protocols) PROTOCOLS=${2:?}; shift ;;
    --mesh-log) MESH_LOG=${2:?}; shift ;;
    --duration) DURATION=${2:?}; shift ;;
    --rounds) ROUNDS=${2:?}; shift ;;
    --latency-duration) LAT_DURATION=${2:?}; shift ;;
    --warmup) WARMUP=${2:?}; shift ;;
    --connections) CONNECTIONS=${2:?}; shift ;;
    --h2-clients) H2_CLIENTS=${2:?}; shift ;;
    --h2-streams) H2_STREAMS=${2:?}; shift ;;
    --latency-pin) LAT_PIN=${2:?}; shift ;;
    --memory-conns) MEM_CONNS=${2:?}; shift ;;
    --startup-runs) STARTUP_RUNS=${2:?}; shift ;;
    --handshake-duration) HS_DURATION=${2:?}; shift ;;
    --proxy-cpus) PROXY_CPUS=${2:?}; shift ;;
    --load-cpus) LOAD_CPUS=${2:?}; shift ;;
    --workers) PROXY_WORKERS=${2:?}; shift ;;
    --no-perf) USE_PERF=0 ;;
    --keep-logs) KEEP_LOGS=1 ;;
    --no-install) INSTALL=0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# ------------------------------------------------------------- validation --
DURATION=$(to_secs "$DURATION")
LAT_DURATION=$(to_secs "$LAT_DURATION")
WARMUP=$(to_secs "$WARMUP")
HS_DURATION=$(to_secs "$HS_DURATION")
[[ $DURATION -ge 1 && $LAT_DURATION -ge 1 ]] || die "durations must be at least 1s"
for v in CONNECTIONS H2_CLIENTS H2_STREAMS PROXY_WORKERS ROUNDS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
[[ $MEM_CONNS =~ ^[0-9]+$ && $STARTUP_RUNS =~ ^[0-9]+$ ]] || die "--memory-conns and --startup-runs take a number"
[[ $LAT_PIN == same || $LAT_PIN == placement ]] || die "--latency-pin must be 'same' or 'placement'"

# check_list NAME VALUE ALLOWED... : a comma-separated list of allowed words, no repeats.
check_list() {
  local name=$1 value=$2 w; shift 2
  local -A seen=()
  IFS=, read -r -a _words <<<"$value"
  [[ ${#_words[@]} -gt 0 ]] || die "$name is empty"
  for w in "${_words[@]}"; do
    [[ " $* " == *" $w "* ]] || die "$name: unknown '$w' (one of: $*)"
    [[ -z ${seen[$w]:-} ]] || die "$name: '$w' given twice"
    seen[$w]=1
  done
}
check_list --targets "$TARGETS" direct spur haproxy nginx spur-mtls spur-mtls-h2 spur-h3 spur-2hop
check_list --placements "$PLACEMENTS" alone shared
check_list --logs "$LOGS" off on
check_list --protocols "$PROTOCOLS" h1 h2
IFS=, read -r -a TARGET_LIST <<<"$TARGETS"
IFS=, read -r -a PLACEMENT_LIST <<<"$PLACEMENTS"
IFS=, read -r -a LOG_LIST <<<"$LOGS"
[[ -n $MESH_LOG ]] || MESH_LOG=${LOG_LIST[0]}
[[ $MESH_LOG == off || $MESH_LOG == on ]] || die "--mesh-log must be 'off' or 'on'"
want() { [[ ",$TARGETS," == *",$1,"* ]]; }
want_proto() { [[ ",$PROTOCOLS," == *",$1,"* ]]; }
wants_spur() { want spur || want spur-mtls || want spur-mtls-h2 || want spur-h3 || want spur-2hop; }

# Spur binaries: one (rows "spur") or several (rows "spur[A]", "spur[B]", ...).
[[ ${#SPUR_BINS[@]} -gt 0 ]] || SPUR_BINS=("$REPO_ROOT/target/release/spur")
[[ ${#SPUR_BINS[@]} -le 4 ]] || die "at most 4 Spur binaries"
SPUR_LABELS=()
if [[ ${#SPUR_BINS[@]} -eq 1 ]]; then SPUR_LABELS=(""); else
  for ((i = 0; i < ${#SPUR_BINS[@]}; i++)); do SPUR_LABELS+=("$(printf "\\x$(printf %x $((65 + i)))")"); done
fi
spur_name() {   # spur_name KIND LABEL -> "spur", "spur[A]", "spur-mtls[B]", ...
  if [[ -n $2 ]]; then echo "$1[$2]"; else echo "$1"; fi
}

# ------------------------------------------------------------ dependencies --
SUDO=()
[[ $(id -u) -eq 0 ]] || SUDO=(sudo)
missing=()
command -v wrk >/dev/null || missing+=(wrk)
want_proto h2 && ! command -v h2load >/dev/null && missing+=(nghttp2-client)
[[ -x $NGINX_BIN ]] || missing+=(nginx)          # the origin is always nginx
if want haproxy && [[ ! -x $HAPROXY_BIN ]]; then missing+=(haproxy); fi
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
if { want spur-mtls || want spur-mtls-h2 || want spur-h3; } && ! command -v openssl >/dev/null; then missing+=(openssl); fi
command -v pgrep >/dev/null || missing+=(procps)
command -v taskset >/dev/null || missing+=(util-linux)
[[ $USE_PERF == 1 ]] && ! command -v perf >/dev/null && missing+=(linux-perf)
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
if [[ $USE_PERF == 1 ]] && ! command -v perf >/dev/null; then
  warn "perf is not available: CPU and context switches from /proc, no system-call counts"
  USE_PERF=0
fi

if wants_spur; then
  default_bin="$REPO_ROOT/target/release/spur"
  if [[ $BUILD == 1 || ( ${SPUR_BINS[0]} == "$default_bin" && ! -x $default_bin ) ]]; then
    command -v cargo >/dev/null || die "cargo not found; cannot build $default_bin"
    log "building Spur: cargo build --release --bin spur"
    (cd "$REPO_ROOT" && cargo build --release --bin spur) || die "cargo build failed"
  fi
  for b in "${SPUR_BINS[@]}"; do [[ -x $b ]] || die "Spur binary not found at $b"; done
fi

# ------------------------------------------------------------- CPU pinning --
read -r -a ALLOWED <<<"$(allowed_cpus)"
# One CPU is accepted only when both placements are given (benches/pgo.sh's training load,
# whose figures are not read).
[[ ${#ALLOWED[@]} -ge 2 || ( -n $PROXY_CPUS && -n $LOAD_CPUS ) ]] \
  || die "needs at least 2 CPUs to place the proxy and the load generator apart (${#ALLOWED[@]} allowed)"
[[ -n $PROXY_CPUS ]] || PROXY_CPUS=${ALLOWED[-1]}
[[ -n $LOAD_CPUS ]] || LOAD_CPUS=${ALLOWED[0]}
read -r -a _lc <<<"$(expand_cpus "$LOAD_CPUS")"
LAT_CPU=${_lc[0]}
ON_PROXY_CPUS=(taskset -c "$PROXY_CPUS")
ON_LOAD_CPUS=(taskset -c "$LOAD_CPUS")
# origin_cpus PLACEMENT: where the origin runs in that placement
origin_cpus() { if [[ $1 == shared ]]; then echo "$PROXY_CPUS"; else echo "$LOAD_CPUS"; fi; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true   # 1,000 idle connections need the file descriptors

# ------------------------------------------------------------- run dir --
mkdir -p "$RESULTS_DIR"
RUN_DIR="$RESULTS_DIR/run-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RUN_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/spur-bench.XXXXXX")
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Each Spur binary is copied first, so that a rebuild during the run changes nothing; the
# report names the original path with the copy's size, time and checksum.
SPUR_INFO=()
if wants_spur; then
  for ((i = 0; i < ${#SPUR_BINS[@]}; i++)); do
    mkdir -p "$WORK/bin"
    # A spur-proxy binary keeps its name's start: it takes no `proxy` subcommand.
    copy="$WORK/bin/spur$i"
    [[ $(basename "${SPUR_BINS[$i]}") == spur-proxy* ]] && copy="$WORK/bin/spur-proxy$i"
    cp -p "${SPUR_BINS[$i]}" "$copy"
    SPUR_INFO+=("$(bin_info "${SPUR_BINS[$i]}" "$copy")")
    SPUR_BINS[i]=$copy
  done
fi

# ------------------------------------------------------------------ results --
# Cell key: "PLACEMENT|LOG|PROTO|NAME" (direct: LOG "-"). Latency key: "LATPL|LOG|NAME".
for _a in R_STATUS R_RPS R_REQS R_ERRS R_CPU R_TASK_CPU R_STEAL R_ROUNDS R_SYS R_CSW R_KERNEL R_FAULTS R_UTIL R_HWM R_THREADS R_LOGLINES R_NOTE \
  R_LP50 R_LP99 R_MEM_IDLE R_MEM_CONN R_MEM_OK R_START_MED R_START_MIN R_START_RUNS R_HS_RATE R_HS_CPU; do
  declare -A "$_a=()"
done
CELL_ORDER=(); LAT_ORDER=(); MESH_ORDER=(); MEM_ORDER=()
FAILED=0
declare -A _seen_cell=() _seen_lat=()

# file_tag KEY -> a file name part: "alone|on|h1|spur[A]" -> "alone.on.h1.spur_A_"
file_tag() { local t=${1//|/.}; t=${t//[\[\]]/_}; echo "${t// /-}"; }
add_cell() { [[ -n ${_seen_cell[$1]:-} ]] || { CELL_ORDER+=("$1"); _seen_cell[$1]=1; }; }
add_lat()  { [[ -n ${_seen_lat[$1]:-} ]] || { LAT_ORDER+=("$1"); _seen_lat[$1]=1; }; }
fail_cell() { R_STATUS[$1]=${2:-failed}; FAILED=1; }

# measure KEY PROTO URL PIDS... : one throughput run under the counters (round ROUND of
# the cell when ROUNDS > 1). CPU per request is /proc's utime+stime (the proxy's own CPU
# time; steal excluded), perf's task-clock beside it.
ROUND=1
measure() {
  local key=$1 proto=$2 url=$3 out rps reqs errs p50 p99 round=""; shift 3
  [[ $ROUNDS -le 1 ]] || round=".r$ROUND"
  out="$RUN_DIR/$(file_tag "$key").$proto$round.txt"
  add_cell "$key"
  [[ $# -gt 0 ]] && counters_start "$@"
  if [[ $proto == h1 ]]; then
    run_wrk "$out" "$LOAD_CPUS" "$CONNECTIONS" "$DURATION" "$url"
    read -r rps reqs errs p50 p99 < <(parse_wrk "$out")
  else
    run_h2load "$out" "$LOAD_CPUS" "$H2_CLIENTS" "$H2_STREAMS" "$DURATION" "$url"
    read -r rps reqs errs < <(parse_h2load "$out")
  fi
  R_RPS[$key]=$rps; R_REQS[$key]=$reqs; R_ERRS[$key]=$errs; R_STATUS[$key]=ok
  if [[ $# -gt 0 ]]; then
    counters_stop
    R_CPU[$key]=$(per_req "$C_PROC_US" "$reqs" 1)
    R_TASK_CPU[$key]=$(per_req "$C_TASK_US" "$reqs" 1)
    R_STEAL[$key]=$(awk -v s="$C_STEAL_US" -v w="$C_WALL_US" 'BEGIN { if (w > 0) printf "%.1f%%", 100 * s / w; else print "-" }')
    R_SYS[$key]=$(per_req "$C_SYS" "$reqs" 2)
    R_CSW[$key]=$(per_req "$C_CSW" "$reqs" 2)
    R_KERNEL[$key]=$(per_req "$C_KERNEL_US" "$reqs" 1)
    R_FAULTS[$key]=$(per_req "$C_FAULTS" "$reqs" 3)
    R_UTIL[$key]=$(awk -v c="$C_PROC_US" -v w="$C_WALL_US" 'BEGIN { if (w > 0) printf "%.0f%%", 100 * c / w; else print "-" }')
  fi
  if [[ $rps == - || $reqs == 0 ]]; then
    fail_cell "$key" "failed (no result)"; warn "$key: no result (see $out)"
  elif [[ $errs -gt 0 ]]; then
    warn "$key: $errs errors or non-2xx responses (see $out)"
  fi
}

# latency LATKEY URL PLACEMENT [PID] : wrk -c1; with LAT_PIN=same the client, the proxy
# and the origin (every thread) move onto one CPU, so the hop's own cost is measured rather
# than cross-CPU wake-ups (tens of µs each on a VM); they move back afterwards.
latency() {
  local key=$1 url=$2 pl=$3 pid=${4:-} out on=$LOAD_CPUS rps reqs errs p50 p99
  out="$RUN_DIR/$(file_tag "$key").latency.txt"
  if [[ $LAT_PIN == same ]]; then
    on=$LAT_CPU
    repin "$LAT_CPU" "$ORIGIN_PID"
    [[ -n $pid ]] && repin "$LAT_CPU" "$pid"
  fi
  run_wrk "$out" "$on" 1 "$LAT_DURATION" "$url"
  if [[ $LAT_PIN == same ]]; then
    repin "$(origin_cpus "$pl")" "$ORIGIN_PID"
    [[ -n $pid ]] && repin "$PROXY_CPUS" "$pid"
  fi
  read -r rps reqs errs p50 p99 < <(parse_wrk "$out")
  add_lat "$key"
  R_LP50[$key]=$p50; R_LP99[$key]=$p99
  [[ $p50 != - ]] || { FAILED=1; warn "$key: no latency result (see $out)"; }
}
# lat_placement PLACEMENT -> the latency key's placement, or "" when this placement does
# not measure latency (LAT_PIN=same measures it once, in the placement LAT_FIRST).
LAT_FIRST=${PLACEMENT_LIST[0]}
lat_placement() {
  if [[ $LAT_PIN == placement ]]; then echo "$1"
  elif [[ $1 == "$LAT_FIRST" ]]; then echo "one CPU"
  fi
}

# keep_round KEY : the values of the cell's run just measured, as round ROUND.
declare -A ROUND_ROWS=()
keep_round() {
  local k=$1
  ROUND_ROWS[$k]+="${R_CPU[$k]:--} ${R_STATUS[$k]} ${R_RPS[$k]} ${R_REQS[$k]} ${R_ERRS[$k]} ${R_TASK_CPU[$k]:--} ${R_SYS[$k]:--} ${R_CSW[$k]:--} ${R_UTIL[$k]:--} ${R_STEAL[$k]:--} ${R_KERNEL[$k]:--} ${R_FAULTS[$k]:--}"$'\n'
}
# pick_round KEY : the cell's values become those of its round with the median CPU µs/req
# (of an even count, the lower middle); errors are those of every round; a cell fails when
# one of its rounds did.
pick_round() {
  local k=$1 rows row errs=0 failed=0 cpus=()
  rows=${ROUND_ROWS[$k]:-}
  [[ -n $rows ]] || return 0
  while read -r -a row; do
    [[ ${#row[@]} -gt 0 ]] || continue
    cpus+=("${row[0]}")
    errs=$((errs + ${row[4]:-0}))
    [[ ${row[1]} == ok ]] || failed=1
  done <<<"$rows"
  R_ROUNDS[$k]=$(IFS=/; echo "${cpus[*]}")
  if [[ $failed == 1 ]]; then
    R_STATUS[$k]="failed (no result in a round)"; R_ERRS[$k]=$errs; FAILED=1; return 0
  fi
  read -r -a row < <(sed '/^$/d' <<<"$rows" | sort -n -k1,1 | awk -v n="${#cpus[@]}" 'NR == int((n + 1) / 2)')
  R_CPU[$k]=${row[0]}; R_RPS[$k]=${row[2]}; R_REQS[$k]=${row[3]}
  R_TASK_CPU[$k]=${row[5]}; R_SYS[$k]=${row[6]}; R_CSW[$k]=${row[7]}; R_UTIL[$k]=${row[8]}; R_STEAL[$k]=${row[9]}; R_KERNEL[$k]=${row[10]}; R_FAULTS[$k]=${row[11]}
  R_STATUS[$k]=ok; R_ERRS[$k]=$errs
}

# cut_log NAME : with access logs on, each proxy's log file is emptied after each of its
# runs (its lines counted first), unless KEEP_LOGS=1. A log that grows by gigabytes over a
# cell writes into memory the virtual machine touches for the first time, which costs the
# writer more with every round (seen in the kernel's copy into the page cache: 25% of
# Spur's CPU in its seventh HTTP/2 round, near none in its first), and more for a proxy
# whose lines are longer; emptied, the file's pages are freed and written again.
declare -A G_CUT=()
cut_log() {
  local f=${G_LOG[$1]}
  [[ ${KEEP_LOGS:-0} != 1 && -f $f ]] || return 0
  G_CUT[$1]=$(( ${G_CUT[$1]:-0} + $(wc -l <"$f") ))
  : >"$f"
}

# group PLACEMENT LOG KIND|NAME|BIN... : the proxies of one placement and log setting
# started side by side (each on the proxy CPUs, idle while another is measured), warmed up,
# then ROUNDS rounds in which each takes its turn at every protocol (the order reversed
# every other round), so that a disturbance of the machine falls on all of them rather
# than on one; a cell reports its median round. Then each one's latency run, peak RSS and
# stop.
declare -A G_PID=() G_PIDS=() G_URL=() G_H2URL=() G_H2NOTE=() G_LOG=() G_TAG=() G_KIND=() G_INPORT=() G_CERTS=()
group() {
  local pl=$1 lg=$2 e kind name bin tag names=() order=() pids=() proto key lpl r i
  shift 2
  G_CUT=()
  for e in "$@"; do
    IFS='|' read -r kind name bin <<<"$e"
    tag=$(file_tag "$pl|$lg|$name")
    log "$pl, access log $lg: $name"
    if ! start_target "$kind" "$tag" "$lg" "$bin"; then
      for proto in h1 h2; do want_proto "$proto" && { add_cell "$pl|$lg|$proto|$name"; fail_cell "$pl|$lg|$proto|$name" "did not start"; }; done
      stop_proc "$T_PID"; continue
    fi
    names+=("$name")
    G_KIND[$name]=$kind; G_PID[$name]=$T_PID; G_URL[$name]=$T_URL; G_H2URL[$name]=$T_H2URL
    G_H2NOTE[$name]=$T_H2NOTE; G_LOG[$name]=$T_LOGFILE; G_TAG[$name]=$tag; G_INPORT[$name]=$T_INPORT; G_CERTS[$name]=$T_CERTS
    mapfile -t pids < <(proc_tree "$T_PID")
    G_PIDS[$name]="${pids[*]}"
    for proto in h1 h2; do R_THREADS["$pl|$lg|$proto|$name"]=$(thread_count "${pids[@]}"); done
    if [[ $WARMUP -gt 0 ]]; then
      if want_proto h1; then run_wrk "$WORK/warmup.txt" "$LOAD_CPUS" "$CONNECTIONS" "$WARMUP" "$T_URL"
      elif [[ -n $T_H2URL ]]; then run_h2load "$WORK/warmup.txt" "$LOAD_CPUS" "$H2_CLIENTS" "$H2_STREAMS" "$WARMUP" "$T_H2URL"; fi
    fi
  done
  for ((r = 1; r <= ROUNDS; r++)); do
    ROUND=$r
    order=("${names[@]}")
    if ((r % 2 == 0)); then order=(); for ((i = ${#names[@]} - 1; i >= 0; i--)); do order+=("${names[$i]}"); done; fi
    if [[ $ROUNDS -gt 1 && ${#names[@]} -gt 0 ]]; then log "$pl, access log $lg: round $r of $ROUNDS (${order[*]})"; fi
    for name in "${order[@]}"; do
      kind=${G_KIND[$name]}
      read -r -a pids <<<"${G_PIDS[$name]}"
      for proto in h1 h2; do
        want_proto "$proto" || continue
        [[ $proto == h2 && $kind == spur-* ]] && continue   # mesh hops: HTTP/1.1 clients, as before
        key="$pl|$lg|$proto|$name"
        if [[ $proto == h2 && -z ${G_H2URL[$name]} ]]; then
          add_cell "$key"; R_STATUS[$key]=n/a; R_NOTE[$key]=${G_H2NOTE[$name]}; continue
        fi
        if [[ $proto == h1 ]]; then measure "$key" h1 "${G_URL[$name]}" "${pids[@]}"
        else measure "$key" h2 "${G_H2URL[$name]}" "${pids[@]}"; fi
        keep_round "$key"
        [[ $lg == on ]] && cut_log "$name"
      done
    done
  done
  ROUND=1
  for name in "${names[@]}"; do
    kind=${G_KIND[$name]}
    read -r -a pids <<<"${G_PIDS[$name]}"
    for proto in h1 h2; do pick_round "$pl|$lg|$proto|$name"; done
    lpl=$(lat_placement "$pl")
    if [[ -n $lpl ]]; then latency "$lpl|$lg|$name" "${G_URL[$name]}" "$pl" "${G_PID[$name]}"; fi
    if [[ $kind == spur-mtls && $HS_DURATION -gt 0 ]]; then handshakes "$name" "${G_PID[$name]}" "${G_INPORT[$name]}" "${G_CERTS[$name]}"; fi
    local hwm lines
    hwm=$(mem_kib VmHWM "${pids[@]}")
    for proto in h1 h2; do
      key="$pl|$lg|$proto|$name"
      [[ ${R_STATUS[$key]:-} == ok ]] || continue
      R_HWM[$key]=$hwm
      if ! kill -0 "${G_PID[$name]}" 2>/dev/null; then fail_cell "$key" crashed; warn "$name exited during the run (see $RUN_DIR/${G_TAG[$name]}.*)"; fi
    done
    stop_proc "${G_PID[$name]}"
    lines=$(( ${G_CUT[$name]:-0} + $(access_log_lines "${G_LOG[$name]}") ))
    for proto in h1 h2; do R_LOGLINES["$pl|$lg|$proto|$name"]=$lines; done
  done
}

# handshakes NAME PID PORT CERT_DIR : full mTLS handshakes (client certificate included)
# with openssl s_time against Spur's TLS listener: the rate and Spur's CPU per handshake.
handshakes() {
  local name=$1 pid=$2 port=$3 dir=$4 pids=() out n
  out="$RUN_DIR/$(file_tag "$name").s_time.txt"
  log "$name: full mTLS handshakes with openssl s_time, ${HS_DURATION}s"
  mapfile -t pids < <(proc_tree "$pid")
  counters_start "${pids[@]}"
  run_fg "${ON_LOAD_CPUS[@]}" timeout --kill-after=5 $((HS_DURATION + 30)) \
    openssl s_time -connect "127.0.0.1:$port" -new -time "$HS_DURATION" \
    -cert "$dir/outbound.crt" -key "$dir/outbound.key" -CAfile "$dir/ca.crt" >"$out" 2>&1 \
    || warn "openssl s_time exited non-zero ($out)"
  counters_stop
  # "N connections in T.TTs; ..." then "N connections in S real seconds, ..."
  n=$(awk '/connections in [0-9]+ real seconds/ { print $1; exit }' "$out")
  if [[ -n $n && $n -gt 0 ]]; then
    R_HS_RATE[$name]=$(awk -v n="$n" -v d="$HS_DURATION" 'BEGIN { printf "%.0f", n / d }')
    R_HS_CPU[$name]=$(per_req "$C_PROC_US" "$n" 0)
  else
    warn "$name: no handshake completed (see $out)"
  fi
}

# memory KIND NAME PROTO [BIN] : RSS after start (idle), then with MEM_CONNS idle keep-alive
# connections (HTTP/1.1 or, PROTO h2, HTTP/2 with prior knowledge) that each made one
# request (held by helper.py on the load CPU). Results are keyed "NAME|PROTO".
memory() {
  local kind=$1 name=$2 proto=$3 bin=${4:-} tag pids=() ready hpid i key port h2=()
  key="$name|$proto"
  [[ $proto == h2 ]] && h2=(--h2)
  tag=$(file_tag "memory|$name|$proto")
  log "memory: $name, idle and with $MEM_CONNS idle keep-alive $(proto_label "$proto") connections"
  MEM_ORDER+=("$key")
  if ! start_target "$kind" "$tag" off "$bin"; then stop_proc "$T_PID"; R_MEM_OK[$key]="did not start"; FAILED=1; return 0; fi
  mapfile -t pids < <(proc_tree "$T_PID")
  R_MEM_IDLE[$key]=$(mem_kib VmRSS "${pids[@]}")
  port=$T_PORT
  if [[ $proto == h2 ]]; then
    if [[ -z $T_H2URL ]]; then R_MEM_OK[$key]=${T_H2NOTE:-no h2c}; stop_proc "$T_PID"; return 0; fi
    port=${T_H2URL%/}; port=${port##*:}   # h2c may have a port of its own (nginx, HAProxy)
  fi
  ready="$WORK/$tag.ready"
  "${ON_LOAD_CPUS[@]}" python3 "$SCRIPT_DIR/lib/helper.py" hold --port "$port" "${h2[@]}" \
    --conns "$MEM_CONNS" --ready-file "$ready" --max-seconds 90 >"$RUN_DIR/$tag.hold.log" 2>&1 &
  hpid=$!
  for ((i = 0; i < 1200; i++)); do
    [[ -f $ready ]] && break
    kill -0 "$hpid" 2>/dev/null || break
    sleep 0.05
  done
  if [[ -f $ready ]]; then
    # The same pause for every proxy, so that one which frees what an idle connection
    # holds (Spur parks an HTTP/1.1 connection idle for 250 ms, then gives memory back) is measured
    # idle, as a sidecar spends most of its connections' lives.
    sleep "$MEM_SETTLE"
    R_MEM_CONN[$key]=$(mem_kib VmRSS "${pids[@]}")
    R_MEM_OK[$key]=$(awk '$1 == "ok" { print $2 }' "$ready")
    cp "$ready" "$RUN_DIR/$tag.ready.txt"
    if [[ ${R_MEM_OK[$key]} != "$MEM_CONNS" ]]; then
      FAILED=1; warn "memory: $name ($proto) answered ${R_MEM_OK[$key]} of $MEM_CONNS requests (see $tag.ready.txt)"
    fi
  else
    R_MEM_OK[$key]="helper failed (see $tag.hold.log)"; FAILED=1
  fi
  stop_proc "$hpid"
  stop_proc "$T_PID"
}

# startup NAME BIN : STARTUP_RUNS starts of `spur proxy`, each timed from the fork to the
# first 200 from /ready (helper.py polls from the load CPU); the median.
startup() {
  local name=$1 bin=$2 tag port admin out sub=(proxy)
  [[ $(basename "$bin") == spur-proxy* ]] && sub=()
  tag=$(file_tag "startup|$name")
  log "startup: $name, $STARTUP_RUNS runs to /ready"
  free_port port; free_port admin
  write_spur_conf "$RUN_DIR/$tag.yaml" "$port" "$admin" "$bin"
  out="$RUN_DIR/$tag.txt"
  # shellcheck disable=SC2046
  if run_fg "${ON_LOAD_CPUS[@]}" env -u RUST_LOG $(spur_env off) python3 "$SCRIPT_DIR/lib/helper.py" startup \
      --admin-port "$admin" --runs "$STARTUP_RUNS" --cpus "$PROXY_CPUS" --log-prefix "$RUN_DIR/$tag" \
      -- "$bin" "${sub[@]}" --config "$RUN_DIR/$tag.yaml" >"$out" 2>&1; then
    R_START_MED[$name]=$(awk '$1 == "median_ms" { print $2 }' "$out")
    R_START_MIN[$name]=$(awk '$1 == "min_ms" { print $2 }' "$out")
    R_START_RUNS[$name]=$(awk '$1 == "runs_ms" { print $2 }' "$out")
  else
    R_START_MED[$name]=failed; FAILED=1; warn "startup of $name failed (see $out)"
  fi
}

# --------------------------------------------------------------------- run --
LOAD1=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$LOAD1" 'BEGIN { exit !(l > 0.5) }'; then
  warn "load average is $LOAD1 before the run: numbers may be noisy"
fi
log "results: $RUN_DIR (proxy on CPU $PROXY_CPUS, load generator on CPU $LOAD_CPUS; $PROXY_WORKERS worker(s) per proxy)"
for ((i = 0; i < ${#SPUR_INFO[@]}; i++)); do
  log "Spur${SPUR_LABELS[$i]:+ [${SPUR_LABELS[$i]}]}: ${SPUR_INFO[$i]}"
done
START_TS=$(date +%s)

start_origin
PROXY_KINDS=()
for t in "${TARGET_LIST[@]}"; do [[ $t == spur || $t == haproxy || $t == nginx ]] && PROXY_KINDS+=("$t"); done
MESH_KINDS=()
for t in "${TARGET_LIST[@]}"; do [[ $t == spur-* ]] && MESH_KINDS+=("$t"); done

for pl in "${PLACEMENT_LIST[@]}"; do
  repin "$(origin_cpus "$pl")" "$ORIGIN_PID"
  if want direct && want_proto h1; then
    log "$pl: direct"
    measure "$pl|-|h1|direct" h1 "http://127.0.0.1:$ORIGIN_PORT/"
    lpl=$(lat_placement "$pl")
    [[ -n $lpl ]] && latency "$lpl|-|direct" "http://127.0.0.1:$ORIGIN_PORT/" "$pl"
  fi
  for lg in "${LOG_LIST[@]}"; do
    entries=()
    for kind in "${PROXY_KINDS[@]}"; do
      if [[ $kind == spur ]]; then
        for ((i = 0; i < ${#SPUR_BINS[@]}; i++)); do
          entries+=("spur|$(spur_name spur "${SPUR_LABELS[$i]}")|${SPUR_BINS[$i]}")
        done
      else
        entries+=("$kind|$kind|")
      fi
    done
    if [[ ${#entries[@]} -gt 0 ]]; then group "$pl" "$lg" "${entries[@]}"; fi
  done
done

# Mesh hops: the proxy alone on its core, HTTP/1.1 clients, one access-log setting.
repin "$LOAD_CPUS" "$ORIGIN_PID"
LAT_FIRST=alone
for kind in "${MESH_KINDS[@]}"; do
  for ((i = 0; i < ${#SPUR_BINS[@]}; i++)); do
    name=$(spur_name "$kind" "${SPUR_LABELS[$i]}")
    MESH_ORDER+=("$name")
    group alone "$MESH_LOG" "$kind|$name|${SPUR_BINS[$i]}"
  done
done

if [[ $MEM_CONNS -gt 0 ]]; then
  for proto in h1 h2; do
    want_proto "$proto" || continue
    for kind in "${PROXY_KINDS[@]}"; do
      if [[ $kind == spur ]]; then
        for ((i = 0; i < ${#SPUR_BINS[@]}; i++)); do memory spur "$(spur_name spur "${SPUR_LABELS[$i]}")" "$proto" "${SPUR_BINS[$i]}"; done
      else
        memory "$kind" "$kind" "$proto"
      fi
    done
  done
fi
if [[ $STARTUP_RUNS -gt 0 ]] && wants_spur; then
  for ((i = 0; i < ${#SPUR_BINS[@]}; i++)); do startup "$(spur_name spur "${SPUR_LABELS[$i]}")" "${SPUR_BINS[$i]}"; done
fi
ELAPSED=$(( $(date +%s) - START_TS ))

REPORT="$RUN_DIR/report.md"
write_report >"$REPORT"
cp "$REPORT" "$RESULTS_DIR/latest.md"
echo
cat "$REPORT"
echo
log "written: $RESULTS_DIR/latest.md (run took ${ELAPSED}s)"
exit "$FAILED"

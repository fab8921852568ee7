#!/usr/bin/env bash
# Where a proxy's time goes under the benchmark's load: `perf record` on the proxy (Spur by
# default) while wrk (or h2load) drives it as in run.sh, then a flame graph (SVG, with
# inferno), the folded stacks and a `perf report` text summary of the top symbols.
# Placement, worker count, access log and origin are run.sh's. 127.0.0.1 only; bounded.
# Usage: benches/profile.sh --help
set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=lib/common.sh
source "$SCRIPT_DIR/lib/common.sh"
# shellcheck source=lib/targets.sh
source "$SCRIPT_DIR/lib/targets.sh"

SPUR_BIN=${SPUR_BIN:-$REPO_ROOT/target/release/spur}
TARGET=${TARGET:-spur}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
PLACEMENT=${PLACEMENT:-alone}
LOG=${LOG:-off}
PROTO=${PROTO:-h1}
CONNECTIONS=${CONNECTIONS:-50}
H2_CLIENTS=${H2_CLIENTS:-10}
H2_STREAMS=${H2_STREAMS:-10}
FREQ=${FREQ:-249}
CALL_GRAPH=${CALL_GRAPH:-dwarf}
STACK_BYTES=${STACK_BYTES:-65528}   # stack copied per sample for DWARF unwinding (perf's maximum)
PROXY_CPUS=${PROXY_CPUS:-}
LOAD_CPUS=${LOAD_CPUS:-}
PROXY_WORKERS=${PROXY_WORKERS:-1}
RESULTS_DIR=${RESULTS_DIR:-$SCRIPT_DIR/results}
INSTALL=${INSTALL:-1}

usage() {
  cat <<EOF
Usage: benches/profile.sh [options]

Runs one proxy under load as benches/run.sh does and samples it with perf record for
--duration seconds. Writes to benches/results/profile-<timestamp>/:
  flame.svg          the flame graph (open it in a browser; click to zoom)
  stacks.folded      the folded stacks (inferno-collapse-perf), input of flame.svg
  perf-report.txt    perf report: the top symbols by their own samples, then with children
  perf.data          the raw samples (perf report -i perf.data)
and the load generator's output and the proxy's config.

Options (environment variable in brackets):
  --spur-bin PATH       Spur binary [SPUR_BIN=target/release/spur]
  --target NAME         spur, haproxy or nginx [TARGET=$TARGET]
  --duration N          seconds sampled [DURATION=$DURATION]
  --warmup N            seconds of load before sampling [WARMUP=$WARMUP]
  --placement P         alone or shared, as in run.sh [PLACEMENT=$PLACEMENT]
  --log off|on          the proxy's access log [LOG=$LOG]
  --protocol h1|h2      wrk (HTTP/1.1, -c$CONNECTIONS) or h2load (h2c, -c$H2_CLIENTS -m$H2_STREAMS) [PROTO=$PROTO]
  --freq HZ             samples per second [FREQ=$FREQ]
  --call-graph MODE     dwarf (works without frame pointers; default) or fp [CALL_GRAPH=$CALL_GRAPH]
  --stack-bytes N       dwarf: stack bytes copied per sample; Spur's futures are large, and
                        less than the maximum leaves many stacks cut short [STACK_BYTES=$STACK_BYTES]
  --proxy-cpus LIST     [PROXY_CPUS, default: last allowed CPU]
  --load-cpus LIST      [LOAD_CPUS, default: first allowed CPU]
  --workers N           [PROXY_WORKERS=$PROXY_WORKERS]
  --no-install          never install (apt-get for wrk/nginx/perf, cargo install inferno)
  -h, --help            this text
EOF
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --spur-bin) SPUR_BIN=${2:?}; shift ;;
    --target) TARGET=${2:?}; shift ;;
    --duration) DURATION=${2:?}; shift ;;
    --warmup) WARMUP=${2:?}; shift ;;
    --placement) PLACEMENT=${2:?}; shift ;;
    --log) LOG=${2:?}; shift ;;
    --protocol) PROTO=${2:?}; shift ;;
    --freq) FREQ=${2:?}; shift ;;
    --call-graph) CALL_GRAPH=${2:?}; shift ;;
    --stack-bytes) STACK_BYTES=${2:?}; shift ;;
    --proxy-cpus) PROXY_CPUS=${2:?}; shift ;;
    --load-cpus) LOAD_CPUS=${2:?}; shift ;;
    --workers) PROXY_WORKERS=${2:?}; shift ;;
    --no-install) INSTALL=0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "profile.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

DURATION=$(to_secs "$DURATION"); WARMUP=$(to_secs "$WARMUP")
[[ $DURATION -ge 1 ]] || die "--duration must be at least 1s"
case $TARGET in spur|haproxy|nginx) ;; *) die "--target must be spur, haproxy or nginx" ;; esac
case $PLACEMENT in alone|shared) ;; *) die "--placement must be alone or shared" ;; esac
case $LOG in off|on) ;; *) die "--log must be off or on" ;; esac
case $PROTO in h1|h2) ;; *) die "--protocol must be h1 or h2" ;; esac
case $CALL_GRAPH in dwarf) CG=(--call-graph "dwarf,$STACK_BYTES") ;; fp) CG=(-g) ;; *) die "--call-graph must be dwarf or fp" ;; esac
[[ $FREQ =~ ^[1-9][0-9]*$ && $PROXY_WORKERS =~ ^[1-9][0-9]*$ ]] || die "--freq and --workers take a positive number"
[[ $STACK_BYTES =~ ^[0-9]+$ && $STACK_BYTES -ge 1024 && $STACK_BYTES -le 65528 ]] || die "--stack-bytes must be 1024..65528"
[[ $TARGET != spur || -x $SPUR_BIN ]] || die "Spur binary not found at $SPUR_BIN (build it, or give --spur-bin)"

# ------------------------------------------------------------ dependencies --
missing=()
command -v perf >/dev/null || missing+=(linux-perf)
command -v wrk >/dev/null || missing+=(wrk)
[[ $PROTO == h2 ]] && ! command -v h2load >/dev/null && missing+=(nghttp2-client)
[[ -x $NGINX_BIN ]] || missing+=(nginx)
[[ $TARGET == haproxy && ! -x $HAPROXY_BIN ]] && missing+=(haproxy)
command -v curl >/dev/null || missing+=(curl)
if [[ ${#missing[@]} -gt 0 ]]; then
  [[ $INSTALL == 1 ]] || die "missing packages: ${missing[*]} (run: apt-get install -y ${missing[*]})"
  log "installing: ${missing[*]}"
  SUDO=(); [[ $(id -u) -eq 0 ]] || SUDO=(sudo)
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || die "apt-get update failed"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
  NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
  HAPROXY_BIN=$(command -v haproxy || echo /usr/sbin/haproxy)
fi
PATH=$PATH:$HOME/.cargo/bin
if ! command -v inferno-flamegraph >/dev/null && [[ $INSTALL == 1 ]] && command -v cargo >/dev/null; then
  log "installing inferno from crates.io (cargo install inferno --locked; a few minutes, once)"
  nice cargo install inferno --locked >&2 || warn "cargo install inferno failed: no SVG, only perf-report.txt"
fi

# ------------------------------------------------------------- placement --
read -r -a ALLOWED <<<"$(allowed_cpus)"
[[ ${#ALLOWED[@]} -ge 2 ]] || die "needs at least 2 CPUs (${#ALLOWED[@]} allowed)"
[[ -n $PROXY_CPUS ]] || PROXY_CPUS=${ALLOWED[-1]}
[[ -n $LOAD_CPUS ]] || LOAD_CPUS=${ALLOWED[0]}
# shellcheck disable=SC2034  # used by targets.sh
ON_PROXY_CPUS=(taskset -c "$PROXY_CPUS")
ON_LOAD_CPUS=(taskset -c "$LOAD_CPUS")

mkdir -p "$RESULTS_DIR"
RUN_DIR="$RESULTS_DIR/profile-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RUN_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/spur-profile.XXXXXX")
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------- run --
log "results: $RUN_DIR ($TARGET, placement $PLACEMENT, access log $LOG, $PROTO, ${DURATION}s at ${FREQ} Hz, call graph $CALL_GRAPH)"
start_origin
[[ $PLACEMENT == shared ]] && repin "$PROXY_CPUS" "$ORIGIN_PID"
start_target "$TARGET" "$TARGET" "$LOG" "$SPUR_BIN" || die "$TARGET did not start (see $RUN_DIR/$TARGET.*)"
PID=$T_PID
URL=$T_URL
if [[ $PROTO == h2 ]]; then
  [[ -n $T_H2URL ]] || die "$TARGET: $T_H2NOTE"
  URL=$T_H2URL
fi

# load for warm-up + sampling + 1 s of margin, in the background; sample while it runs
total=$((WARMUP + DURATION + 1))
if [[ $PROTO == h1 ]]; then
  "${ON_LOAD_CPUS[@]}" timeout --kill-after=5 $((total + 30)) \
    wrk -t1 -c"$CONNECTIONS" -d"${total}s" --timeout 5s --latency "$URL" >"$RUN_DIR/load.txt" 2>&1 &
else
  "${ON_LOAD_CPUS[@]}" timeout --kill-after=5 $((total + 30)) \
    h2load -t1 -c"$H2_CLIENTS" -m"$H2_STREAMS" -D "$total" "$URL" >"$RUN_DIR/load.txt" 2>&1 &
fi
LOAD_PID=$!
ALL_PIDS+=("$LOAD_PID")
# the warm-up is the load generator's own first seconds: perf waits them out (-D)
log "sampling $TARGET (pid $PID) for ${DURATION}s after ${WARMUP}s of warm-up"
mapfile -t pids < <(proc_tree "$PID")
run_fg "${ON_LOAD_CPUS[@]}" timeout --kill-after=5 $((WARMUP + DURATION + 60)) \
  perf record -F "$FREQ" "${CG[@]}" -D $((WARMUP * 1000)) -p "$(join_by_comma "${pids[@]}")" \
  -o "$RUN_DIR/perf.data" -- sleep $((WARMUP + DURATION)) >"$RUN_DIR/perf-record.log" 2>&1 \
  || { cat "$RUN_DIR/perf-record.log" >&2; die "perf record failed"; }
wait "$LOAD_PID" || warn "the load generator exited non-zero (see $RUN_DIR/load.txt)"
stop_proc "$PID"

# --------------------------------------------------------------- outputs --
log "perf report"
{
  echo "# self time: the symbols the samples were in ([k] kernel, [.] user space)"
  perf report -i "$RUN_DIR/perf.data" --no-children --sort dso,symbol --stdio -g none --percent-limit 0.3 \
    2>/dev/null | grep -E '^ +[0-9]' | head -n 80 || true
  echo
  echo "# with children: time in the symbol and everything it called"
  perf report -i "$RUN_DIR/perf.data" --children --sort symbol --stdio -g none --percent-limit 2 \
    2>/dev/null | grep -E '^ +[0-9]' | head -n 80 || true
} | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' >"$RUN_DIR/perf-report.txt"
if command -v inferno-collapse-perf >/dev/null && command -v inferno-flamegraph >/dev/null; then
  log "flame graph"
  perf script -i "$RUN_DIR/perf.data" 2>/dev/null | inferno-collapse-perf >"$RUN_DIR/stacks.folded"
  inferno-flamegraph --title "$TARGET: $PLACEMENT, access log $LOG, $PROTO ($(date -u '+%Y-%m-%d %H:%M UTC'))" \
    <"$RUN_DIR/stacks.folded" >"$RUN_DIR/flame.svg"
else
  warn "inferno is not installed (cargo install inferno): no flame.svg; see perf-report.txt"
fi

grep -E 'Requests/sec|finished in' "$RUN_DIR/load.txt" >&2 || true
log "top symbols (self):"
sed -n '2,16p' "$RUN_DIR/perf-report.txt" >&2
log "written: $RUN_DIR/{flame.svg,stacks.folded,perf-report.txt,perf.data}"

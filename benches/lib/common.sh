# shellcheck shell=bash disable=SC2034
# Shared by run.sh and profile.sh: logging, CPU lists, ports, the processes a run starts,
# /proc readings, perf counters and the two load generators (wrk for HTTP/1.1, h2load for
# HTTP/2). Sourced, not run; the caller sets RUN_DIR and WORK and installs `cleanup` as
# its EXIT trap, so that every process started here is stopped however the run ends.

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
allowed_cpus() { expand_cpus "$(awk '/^Cpus_allowed_list/ {print $2}' /proc/self/status)"; }

# ------------------------------------------------------------------- ports --
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

# --------------------------------------------------------------- processes --
ALL_PIDS=()
LAST_PID=
FG_PID=
# start_proc NAME CMD... : background process, stdout/stderr into the run dir (opened to
# append, so that a log cut between rounds starts again at its beginning, see cut_log).
start_proc() {
  local name=$1; shift
  "$@" >>"$RUN_DIR/$name.stdout.log" 2>>"$RUN_DIR/$name.stderr.log" &
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
# run_fg CMD... : a bounded command in the background + wait, so that a signal to the
# script is handled at once (and cleanup stops it).
run_fg() {
  "$@" &
  FG_PID=$!
  local rc=0
  wait "$FG_PID" || rc=$?
  FG_PID=
  return "$rc"
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n ${FG_PID:-} ]]; then stop_proc "$FG_PID"; fi
  counters_abort
  for pid in "${ALL_PIDS[@]}"; do stop_proc "$pid"; done
  rm -rf "$WORK"
  exit "$rc"
}

# wait_ok NAME URL PID [h2|h1 [TRIES]] : until URL answers 200 with the origin's body (TRIES
# tries 0.1 s apart, default 150); with "h2", over HTTP/2 with prior knowledge (h2c).
wait_ok() {
  local name=$1 url=$2 pid=$3 h2=${4:-} tries=${5:-150} i code opts=()
  [[ $h2 == h2 ]] && opts=(--http2-prior-knowledge)
  for ((i = 0; i < tries; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      warn "$name exited during start-up; last lines of its logs:"
      tail -n 20 "$RUN_DIR/$name".std*.log >&2 || true
      return 1
    fi
    code=$(curl --noproxy '*' "${opts[@]}" -s -m 1 -o "$WORK/probe.body" -w '%{http_code}' "$url" 2>/dev/null || true)
    if [[ $code == 200 ]] && cmp -s "$WORK/probe.body" "$WORK/expected.body"; then
      return 0
    fi
    sleep 0.1
  done
  warn "$name did not answer 200 with the origin body at $url${h2:+ ($h2)} after $tries tries (last status: ${code:-none})"
  return 1
}

# repin CPU-LIST PID : move a process, its threads and its child processes to CPU-LIST.
repin() {
  local cpu_list=$1 p
  for p in $(proc_tree "$2"); do
    taskset -a -p -c "$cpu_list" "$p" >/dev/null 2>&1 || warn "taskset -a -p -c $cpu_list $p failed"
  done
}

# ------------------------------------------------------------------- /proc --
CLK_TCK=$(getconf CLK_TCK)
# stat_sum "INDEXES" PIDS... : the sum of /proc/PID/stat's fields at INDEXES (counted from
# the state field, 0) over the PIDs given; each PID's figures cover all its threads.
stat_sum() {
  local want=$1 total=0 pid line rest fields=() i
  shift
  for pid in "$@"; do
    line=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
    rest=${line##*) }            # fields after "(comm)": state is index 0
    read -r -a fields <<<"$rest"
    for i in $want; do total=$((total + fields[i])); done
  done
  echo "$total"
}
cpu_ticks() { stat_sum "11 12" "$@"; }     # utime+stime (clock ticks): fields 14 and 15
kernel_ticks() { stat_sum "12" "$@"; }     # stime alone: time in the kernel on their behalf
# page faults, minor + major (fields 10 and 12): on a VM one can cost microseconds, and no
# system call counts it
page_faults() { stat_sum "7 9" "$@"; }
# cpu_steal CPU-LIST -> steal time (clock ticks) of those CPUs so far (/proc/stat): time the
# hypervisor ran something else while the guest had work on them. perf's task-clock counts
# it as the task's; /proc's utime+stime leave it out.
cpu_steal() {
  awk -v want=" $(expand_cpus "$1") " '$1 ~ /^cpu[0-9]/ && index(want, " " substr($1, 4) " ") { n += $9 } END { print n + 0 }' /proc/stat
}
ctx_switches() {   # voluntary + involuntary context switches, every thread of the PIDs given
  local pid
  for pid in "$@"; do
    cat /proc/"$pid"/task/*/status 2>/dev/null
  done | awk '$1 == "voluntary_ctxt_switches:" || $1 == "nonvoluntary_ctxt_switches:" { n += $2 } END { print n + 0 }'
}
mem_kib() {     # mem_kib FIELD PIDS... : sum of /proc/PID/status FIELD (kB)
  local field=$1 total=0 pid v; shift
  for pid in "$@"; do
    v=$(awk -v f="$field:" '$1 == f {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}
thread_count() {  # threads over the PIDs given
  local total=0 pid v
  for pid in "$@"; do
    v=$(awk '$1 == "Threads:" {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# ---------------------------------------------------------------- counters --
# counters_start PIDS... / counters_stop: CPU time, context switches and system calls of
# those processes (all their threads) over the measured window only. With perf (USE_PERF=1)
# `perf stat -p` is started with its events disabled and switched on and off through a
# control FIFO with acknowledgement, so the window is exact; /proc utime+stime is read as
# well (the cross-check, and the fallback when perf is unusable). counters_stop sets
# C_TASK_US (perf's task-clock, µs; /proc's without perf), C_CSW, C_SYS ("-" if unknown),
# C_PROC_US (/proc's utime+stime, µs), C_KERNEL_US (/proc's stime alone), C_FAULTS (page
# faults), C_STEAL_US (steal time of the proxy CPUs, µs) and
# C_WALL_US (the window's length).
PERF_PID=
COUNTER_PIDS=()
USE_PERF=${USE_PERF:-1}
counters_start() {
  COUNTER_PIDS=("$@")
  C_T0=$(cpu_ticks "$@")
  C_K0=$(kernel_ticks "$@")
  C_F0=$(page_faults "$@")
  C_STEAL0=$(cpu_steal "$PROXY_CPUS")
  C_CSW0=$(ctx_switches "$@")
  C_WALL0=$(date +%s%N)
  PERF_PID=
  [[ $USE_PERF == 1 ]] || return 0
  rm -f "$WORK/perf.ctl" "$WORK/perf.ack" "$WORK/perf.csv"
  mkfifo "$WORK/perf.ctl" "$WORK/perf.ack"
  exec 7<>"$WORK/perf.ctl" 8<>"$WORK/perf.ack"
  "${ON_LOAD_CPUS[@]}" perf stat -x, -o "$WORK/perf.csv" -D -1 --control fd:7,8 \
    -e task-clock,context-switches,raw_syscalls:sys_enter -p "$(join_by_comma "$@")" \
    >/dev/null 2>"$WORK/perf.err" &
  PERF_PID=$!
  local ack=""
  echo enable >&7
  if ! read -r -t 10 -u 8 ack || [[ $ack != ack ]]; then
    warn "perf stat did not start (see below); falling back to /proc for the rest of the run"
    cat "$WORK/perf.err" >&2 || true
    counters_abort
    USE_PERF=0
  fi
}
counters_stop() {
  local ack="" t1 n
  if [[ -n $PERF_PID ]]; then
    echo disable >&7
    read -r -t 10 -u 8 ack || true
  fi
  t1=$(cpu_ticks "${COUNTER_PIDS[@]}")
  C_STEAL_US=$(awk -v d=$(($(cpu_steal "$PROXY_CPUS") - C_STEAL0)) -v hz="$CLK_TCK" 'BEGIN { printf "%.0f", d / hz * 1e6 }')
  C_WALL_US=$(( ($(date +%s%N) - C_WALL0) / 1000 ))
  C_PROC_US=$(awk -v d=$((t1 - C_T0)) -v hz="$CLK_TCK" 'BEGIN { printf "%.0f", d / hz * 1e6 }')
  C_KERNEL_US=$(awk -v d=$(($(kernel_ticks "${COUNTER_PIDS[@]}") - C_K0)) -v hz="$CLK_TCK" 'BEGIN { printf "%.0f", d / hz * 1e6 }')
  C_FAULTS=$(( $(page_faults "${COUNTER_PIDS[@]}") - C_F0 ))
  C_TASK_US=$C_PROC_US
  C_CSW=$(( $(ctx_switches "${COUNTER_PIDS[@]}") - C_CSW0 ))
  C_SYS=-
  if [[ -n $PERF_PID ]]; then
    kill -INT "$PERF_PID" 2>/dev/null || true
    wait "$PERF_PID" 2>/dev/null || true
    PERF_PID=
    exec 7>&- 8>&-
    # CSV: value,unit,event,...  task-clock is in msec
    n=$(awk -F, '$3 == "task-clock" && $1 ~ /^[0-9.]+$/ { printf "%.0f", $1 * 1000 }' "$WORK/perf.csv")
    [[ -n $n ]] && C_TASK_US=$n
    n=$(awk -F, '$3 == "context-switches" && $1 ~ /^[0-9]+$/ { print $1 }' "$WORK/perf.csv")
    [[ -n $n ]] && C_CSW=$n
    n=$(awk -F, '$3 == "raw_syscalls:sys_enter" && $1 ~ /^[0-9]+$/ { print $1 }' "$WORK/perf.csv")
    [[ -n $n ]] && C_SYS=$n
  fi
}
counters_abort() {
  if [[ -n ${PERF_PID:-} ]]; then
    kill -INT "$PERF_PID" 2>/dev/null || true
    wait "$PERF_PID" 2>/dev/null || true
    PERF_PID=
    exec 7>&- 8>&- || true
  fi
}
# per_req TOTAL REQUESTS [DECIMALS] -> TOTAL/REQUESTS, or "-"
per_req() {
  if [[ ${1:--} == - || ${2:-0} == 0 || ${2:--} == - ]]; then echo -; return; fi
  awk -v a="$1" -v n="$2" -v d="${3:-2}" 'BEGIN { printf "%.*f", d, a / n }'
}

# ---------------------------------------------------------- load generators --
# run_wrk OUTFILE CPU-LIST CONNECTIONS SECONDS URL : one wrk thread.
run_wrk() {
  local out=$1 on=$2 c=$3 d=$4 url=$5 prefix=()
  [[ -n $on ]] && prefix=(taskset -c "$on")
  run_fg "${prefix[@]}" timeout --kill-after=5 $((d + 30)) \
    wrk -t1 -c"$c" -d"${d}s" --timeout 5s --latency "$url" >"$out" 2>&1 \
    || warn "wrk exited non-zero ($out)"
}
# parse_wrk FILE -> "rps requests errors p50_us p99_us" (errors: socket errors + non-2xx;
# "-" where absent). wrk prints times as e.g. 850.00us, 1.23ms, 1.02s, 1.50m, 1.00h.
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
    BEGIN { rps = "-"; reqs = 0; errs = 0; p50 = "-"; p99 = "-" }
    $1 == "Requests/sec:" { rps = $2 }
    $2 == "requests" && $3 == "in" { reqs = $1 }
    $1 == "50%" { p50 = us($2) }
    $1 == "99%" { p99 = us($2) }
    /^ *Socket errors:/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) { x = $i; sub(/,/, "", x); errs += x } }
    /^ *Non-2xx or 3xx responses:/ { errs += $NF }
    END { printf "%s %s %s %s %s\n", rps, reqs, errs, p50, p99 }
  ' "$1"
}
# run_h2load OUTFILE CPU-LIST CLIENTS STREAMS SECONDS URL : HTTP/2 with prior knowledge
# (h2c), one thread.
run_h2load() {
  local out=$1 on=$2 c=$3 m=$4 d=$5 url=$6 prefix=()
  [[ -n $on ]] && prefix=(taskset -c "$on")
  run_fg "${prefix[@]}" timeout --kill-after=5 $((d + 30)) \
    h2load -t1 -c"$c" -m"$m" -D "$d" "$url" >"$out" 2>&1 \
    || warn "h2load exited non-zero ($out)"
}
# parse_h2load FILE -> "rps requests errors": requests = succeeded; errors = failed
# requests, or the responses that were not 2xx if more.
parse_h2load() {
  awk '
    BEGIN { rps = "-"; ok = 0; errs = 0; done = 0; s2 = 0 }
    $1 == "finished" && $2 == "in" { for (i = 1; i < NF; i++) if ($(i + 1) ~ /^req\/s/) { rps = $i; sub(/,$/, "", rps) } }
    $1 == "requests:" {
      for (i = 2; i < NF; i++) {
        v = $i + 0; w = $(i + 1); sub(/,$/, "", w)
        if (w == "done") done = v
        if (w == "succeeded") ok = v
        if (w == "failed") errs = v
      }
    }
    $1 == "status" && $2 == "codes:" { s2 = $3 + 0 }
    END { if (done - s2 > errs) errs = done - s2; printf "%s %s %s\n", rps, ok, errs }
  ' "$1"
}

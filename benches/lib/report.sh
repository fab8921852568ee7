# shellcheck shell=bash
# The Markdown report of run.sh, from the result arrays it fills (R_*, keyed
# "PLACEMENT|LOG|PROTO|NAME" for throughput cells, "LATPL|LOG|NAME" for latency, NAME for
# memory and startup). Sourced by run.sh; write_report prints to stdout.

dash() { [[ -z ${1:-} || $1 == - ]] && echo "—" || echo "$1"; }
fmt_int() { [[ -z ${1:-} || $1 == - ]] && echo "—" || awk -v v="$1" 'BEGIN { printf "%.0f", v }'; }
fmt_us()  { [[ -z ${1:-} || $1 == - ]] && echo "—" || awk -v v="$1" 'BEGIN { printf "%.0f µs", v }'; }
fmt_mib() { [[ -z ${1:-} || $1 == - ]] && echo "—" || awk -v v="$1" 'BEGIN { printf "%.1f", v / 1024 }'; }
delta_us() {  # delta_us VALUE BASE
  if [[ -z ${1:-} || -z ${2:-} || $1 == - || $2 == - ]]; then echo "—"; else
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.0f µs", a - b }'; fi
}
ratio() {     # ratio A B -> "0.57×"
  if [[ -z ${1:-} || -z ${2:-} || $1 == - || $2 == - ]]; then echo "—"; else
    awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "—"; else printf "%.2f×", a / b }'; fi
}
proto_label() { if [[ $1 == h1 ]]; then echo "HTTP/1.1"; else echo "HTTP/2"; fi; }
is_mesh() { [[ $1 == spur-mtls* || $1 == spur-h3* || $1 == spur-2hop* ]]; }

bin_info() {   # bin_info PATH [COPY] -> "`PATH` (N MB, modified T, sha256 X…)", read from COPY
  local b=${2:-$1} size sha when
  size=$(stat -c %s "$b" 2>/dev/null || echo 0)
  when=$(date -u -r "$b" '+%Y-%m-%d %H:%M UTC' 2>/dev/null || echo '?')
  sha=$(sha256sum "$b" 2>/dev/null | cut -c1-12)
  echo "\`$1\` ($((size / 1048576)) MB, modified $when, sha256 $sha…, $(layout_info "$b"))"
}
# layout_info BIN -> how many of proxy/link/hot-symbols.txt's proxy functions BIN has: a
# build whose names no longer match the list runs without its code laid out by use, and
# its CPU and RSS are not a release's (benches/README.md, hot-symbols.sh).
layout_info() {
  local list=$REPO_ROOT/proxy/link/hot-symbols.txt total found
  [[ -f $list ]] && command -v nm >/dev/null || { echo "hot-code list not checked"; return; }
  total=$(grep -c '^_ZN10spur_proxy' "$list" || true)
  found=$(nm "$1" 2>/dev/null | awk '$NF ~ /^_ZN10spur_proxy/ {print $NF}' | sort -u \
    | comm -12 - <(grep '^_ZN10spur_proxy' "$list" | sort -u) | wc -l)
  if ((total > 0 && found * 2 < total)); then
    warn "$1 has $found of the hot-code list's $total proxy functions: its code is not laid out by use (regenerate with benches/hot-symbols.sh, build spur-proxy with spur)"
    echo "**hot-code list: $found of $total proxy functions — not laid out by use**"
  else
    echo "hot-code list: $found of $total proxy functions"
  fi
}
bin_line() {   # bin_line INDEX
  local b=${SPUR_BINS[$1]} how="TOKIO_WORKER_THREADS=$PROXY_WORKERS (its config has no \`workers\`)"
  [[ ${SPUR_WORKERS_KEY[$b]:-no} == yes ]] && how="\`workers: $PROXY_WORKERS\` in the config and TOKIO_WORKER_THREADS=$PROXY_WORKERS"
  echo "· Spur${SPUR_LABELS[$1]:+ [${SPUR_LABELS[$1]}]}: ${SPUR_INFO[$1]}; workers: $how"
}

report_header() {
  local i
  echo "# Spur load benchmark"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC') · run took ${ELAPSED}s · load average at start $LOAD1"
  echo "· $(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo) · ${#ALLOWED[@]} CPUs · kernel $(uname -r)"
  for ((i = 0; i < ${#SPUR_INFO[@]}; i++)); do bin_line "$i"; done
  echo "· placements: **alone** = the proxy alone on CPU $PROXY_CPUS, wrk/h2load and the origin on CPU $LOAD_CPUS; **shared** = the proxy and the origin on CPU $PROXY_CPUS, wrk/h2load on CPU $LOAD_CPUS"
  echo "· $PROXY_WORKERS worker(s) per proxy (HAProxy nbthread, nginx worker_processes)"
  echo "· HTTP/1.1: wrk -t1 -c$CONNECTIONS, ${DURATION}s; HTTP/2: h2load -t1 -c$H2_CLIENTS -m$H2_STREAMS (h2c, prior knowledge), ${DURATION}s; warm-up ${WARMUP}s after each start; all to an HTTP/1.1 nginx origin (100-byte body)"
  echo "· $ROUNDS round(s) per cell: the proxies of a placement and log setting run side by side and take turns (order reversed every other round); each cell shows its round with the median CPU µs/req"
  echo "· counters: CPU time from /proc utime+stime (the kernel leaves out steal, time the hypervisor gave away while the proxy had work); $([[ $USE_PERF == 1 ]] && echo 'perf stat -e task-clock,context-switches,raw_syscalls:sys_enter -p PROXY, enabled for the throughput run only (task-clock, which counts steal, in the details)' || echo 'voluntary+involuntary context switches from /proc (no perf: no system-call counts)')"
  echo "· $("$NGINX_BIN" -v 2>&1 | head -1); $([[ -x $HAPROXY_BIN ]] && "$HAPROXY_BIN" -v 2>/dev/null | head -1 | cut -d' ' -f1-3); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2); $(command -v h2load >/dev/null && h2load --version 2>&1 | head -1)"
  echo
}

report_main() {
  local key pl lg proto name
  echo "## Throughput and cost per request"
  echo
  echo "req/s: the client's rate over the run. CPU µs (utime+stime), syscalls and ctx sw (context switches) per request: the proxy's own, over the throughput run. Proxy CPU: the proxy's CPU time ÷ the run's length (near 100%: the proxy's core was the limit). All of these from the cell's median round. Peak RSS: VmHWM after the cell (every round and the latency run of one start). Errors: of every round."
  echo
  echo "| placement | access log | client | target | req/s | CPU µs/req | syscalls/req | ctx sw/req | proxy CPU | peak RSS MiB | errors |"
  echo "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
  for key in "${CELL_ORDER[@]}"; do
    IFS='|' read -r pl lg proto name <<<"$key"
    is_mesh "$name" && continue
    [[ $lg == - ]] && lg="—"
    if [[ ${R_STATUS[$key]:-} == ok || ${R_STATUS[$key]:-} == crashed ]]; then
      echo "| $pl | $lg | $(proto_label "$proto") | $name$([[ ${R_STATUS[$key]} == crashed ]] && echo ' (crashed)') | $(fmt_int "${R_RPS[$key]}") | $(dash "${R_CPU[$key]:-}") | $(dash "${R_SYS[$key]:-}") | $(dash "${R_CSW[$key]:-}") | $(dash "${R_UTIL[$key]:-}") | $(fmt_mib "${R_HWM[$key]:-}") | ${R_ERRS[$key]} |"
    else
      echo "| $pl | $lg | $(proto_label "$proto") | $name | ${R_STATUS[$key]:-failed}${R_NOTE[$key]:+: ${R_NOTE[$key]}} | — | — | — | — | — | — |"
    fi
  done
  echo
}

report_ratios() {
  local key pl lg proto name hk r c verdict any=0
  echo "## Spur ÷ HAProxy (same run, same cell)"
  echo
  echo "Goal (issue 13): req/s ratio ≥ 1.00× and CPU µs/req ratio ≤ 1.00× in every row."
  echo
  echo "| placement | access log | client | target | req/s ÷ HAProxy | CPU µs/req ÷ HAProxy | goal |"
  echo "|---|---|---|---|---:|---:|---|"
  for key in "${CELL_ORDER[@]}"; do
    IFS='|' read -r pl lg proto name <<<"$key"
    [[ $name == spur || $name == spur\[* ]] || continue
    hk="$pl|$lg|$proto|haproxy"
    [[ ${R_STATUS[$key]:-} == ok && ${R_STATUS[$hk]:-} == ok ]] || continue
    r=$(ratio "${R_RPS[$key]}" "${R_RPS[$hk]}"); c=$(ratio "${R_CPU[$key]:-}" "${R_CPU[$hk]:-}")
    verdict=$(awk -v a="${r%×}" -v b="${c%×}" 'BEGIN { print (a >= 1 && b <= 1) ? "met" : "not met" }')
    echo "| $pl | $lg | $(proto_label "$proto") | $name | $r | $c | $verdict |"
    any=1
  done
  [[ $any == 1 ]] || echo "| — | — | — | — | needs spur and haproxy in the same run | — | — |"
  echo
}

report_latency() {
  local key lpl lg name d hk dd haddn
  echo "## Latency at one connection"
  echo
  if [[ $LAT_PIN == same ]]; then
    echo "wrk -t1 -c1 for ${LAT_DURATION}s with wrk, the proxy and the origin all on CPU $LAT_CPU (no cross-CPU wake-ups: the proxy's own cost). Added = p50 or p99 minus direct's."
  else
    echo "wrk -t1 -c1 for ${LAT_DURATION}s in each placement. Added = p50 or p99 minus direct's in the same placement."
  fi
  echo
  echo "| placement | access log | target | p50 | p99 | p50 added | p99 added | p50 added − HAProxy's |"
  echo "|---|---|---|---:|---:|---:|---:|---:|"
  for key in "${LAT_ORDER[@]}"; do
    IFS='|' read -r lpl lg name <<<"$key"
    is_mesh "$name" && continue   # in the mesh table
    d="$lpl|-|direct"; hk="$lpl|$lg|haproxy"
    dd="—"
    if [[ $name != direct && $name != haproxy && -n ${R_LP50[$hk]:-} ]]; then
      haddn=$(awk -v a="${R_LP50[$hk]}" -v b="${R_LP50[$d]:--}" 'BEGIN { if (b == "-") print "-"; else print a - b }')
      [[ $haddn != - ]] && dd=$(delta_us "$(awk -v a="${R_LP50[$key]}" -v b="${R_LP50[$d]}" 'BEGIN { print a - b }')" "$haddn")
    fi
    if [[ $name == direct ]]; then
      echo "| $lpl | — | direct | $(fmt_us "${R_LP50[$key]}") | $(fmt_us "${R_LP99[$key]}") | — | — | — |"
    else
      echo "| $lpl | $lg | $name | $(fmt_us "${R_LP50[$key]}") | $(fmt_us "${R_LP99[$key]}") | $(delta_us "${R_LP50[$key]}" "${R_LP50[$d]:--}") | $(delta_us "${R_LP99[$key]}" "${R_LP99[$d]:--}") | $dd |"
    fi
  done
  echo
}

report_memory() {
  local key name proto
  [[ ${#MEM_ORDER[@]} -gt 0 ]] || return 0
  echo "## Memory"
  echo
  echo "RSS (VmRSS, summed over nginx's master and worker) after start and one request, then with $MEM_CONNS idle keep-alive client connections that each made one request: HTTP/1.1, or HTTP/2 with prior knowledge (one stream each); proxy alone on its core, access log off, a fresh start for each client. Goal (issue 13) for Spur: idle ≤ 8 MiB, with 1,000 connections ≤ 20 MiB."
  echo
  echo "| target | client | idle RSS MiB | RSS with $MEM_CONNS conns MiB | KiB per connection | 200s received |"
  echo "|---|---|---:|---:|---:|---:|"
  for key in "${MEM_ORDER[@]}"; do
    name=${key%|*}; proto=$(proto_label "${key##*|}")
    if [[ -n ${R_MEM_CONN[$key]:-} ]]; then
      echo "| $name | $proto | $(fmt_mib "${R_MEM_IDLE[$key]}") | $(fmt_mib "${R_MEM_CONN[$key]}") | $(awk -v a="${R_MEM_CONN[$key]}" -v b="${R_MEM_IDLE[$key]}" -v n="$MEM_CONNS" 'BEGIN { printf "%.1f", (a - b) / n }') | ${R_MEM_OK[$key]} |"
    else
      echo "| $name | $proto | $(fmt_mib "${R_MEM_IDLE[$key]:-}") | ${R_MEM_OK[$key]:-failed} | — | — |"
    fi
  done
  echo
}

report_startup() {
  local name
  [[ ${#R_START_MED[@]} -gt 0 ]] || return 0
  echo "## Startup"
  echo
  echo "Time from the fork of \`spur proxy --config …\` (on the proxy CPU) to the first 200 from \`GET /ready\` (polled every 0.2 ms from the load CPU), $STARTUP_RUNS starts after one that is not counted (it fills the page cache). Goal (issue 13): under 10 ms."
  echo
  echo "| target | median ms | fastest ms | each run, ms |"
  echo "|---|---:|---:|---|"
  for ((i = 0; i < ${#SPUR_BINS[@]}; i++)); do
    name=$(spur_name spur "${SPUR_LABELS[$i]}")
    [[ -n ${R_START_MED[$name]:-} ]] || continue
    echo "| $name | ${R_START_MED[$name]} | ${R_START_MIN[$name]:-—} | ${R_START_RUNS[$name]:-—} |"
  done
  echo
}

report_mesh() {
  local name key lk base
  [[ ${#MESH_ORDER[@]} -gt 0 ]] || return 0
  echo "## Mesh hops"
  echo
  echo "wrk → Spur listener → (mutual TLS with SPIFFE IDs checked both ways | HTTP/2 over mTLS | HTTP/3 over QUIC + mTLS | plaintext for spur-2hop) → Spur listener → origin; both sides in one Spur process, so CPU covers two hops. HTTP/1.1 clients, placement alone, access log $MESH_LOG; latency as above."
  echo
  echo "| target | req/s | p50 | p99 | CPU µs/req | syscalls/req | ctx sw/req | peak RSS MiB | errors |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  for name in "${MESH_ORDER[@]}"; do
    key="alone|$MESH_LOG|h1|$name"; lk="one CPU|$MESH_LOG|$name"
    [[ $LAT_PIN == placement ]] && lk="alone|$MESH_LOG|$name"
    if [[ ${R_STATUS[$key]:-} == ok ]]; then
      echo "| $name | $(fmt_int "${R_RPS[$key]}") | $(fmt_us "${R_LP50[$lk]:-}") | $(fmt_us "${R_LP99[$lk]:-}") | $(dash "${R_CPU[$key]:-}") | $(dash "${R_SYS[$key]:-}") | $(dash "${R_CSW[$key]:-}") | $(fmt_mib "${R_HWM[$key]:-}") | ${R_ERRS[$key]} |"
    else
      echo "| $name | ${R_STATUS[$key]:-failed} | — | — | — | — | — | — | — |"
    fi
  done
  echo
  for name in "${MESH_ORDER[@]}"; do
    [[ -n ${R_HS_RATE[$name]:-} ]] || continue
    echo "$name: full mTLS handshakes (openssl s_time -new with a client certificate, ${HS_DURATION}s, client on the load CPU): ${R_HS_RATE[$name]}/s; Spur CPU per handshake (server side): ${R_HS_CPU[$name]} µs."
  done
  for name in "${MESH_ORDER[@]}"; do
    [[ $name == spur-mtls || $name == spur-mtls\[* ]] || continue
    base=${name/spur-mtls/spur-2hop}
    if [[ ${R_STATUS["alone|$MESH_LOG|h1|$base"]:-} == ok && ${R_STATUS["alone|$MESH_LOG|h1|$name"]:-} == ok ]]; then
      echo "$name: mTLS costs $(awk -v a="${R_CPU["alone|$MESH_LOG|h1|$name"]}" -v b="${R_CPU["alone|$MESH_LOG|h1|$base"]}" 'BEGIN { printf "%+.1f", a - b }') CPU µs per request over $base (the same hops in plaintext)."
    fi
  done
  echo
}

report_details() {
  local key pl lg proto name
  echo "<details><summary>details</summary>"
  echo
  echo "Rounds: CPU µs/req of each round, in order (the table shows the median one). task-clock: perf's CPU µs/req of the shown round, which counts steal. Kernel: the part of CPU µs/req spent in the kernel on the proxy's behalf (/proc stime: system calls, the network stack's work they do, page faults); where it is most of the cost, system calls per request are the lever. Faults: page faults per request (/proc minflt+majflt), kernel time that no system call shows. Steal: the proxy CPU's steal time over that round ÷ its length; a cell with a large one ran on a disturbed machine. Requests and errors: of the shown round; errors of every round. Threads: of the proxy process(es) after start. Log lines: lines in the proxy's access-log file over the whole cell (warm-up, every round, latency run; Spur's file also has its few start-up lines)."
  echo
  echo "| placement | access log | client | target | requests | errors | rounds CPU µs/req | task-clock µs/req | kernel µs/req | faults/req | steal | threads | log lines |"
  echo "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"
  for key in "${CELL_ORDER[@]}"; do
    IFS='|' read -r pl lg proto name <<<"$key"
    [[ ${R_STATUS[$key]:-} == ok || ${R_STATUS[$key]:-} == crashed ]] || continue
    [[ $lg == - ]] && lg="—"
    echo "| $pl | $lg | $(proto_label "$proto") | $name | ${R_REQS[$key]} | ${R_ERRS[$key]} | $(dash "${R_ROUNDS[$key]:-}") | $(dash "${R_TASK_CPU[$key]:-}") | $(dash "${R_KERNEL[$key]:-}") | $(dash "${R_FAULTS[$key]:-}") | $(dash "${R_STEAL[$key]:-}") | $(dash "${R_THREADS[$key]:-}") | $(dash "${R_LOGLINES[$key]:-}") |"
  done
  echo
  echo "Raw output, configs and logs: \`${RUN_DIR#"$REPO_ROOT"/}/\`"
  echo
  echo "</details>"
}

write_report() {
  report_header
  report_main
  report_ratios
  report_latency
  report_mesh
  report_memory
  report_startup
  report_details
}

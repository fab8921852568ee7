#!/usr/bin/env bash
# Writes proxy/link/hot-symbols.txt: the functions a running proxy executes, for the linker
# to lay out together (see proxy/link/build_link.rs). Runs the release `spur proxy` and
# `spur-proxy` under callgrind in four configurations in front of run.sh's nginx origin: one
# plain HTTP listener with its admin endpoints, and the mesh hop over mutual TLS with
# HTTP/1.1 and HTTP/2, and over HTTP/3. Each serves HTTP/1.1 and h2c requests (access log
# on) and has every admin endpoint read. The list has what the plain listener ran first, then
# what only the mesh hops ran, each part hottest first (instructions each function executed
# itself), so a proxy without mesh hops keeps only the first part resident. Both binaries
# are profiled because generic code is named after the crate that instantiates it. Functions
# that never ran are not listed: the linker places them after. 127.0.0.1 only; every run is
# bounded in time. Rebuild afterwards (cargo build --release). About a minute per binary.
# Several binaries (a PGO build, then a plain one: PGO inlines some functions the plain
# build keeps, and keeps others apart): the list is the first one's, followed by what each
# next one ran that is not listed yet, so one list serves every build.
# Usage: benches/hot-symbols.sh [SPUR_BIN...]   (default target/release/spur; spur-proxy is
# taken from the same directory)
set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=lib/common.sh
source "$SCRIPT_DIR/lib/common.sh"
# shellcheck source=lib/targets.sh
source "$SCRIPT_DIR/lib/targets.sh"

BINS=()
for b in "${@:-$ROOT/target/release/spur}"; do BINS+=("$(realpath "$b")"); done
OUT=$ROOT/proxy/link/hot-symbols.txt
REQUESTS=${REQUESTS:-2000}
PORT='' ADMIN='' INPORT=''   # set by free_port
for b in "${BINS[@]}"; do
  [[ -x $b && -x $(dirname "$b")/spur-proxy ]] || die "$b and $(dirname "$b")/spur-proxy are needed (cargo build --release first)"
done
for tool in valgrind h2load curl openssl python3; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install -y valgrind nghttp2-client curl openssl python3)"
done
[[ -x $NGINX_BIN ]] || die "nginx is missing (apt-get install -y nginx)"

# shellcheck disable=SC2034  # used by targets.sh
ON_LOAD_CPUS=()
# shellcheck disable=SC2034  # used by targets.sh
PROXY_WORKERS=1
# shellcheck disable=SC2034  # used by targets.sh
declare -A SPUR_WORKERS_KEY=()
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/spur-hot-symbols.XXXXXX")
WORK=$RUN_DIR
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
start_origin
make_mesh_certs "$WORK/certs"

# profile NAME CONFIG CMD... : runs CMD --config CONFIG under callgrind (port $PORT, admin
# $ADMIN) and sends it traffic; the profile goes to $RUN_DIR/NAME.callgrind.
profile() {
  local name=$1 config=$2 pid path
  shift 2
  log "callgrind: $name"
  SPUR_LOG=info TOKIO_WORKER_THREADS=1 timeout --kill-after=5 600 \
    valgrind --tool=callgrind --demangle=no --callgrind-out-file="$RUN_DIR/$name.callgrind" \
    "$@" --config "$config" >"$RUN_DIR/$name.stdout.log" 2>"$RUN_DIR/$name.stderr.log" &
  pid=$!
  ALL_PIDS+=("$pid")   # cleanup stops it if anything below fails
  wait_ok "$name" "http://127.0.0.1:$PORT/" "$pid" h1 300 || die "$name did not start"
  timeout 300 h2load --h1 -n "$REQUESTS" -c 10 "http://127.0.0.1:$PORT/" >"$RUN_DIR/$name.h1.txt" 2>&1 || true
  timeout 300 h2load -n "$REQUESTS" -c 10 -m 10 "http://127.0.0.1:$PORT/" >"$RUN_DIR/$name.h2.txt" 2>&1 || true
  for path in metrics ready live config clusters; do
    curl --noproxy '*' -s -m 10 -o /dev/null "http://127.0.0.1:$ADMIN/$path" || true
  done
  kill -INT "$pid"
  wait "$pid" || true
  for proto in h1 h2; do
    if ! grep -q " 0 failed, 0 errored" "$RUN_DIR/$name.$proto.txt"; then
      cat "$RUN_DIR/$name.$proto.txt" >&2
      die "$name: $proto requests failed (h2load's output is above)"
    fi
  done
}

: >"$OUT.new"
for ((i = 0; i < ${#BINS[@]}; i++)); do
  SPUR=${BINS[$i]}
  SPUR_PROXY=$(dirname "$SPUR")/spur-proxy
  for variant in spur spur-proxy; do
    cmd=("$SPUR" proxy)
    [[ $variant == spur-proxy ]] && cmd=("$SPUR_PROXY")
    free_port PORT; free_port ADMIN
    write_spur_conf "$RUN_DIR/plain.yaml" "$PORT" "$ADMIN" "$SPUR"
    profile "b$i.$variant.plain" "$RUN_DIR/plain.yaml" "${cmd[@]}"
    for hop in http1 http2 http3; do
      free_port PORT; free_port ADMIN; free_port INPORT
      write_spur_mesh_conf "$RUN_DIR/mesh-$hop.yaml" "$PORT" "$ADMIN" "$INPORT" "$WORK/certs" "$hop" "$SPUR"
      profile "b$i.$variant.mesh-$hop" "$RUN_DIR/mesh-$hop.yaml" "${cmd[@]}"
    done
  done
  python3 "$SCRIPT_DIR/lib/hot_symbols.py" "$RUN_DIR"/b"$i".*.plain.callgrind -- "$RUN_DIR"/b"$i".*.callgrind \
    >"$RUN_DIR/list$i.txt"
  # Names an earlier binary listed keep their place.
  awk 'FILENAME == ARGV[1] { seen[$0] = 1; next } !seen[$0]' "$OUT.new" "$RUN_DIR/list$i.txt" >"$RUN_DIR/new$i.txt"
  cat "$RUN_DIR/new$i.txt" >>"$OUT.new"
done
mv "$OUT.new" "$OUT"
log "wrote $(wc -l <"$OUT") symbols to $OUT"

#!/usr/bin/env bash
# The control plane in replicas at scale: N simulated proxies' watch streams over R replicas
# of `spur control --store kubernetes` on the tests' fake Kubernetes API, one push, p50/p99
# until every watcher has it, and each replica's RSS. See benches/README.md.
#
#   benches/store_scale.sh                       # 1000 watchers, 3 replicas, debug build
#   benches/store_scale.sh --release             # the same with release builds
#   benches/store_scale.sh --watchers 30         # a quick check that it works
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug
cargo_flags=()
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --release) profile=release; cargo_flags+=(--release) ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) args+=("$1") ;;
  esac
  shift
done
cargo build -q "${cargo_flags[@]}" --bin spur --example store_scale
# Every step of the run has its own deadline; this is the safety net.
exec timeout 300 "target/$profile/examples/store_scale" --spur-bin "target/$profile/spur" "${args[@]}"

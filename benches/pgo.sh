#!/usr/bin/env bash
# Builds spur and spur-proxy with profile-guided optimisation (PGO): an instrumented
# release build runs a training load, and the release build is then compiled again with
# that profile, so the compiler knows which branches and calls the request path takes
# (inlining, block order, hot and cold code apart). The training load is benches/run.sh's
# own, short: the plain listener (HTTP/1.1 and h2c clients, access log off and on, both
# placements) and the mesh hops (mutual TLS with HTTP/1.1 and HTTP/2, HTTP/3), in front
# of run.sh's nginx origin; 127.0.0.1 only, every run bounded in time.
# Needs what run.sh needs (nginx, wrk, h2load, python3) and an llvm-profdata of the same
# LLVM major version as rustc (`rustc -vV`): `rustup component add llvm-tools`, or Debian's
# llvm-N package. Takes two release builds (about 25 minutes on 2 cores) and under a
# minute of load. The binaries go to $PGO_TARGET/release/ (default target/pgo/release/).
# Usage: benches/pgo.sh
set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=lib/common.sh
source "$SCRIPT_DIR/lib/common.sh"   # allowed_cpus; log and die are pgo.sh's own below
GEN_TARGET=${PGO_GEN_TARGET:-$ROOT/target/pgo-gen}
PGO_TARGET=${PGO_TARGET:-$ROOT/target/pgo}
DATA=${PGO_DATA:-$ROOT/target/pgo-data}
log() { echo "[pgo $(date +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 1; }

# llvm-profdata of rustc's LLVM major version: rustup's llvm-tools, llvm-profdata-N, or an
# llvm-profdata that says it is version N.
major=$(rustc -vV | awk '/^LLVM version:/ { split($3, v, "."); print v[1] }')
[[ -n $major ]] || die "rustc -vV names no LLVM version"
PROFDATA=
for p in "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata "$(command -v "llvm-profdata-$major" || true)" \
  "$(command -v llvm-profdata || true)"; do
  [[ -n $p && -x $p ]] || continue
  if "$p" --version 2>/dev/null | grep -Eq "LLVM version $major\."; then PROFDATA=$p; break; fi
done
[[ -n $PROFDATA ]] || die "no llvm-profdata of LLVM $major (rustc's): rustup component add llvm-tools, or apt-get install llvm-$major"
log "llvm-profdata: $PROFDATA"

# The profile directory is emptied first: raw profiles of another build would not match.
[[ $DATA == /*/* ]] || die "PGO_DATA must be an absolute path below a directory (got '$DATA')"
rm -rf "$DATA" && mkdir -p "$DATA"
log "instrumented build into $GEN_TARGET"
(cd "$ROOT" && CARGO_TARGET_DIR=$GEN_TARGET RUSTFLAGS="-Cprofile-generate=$DATA" \
  cargo build --release --locked -p spur -p spur-proxy --bin spur --bin spur-proxy)

log "training load (benches/run.sh, short)"
# Its figures are not read: on a one-CPU machine the proxy and the load share the CPU.
cpus=()
read -r -a allowed <<<"$(allowed_cpus)"
if [[ ${#allowed[@]} -eq 1 ]]; then cpus=(--proxy-cpus "${allowed[0]}" --load-cpus "${allowed[0]}"); fi
RESULTS_DIR=$DATA/run "$SCRIPT_DIR/run.sh" --spur-bin "$GEN_TARGET/release/spur" --no-perf "${cpus[@]}" \
  --targets spur,spur-mtls,spur-mtls-h2,spur-h3 --rounds 1 --duration 3 --warmup 1 \
  --latency-duration 1 --handshake-duration 1 --memory-conns 0 --startup-runs 0 >"$DATA/run.log" 2>&1 \
  || die "the training run failed (see $DATA/run.log)"
shopt -s nullglob
raw=("$DATA"/*.profraw)
[[ ${#raw[@]} -gt 0 ]] || die "the training run left no profile in $DATA (did Spur exit cleanly?)"
"$PROFDATA" merge -o "$DATA/spur.profdata" "${raw[@]}"
log "profile: $DATA/spur.profdata (${#raw[@]} raw files)"

log "optimised build into $PGO_TARGET"
# LLVM inlines a call the profile calls hot up to a cost of 3000 by default, so the request
# path's hot functions swell with copies of the same callees (a hundred kilobytes of code
# run per request, three times the instruction cache). 1000 keeps the instruction count
# and takes 8% (HTTP/2) and 1% (HTTP/1.1) of the simulated instruction-cache misses away
# (benches/README.md).
(cd "$ROOT" && CARGO_TARGET_DIR=$PGO_TARGET \
  RUSTFLAGS="-Cprofile-use=$DATA/spur.profdata -Cllvm-args=-hot-callsite-threshold=1000" \
  cargo build --release --locked -p spur -p spur-proxy --bin spur --bin spur-proxy)
log "done: $PGO_TARGET/release/spur and $PGO_TARGET/release/spur-proxy"

# Spur: two images from one build.
#
#   docker build -t spur .                        the proxy and the control plane (default target)
#   docker build --target init -t spur-init .     the pod init step: `spur init-iptables`
#
#   docker run --rm -v "$PWD/spur.yaml:/etc/spur/spur.yaml:ro" spur validate /etc/spur/spur.yaml
#   docker run --rm -p 7070:7070 spur control --listen 0.0.0.0:7070
#   docker run --rm -v "$PWD/spur.yaml:/etc/spur/spur.yaml:ro" spur proxy --config /etc/spur/spur.yaml
#
# The default image holds the binaries spur (umbrella: `spur proxy`, `spur control`, ...),
# spur-proxy and spur-control in /usr/local/bin, on distroless: no shell, no package
# manager, runs as a non-root user. `spur inject` uses it for the `spur-proxy` sidecar and
# derives the init image's name from it (`.../spur:TAG` -> `.../spur-init:TAG`): push both.
# Needs BuildKit (the default builder of `docker build` since Docker 23) for the cache
# mounts below.

# ---------------------------------------------------------------- build stage --
FROM rust:1.95-bookworm AS builder
# PGO=1 (the default): spur and spur-proxy are built with profile-guided optimisation by
# benches/pgo.sh: an instrumented build serves a short benchmark load (nginx origin, wrk,
# h2load, all on 127.0.0.1 inside the build), then the release build uses that profile.
# About 20% less CPU per request in the user space on the development VM (README,
# Benchmark), for a build about twice as long. --build-arg PGO=0: one plain release build.
ARG PGO=1
RUN if [ "$PGO" = 1 ]; then \
      apt-get update \
   && apt-get install -y --no-install-recommends nginx wrk nghttp2-client python3 procps curl openssl \
   && rm -rf /var/lib/apt/lists/* \
   && rustup component add llvm-tools; \
    fi
WORKDIR /src
COPY . .
# Cache mounts keep the crates.io downloads and the compiled dependencies between
# builds. target/ is a cache mount, so it is not part of the image layer: the
# binaries are copied out of it in this same RUN. --locked: build exactly Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    mkdir -p /out \
 && if [ "$PGO" = 1 ]; then \
      benches/pgo.sh \
   && cp target/pgo/release/spur target/pgo/release/spur-proxy /out/ \
   && cargo build --release --locked -p spur-control --bin spur-control; \
    else \
      cargo build --release --locked \
        -p spur -p spur-proxy -p spur-control \
        --bin spur --bin spur-proxy --bin spur-control \
   && cp target/release/spur target/release/spur-proxy /out/; \
    fi \
 && cp target/release/spur-control /out/

# ------------------------------------------------------------------ init stage --
# `spur init-iptables` runs `iptables-restore`, which distroless does not have. This image
# runs for a second per pod start, as root with NET_ADMIN, and is never a long-lived
# container. Debian's iptables is the nf_tables flavour; `iptables-legacy-restore` is
# there too (`spur init-iptables --iptables-restore iptables-legacy-restore`).
FROM debian:bookworm-slim AS init
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/spur /usr/local/bin/spur
ENTRYPOINT ["/usr/local/bin/spur"]
CMD ["init-iptables", "--help"]

# -------------------------------------------------------------- runtime stage --
# Last, so that a plain `docker build .` builds it. distroless/cc: glibc (the build stage
# is Debian 12 too), libgcc and CA certificates, no shell. The :nonroot tag runs as
# uid/gid 65532 ("nonroot"); in Kubernetes the injected sidecar runs as uid 1337 instead
# (its traffic is the one iptables leaves alone).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/ /usr/local/bin/
USER nonroot:nonroot
# `spur control` keeps its default data dir (./spur-data) under the writable home.
WORKDIR /home/nonroot
# 7070: control plane API (`spur control --listen`)
# 9901: proxy admin endpoints (/metrics /ready /live /config /clusters), as configured
# 15006: the sidecar's inbound listener in Kubernetes; other listener ports are whatever
#        the config says.
EXPOSE 7070 9901 15006
ENTRYPOINT ["/usr/local/bin/spur"]

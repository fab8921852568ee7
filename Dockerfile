# Spur: one image holding the data plane and the control plane.
#
#   docker build -t spur .
#   docker run --rm spur validate /etc/spur/spur.yaml           (with the file mounted)
#   docker run --rm -p 7070:7070 spur control --listen 0.0.0.0:7070
#   docker run --rm spur proxy --config /etc/spur/spur.yaml
#
# Binaries in /usr/local/bin: spur (umbrella: `spur proxy`, `spur control`, ...),
# spur-proxy and spur-control. Needs BuildKit (the default builder of `docker build`
# since Docker 23) for the cache mounts below.

# ---------------------------------------------------------------- build stage --
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the crates.io downloads and the compiled dependencies between
# builds. target/ is a cache mount, so it is not part of the image layer: the
# binaries are copied out of it in this same RUN.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        -p spur -p spur-proxy -p spur-control \
        --bin spur --bin spur-proxy --bin spur-control \
 && mkdir -p /out \
 && cp target/release/spur target/release/spur-proxy target/release/spur-control /out/

# -------------------------------------------------------------- runtime stage --
# distroless/cc: glibc, libgcc and CA certificates, no shell. The :nonroot tag runs
# as uid/gid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/ /usr/local/bin/
USER nonroot:nonroot
# `spur control` keeps its default data dir (./spur-data) under the writable home.
WORKDIR /home/nonroot
# 7070: control plane API (spur control default listen)
# 9901: proxy admin endpoints (/metrics /ready /live /config /clusters)
# 8443: conventional inbound listener; listener ports are whatever the config says.
EXPOSE 7070 9901 8443
ENTRYPOINT ["/usr/local/bin/spur"]

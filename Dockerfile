# syntax=docker/dockerfile:1

# pollgate container image (docs/deploy.md).
#
#   docker build -t pollgate:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9090:9090 pollgate:0.1.0
#
# The built-in config (conf/pollgate.yaml) uses the in-process broker; for
# several instances point them all at one Redis, e.g.
#   docker run ... -e POLLGATE_BROKER=redis://redis:6379/0 pollgate:0.1.0
# Each held poll is an open socket: give the container enough file
# descriptors (docker run --ulimit nofile=65536:65536) and keep
# limits.max_held below that number.

# ---- build ------------------------------------------------------------------
FROM rust:1-bookworm AS builder

# Pingora's zlib-ng (libz-ng-sys) is built with CMake; the image already has
# the C compiler.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# BuildKit caches keep downloaded crates and compiled dependencies between
# builds; the binary is copied out of the cached target directory in the same
# step, since the cache is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin pollgate \
 && install -D -m 0755 target/release/pollgate /out/pollgate

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: upstreams with `tls: true` are checked against the system
# certificate store. (rediss:// uses the roots built into the binary.)
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 pollgate \
 && useradd --system --uid 10001 --gid pollgate --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin pollgate

COPY --from=builder /out/pollgate /usr/local/bin/pollgate
COPY conf/pollgate.yaml /etc/pollgate/pollgate.yaml

# Also the config of `pollgate check` run in the container without -c.
ENV POLLGATE_CONFIG=/etc/pollgate/pollgate.yaml

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# 8080: clients (long-polls, proxied routes). 9090: admin (publish API,
# /metrics, /healthz, /readyz); never publish it to the outside world.
EXPOSE 8080 9090

# SIGTERM drains: held polls are answered at once with their cursor, in-flight
# requests get grace_period (10s) to finish. `docker stop` waits only 10 s by
# default: use `docker stop -t 15` (or --stop-timeout) to leave room.
STOPSIGNAL SIGTERM

# The admin listener is bound to all interfaces here, so pollgate refuses to
# start without a publish token: run with -e POLLGATE_PUBLISH_TOKEN=... (the
# config reads it), or set publish.allow_unauthenticated: true on purpose.
ENTRYPOINT ["pollgate"]
CMD ["serve", "-c", "/etc/pollgate/pollgate.yaml", "--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:9090", "--log-format", "json"]

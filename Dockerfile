# syntax=docker/dockerfile:1
# Build: the release binary, with the registry and target directory in
# BuildKit caches so a source change does not rebuild every dependency.
# Run: a slim Debian with only that binary, as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
ARG GIT_SHA=unknown
ENV GIT_SHA=${GIT_SHA}
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p meshbroker \
 && cp target/release/meshbroker /usr/local/bin/meshbroker

# The binary needs only glibc: no TLS library (Postgres is reached in
# plain TCP; put TLS in front of the broker, docs/DEPLOY.md), no curl.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin meshbroker
COPY --from=build /usr/local/bin/meshbroker /usr/local/bin/meshbroker
ARG GIT_SHA=unknown
# NODE_ENV=production: DATABASE_URL is required (no embedded Postgres).
ENV GIT_SHA=${GIT_SHA} \
    NODE_ENV=production \
    BROKER_HOST=0.0.0.0 \
    BROKER_PORT=7900
USER meshbroker
EXPOSE 7900
# SIGTERM: close every WebSocket with 1001, flush, exit 0 within 10 s; give
# the container a stop timeout above that (`docker stop -t 20`, compose's
# stop_grace_period).
STOPSIGNAL SIGTERM
# Liveness, not readiness: /health/live stays 200 while Postgres is away, so
# a database outage never gets the broker restarted (probe readiness with
# `meshbroker healthcheck --ready`, i.e. /health).
# io_uring: Docker's default seccomp profile blocks it; the broker then runs
# on epoll and logs `io_uring unavailable` (docs/DEPLOY.md, "Containers").
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/meshbroker", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/meshbroker"]

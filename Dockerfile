# Build: the release binary. Run: a slim Debian with that binary, non-root.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
ARG GIT_SHA=unknown
ENV GIT_SHA=${GIT_SHA}
RUN cargo build --release --locked -p meshbroker \
 && cp target/release/meshbroker /usr/local/bin/meshbroker

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin meshbroker
COPY --from=build /usr/local/bin/meshbroker /usr/local/bin/meshbroker
ARG GIT_SHA=unknown
ENV GIT_SHA=${GIT_SHA} \
    NODE_ENV=production \
    BROKER_HOST=0.0.0.0 \
    BROKER_PORT=7900
USER meshbroker
EXPOSE 7900
# Liveness, not readiness: /health/live stays 200 while Postgres is away, so
# a database outage never gets the broker restarted (probe readiness with
# `meshbroker healthcheck --ready`, i.e. /health). No curl in this image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/meshbroker", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/meshbroker"]

# syntax=docker/dockerfile:1
#
# vidu-worker container image.
#
#   docker build -t vidu-worker .
#   docker run --rm -e NOVITA_API_KEY=... \
#     -e VIDU_WORKER__AMQP__URL=amqp://user:pass@rabbitmq:5672/%2f vidu-worker
#
# Stages: `chef` (toolchain + cargo-chef) -> `planner` (dependency recipe) ->
# `builder` (dependencies cooked in their own cached layer, then the binary)
# -> `runtime` (Debian slim, CA roots, the binary and config/, non-root).
# Builder and runtime must share a Debian release (glibc): both are bookworm.

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS chef
# Smaller binary; set here so the cooked dependencies and the final build
# share one profile (a change would invalidate the dependency layer).
ENV CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /app

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
# Dependencies only: this layer is rebuilt when Cargo.toml/Cargo.lock change,
# not when our code does.
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin vidu-worker
COPY . .
RUN cargo build --release --locked --bin vidu-worker

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# TLS (amqps://, https://api.novita.ai) uses rustls with the system's roots.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 vidu \
    && useradd --system --uid 10001 --gid vidu --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin vidu
# config/default.toml is read relative to the working directory.
WORKDIR /app
COPY config/ ./config/
COPY --from=builder /app/target/release/vidu-worker /usr/local/bin/vidu-worker
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# The operations endpoint (http.listen): /healthz, /readyz, /metrics.
EXPOSE 9090
# Liveness without curl or wget in the image: an HTTP/1.0 GET over bash's
# /dev/tcp. Assumes the default http.listen port; Kubernetes uses its own
# probes (deploy/kubernetes/). Readiness is /readyz.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["vidu-worker"]
CMD ["run"]

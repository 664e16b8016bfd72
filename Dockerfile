# syntax=docker/dockerfile:1
# The projector worker image (used by docker-compose.yml). Build: docker build -t projector:local .

FROM rust:1.95-bookworm AS build
# rdkafka's bundled librdkafka is built with CMake
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Target dir outside the copied tree (a host ./target is ignored) and cached between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/cargo-target \
    CARGO_TARGET_DIR=/cargo-target cargo build --release --locked --bin projector \
 && cp /cargo-target/release/projector /usr/local/bin/projector

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libcurl4 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app projector
COPY --from=build /usr/local/bin/projector /usr/local/bin/projector
WORKDIR /app
COPY config ./config
ENV PROJECTOR_CONFIG=config/compose.toml
USER projector
CMD ["projector", "run", "--config", "config/compose.toml"]

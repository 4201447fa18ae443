# syntax=docker/dockerfile:1
# Build: docker build -t cachegate .
# Run:   docker run -p 8080:8080 -p 127.0.0.1:9091:9091 --stop-timeout 40 \
#          -e REDIS_PASSWORD -v $PWD/cachegate.toml:/etc/cachegate/cachegate.toml:ro cachegate
# The mounted file must be readable by uid 10001 (chmod 644); inside the container,
# 127.0.0.1 is the container itself, so name the upstream and Redis by hostname.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them. The manifest names a bench and
# a test target, so they get stubs too (only the binary is built).
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches tests/it \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && for b in micro load purge; do echo 'fn main() {}' > benches/$b.rs; done \
    && touch tests/it/main.rs \
    && cargo build --release --locked --bin cachegate \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin cachegate

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin cachegate
COPY --from=build /src/target/release/cachegate /usr/local/bin/cachegate
COPY config/docker.toml /etc/cachegate/cachegate.toml
USER 10001:10001
EXPOSE 8080 9091
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/cachegate"]
CMD ["run", "--config", "/etc/cachegate/cachegate.toml", "--log-format", "json"]

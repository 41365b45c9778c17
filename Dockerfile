# syntax=docker/dockerfile:1.7
# One image per function, chosen by build argument:
#   docker build --build-arg FUNCTION=create-order -t tally/create-order .
#   docker build --build-arg FUNCTION=tally-shared --build-arg BIN=migrate -t tally/migrate .
#   docker build --build-arg FUNCTION=backup --target backup -t tally/backup .
# Dependencies are compiled once and kept in BuildKit cache mounts, so a change to one
# function rebuilds only what it touches.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
ARG FUNCTION
ARG BIN=${FUNCTION}
WORKDIR /src
COPY . .
# The cache mounts are not part of the image; the binary is copied out of them.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    test -n "${FUNCTION}" \
    && cargo build --release --locked --package "${FUNCTION}" --bin "${BIN}" \
    && install -D "target/release/${BIN}" /out/function

# The backup function needs pg_dump/pg_restore of the server's major version (16), which the
# official image carries; it runs as that image's unprivileged `postgres` user (uid 999).
FROM postgres:16.6-bookworm AS backup
COPY --from=build /out/function /usr/local/bin/backup
ENV PG_BINDIR=/usr/lib/postgresql/16/bin
USER 999:999
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/backup"]

# Every other function: glibc and nothing else, no shell, no package manager, non-root.
FROM gcr.io/distroless/cc-debian12:nonroot AS function
COPY --from=build /out/function /function
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["/function"]

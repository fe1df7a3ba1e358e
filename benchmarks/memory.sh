#!/usr/bin/env bash
# Runs the memory benchmark (benchmarks/memory/): installs nats-server if it is missing, raises
# the open-files limit as far as allowed, builds one release gateway per allocator (glibc
# malloc, mimalloc, jemalloc: the cargo features of src/allocator.rs) into target/membench/,
# then `cargo bench --bench memory` over the variants in MEMBENCH_VARIANTS (by default every
# allocator, and glibc with MALLOC_ARENA_MAX=2, with MALLOC_TRIM_THRESHOLD_ and with a
# periodic malloc_trim). It writes artifacts/memory/latest.{md,json}. Other knobs
# (environment): MEMBENCH_CONNECTIONS, MEMBENCH_BURST_*, MEMBENCH_CHURN_*,
# MEMBENCH_AFTER_SECONDS, MEMBENCH_SCENARIOS, MEMBENCH_GATEWAY_ARGS, MEMBENCH_NO_ARTIFACTS,
# MEMBENCH_ALLOCATORS (which builds, default "glibc mimalloc jemalloc"); see
# benchmarks/README.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

source scripts/install-deps

hard="$(ulimit -Hn)"
if [[ "${hard}" == unlimited ]]; then
    ulimit -n 1048576 2>/dev/null || true
else
    ulimit -n "${hard}"
fi
echo "open-files limit: soft $(ulimit -Sn), hard $(ulimit -Hn)" >&2

target="${CARGO_TARGET_DIR:-target}"
bins="${target}/membench"
mkdir -p "${bins}"
for allocator in ${MEMBENCH_ALLOCATORS:-glibc mimalloc jemalloc}; do
    case "${allocator}" in
        glibc) features=() ;;
        *) features=(--features "${allocator}") ;;
    esac
    cargo build --release --bin ipc-gateway --no-default-features "${features[@]}"
    cp "${target}/release/ipc-gateway" "${bins}/ipc-gateway-${allocator}"
done
# Leave target/release/ipc-gateway as the default build.
cargo build --release --bin ipc-gateway --bench memory

bins="$(cd "${bins}" && pwd)"
if [[ -z "${MEMBENCH_VARIANTS:-}" ]]; then
    variants=""
    for allocator in ${MEMBENCH_ALLOCATORS:-glibc mimalloc jemalloc}; do
        variants+="${allocator}=${bins}/ipc-gateway-${allocator};"
        if [[ "${allocator}" == glibc ]]; then
            variants+="glibc-arena2=${bins}/ipc-gateway-glibc MALLOC_ARENA_MAX=2;"
            variants+="glibc-trim-threshold=${bins}/ipc-gateway-glibc MALLOC_TRIM_THRESHOLD_=131072 MALLOC_TOP_PAD_=0;"
            variants+="glibc-malloc-trim=${bins}/ipc-gateway-glibc IPC_GATEWAY_MALLOC_TRIM_MS=5000;"
        fi
    done
    export MEMBENCH_VARIANTS="${variants}"
fi

recorded=""
for knob in MEMBENCH_CONNECTIONS MEMBENCH_BURST_SUBSCRIBERS MEMBENCH_BURST_MESSAGES \
    MEMBENCH_BURST_BYTES MEMBENCH_CHURN_CONNECTIONS MEMBENCH_CHURN_SUBSCRIPTIONS \
    MEMBENCH_AFTER_SECONDS MEMBENCH_SCENARIOS MEMBENCH_GATEWAY_ARGS MEMBENCH_ALLOCATORS \
    MEMBENCH_NO_ARTIFACTS; do
    if [[ -n "${!knob:-}" ]]; then
        recorded+="${knob}=${!knob} "
    fi
done
export MEMBENCH_COMMAND="${recorded}bash benchmarks/memory.sh"

cargo bench --bench memory

